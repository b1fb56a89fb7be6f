"""AlexNet, where its weights come from, and how an image is prepared for it."""
