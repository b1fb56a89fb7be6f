"""retrieve: find similar images by AlexNet fc7 features (Krizhevsky et al. 2012) and FAISS."""

__version__ = "0.1.0"
