"""Compute paths for quantized modules, behind one dispatch.

    QuantLinear, 4-bit, groups the kernel can tile, -> int4.Int4Kernel  (torch's CPU int4 matmul, packed
      at most int4.MAX_ROWS rows of x (decoding)                        once, bf16 activations)
    QuantLinear, 8-bit, groups the int4 kernel tiles, -> int4.Int8x2Kernel (the same kernel on two 4-bit
      at most int4.MAX_ROWS rows of x                      halves of the codes, c = 16·hi + lo: twice the rows)
    QuantLinear, 8-bit per-channel symmetric,       -> w8.W8Kernel (torch's CPU int8 weight matmul, fp32
      at most w8.MAX_ROWS rows of x                    activations)
    QuantLinear, anything else                      -> reference.REFERENCE (dequantize, float matmul)
    W8A8Linear / Int8OutlierLinear                  -> int8.py (their own forward)
choose_kernel picks a module's kind once and keeps it in the module's KernelState (kernels/state.py);
every call then goes to that object's forward. A module that a fast path refuses falls back to the
reference, logged once per reason. LOWBIT_KERNELS=reference forces the reference path everywhere.
"""
from __future__ import annotations

import os
import sys

from .reference import REFERENCE, Kernel
from .reference import qlinear_forward as reference_forward
from .state import KernelState

_LOGGED: set[str] = set()


def _log_once(msg: str) -> None:
    if msg not in _LOGGED:
        _LOGGED.add(msg)
        print(f"lowbit: {msg}", file=sys.stderr)


def choose_kernel(module) -> Kernel:
    """The compute path of a QuantLinear: Int4Kernel(G), Int8x2Kernel(G), W8Kernel() or REFERENCE; chosen once."""
    choice = module.kstate.kernel
    if choice is not None:
        return choice
    choice = REFERENCE
    if os.environ.get("LOWBIT_KERNELS", "") != "reference":
        from .int4 import Int4Kernel, Int8x2Kernel, kernel_group
        from .w8 import W8Kernel
        from .w8 import applies as w8_applies

        G = kernel_group(module)
        if module.scheme.bits == 8 and G is not None:
            choice = Int8x2Kernel(G)
        elif w8_applies(module):
            choice = W8Kernel()
        elif module.scheme.bits == 4:
            if G is not None:
                choice = Int4Kernel(G)
            else:
                _log_once(f"int4 kernel: a {module.out_features}x{module.in_features} layer with "
                          f"{module.scheme.describe()} does not tile (rows by 16, columns in groups of 32..256); "
                          "using the reference path for such layers")
    module.kstate.kernel = choice
    return choice


def qlinear_forward(module, x):
    return (module.kstate.kernel or choose_kernel(module)).forward(module, x)


__all__ = ["Kernel", "KernelState", "REFERENCE", "choose_kernel", "qlinear_forward", "reference_forward"]
