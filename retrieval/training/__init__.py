"""Training AlexNet on a labelled folder: data, augmentation, recipes, the loop, evaluation."""
