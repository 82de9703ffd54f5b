"""glassmind: the whole life of a large language model, from first principles, on PyTorch."""

__version__ = "0.1.0"
