"""Quantization math: schemes, quantize/dequantize, packing, configs."""
from .config import QuantConfig
from .packing import pack, unpack
from .quant import QTensor, compute_qparams, dequantize, fake_quantize, quantize
from .scheme import Scheme

__all__ = ["QuantConfig", "QTensor", "Scheme", "compute_qparams", "dequantize", "fake_quantize",
           "pack", "quantize", "unpack"]
