"""Compute paths for quantized modules, behind one dispatch.

`reference` dequantizes the packed weight and runs a float matmul; faster
paths (int4/int8 kernels) register here later and fall back to it.
"""
from .reference import qlinear_forward

__all__ = ["qlinear_forward"]
