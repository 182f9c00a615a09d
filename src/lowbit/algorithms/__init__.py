"""Quantization methods, one file each; importing registers them."""
from . import rtn  # noqa: F401
