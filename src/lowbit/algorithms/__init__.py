"""Quantization methods, one file each; importing registers them."""
from . import awq, gptq, rtn  # noqa: F401
