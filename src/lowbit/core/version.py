"""lowbit's version, recorded in every checkpoint it writes (formats/checkpoint.py)."""
__version__ = "0.1.0"
