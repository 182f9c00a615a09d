"""Quantization methods, one file each; importing registers them."""
from . import awq, gptq, llm_int8, rtn, smoothquant  # noqa: F401
