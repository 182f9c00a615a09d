"""Quantization math: schemes, quantize/dequantize, packing, configs, the method registry."""
from .config import QuantConfig
from .packing import pack, unpack
from .quant import QTensor, compute_qparams, dequantize, fake_quantize, quantize
from .registry import get_method, register_method
from .scheme import Scheme

__all__ = ["QuantConfig", "QTensor", "Scheme", "compute_qparams", "dequantize", "fake_quantize",
           "get_method", "pack", "quantize", "register_method", "unpack"]
