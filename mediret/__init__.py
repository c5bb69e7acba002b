"""mediret: classify and search medical images with pre-trained embeddings."""

__version__ = "0.1.0"
