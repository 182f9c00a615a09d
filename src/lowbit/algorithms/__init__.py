"""Quantization methods, one file each; importing registers them."""
from . import gptq, rtn  # noqa: F401
