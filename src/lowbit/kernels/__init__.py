"""Compute paths for quantized modules, behind one dispatch.

    QuantLinear, 4-bit, groups the kernel can tile, -> int4.py  (torch's CPU int4 matmul, packed once,
      at most int4.MAX_ROWS rows of x (decoding)           bf16 activations)
    QuantLinear, 8-bit, groups the int4 kernel tiles, -> int4.py (the same kernel on two 4-bit halves of
      at most int4.MAX_ROWS rows of x                      the codes, c = 16·hi + lo: twice the rows)
    QuantLinear, 8-bit per-channel symmetric,       -> w8.py (torch's CPU int8 weight matmul, fp32 activations)
      at most w8.MAX_ROWS rows of x
    QuantLinear, anything else                      -> reference.py (dequantize, float matmul)
    W8A8Linear / Int8OutlierLinear                  -> int8.py (their own forward)
A module that a fast path refuses falls back to the reference, logged once per
reason. LOWBIT_KERNELS=reference forces the reference path everywhere.
"""
from __future__ import annotations

import os
import sys

from .reference import qlinear_forward as reference_forward

_LOGGED: set[str] = set()


def _log_once(msg: str) -> None:
    if msg not in _LOGGED:
        _LOGGED.add(msg)
        print(f"lowbit: {msg}", file=sys.stderr)


def choose_kernel(module) -> tuple[str, object]:
    """('int4', group), ('int8x2', group), ('w8', None) or ('reference', None) for a QuantLinear; cached."""
    choice = module._kcache.get("kernel")
    if choice is not None:
        return choice
    choice = ("reference", None)
    if os.environ.get("LOWBIT_KERNELS", "") != "reference":
        from .int4 import kernel_group
        from .w8 import applies as w8_applies

        G = kernel_group(module)
        if module.scheme.bits == 8 and G is not None:
            choice = ("int8x2", G)
        elif w8_applies(module):
            choice = ("w8", None)
        elif module.scheme.bits == 4:
            if G is not None:
                choice = ("int4", G)
            else:
                _log_once(f"int4 kernel: a {module.out_features}x{module.in_features} layer with "
                          f"{module.scheme.describe()} does not tile (rows by 16, columns in groups of 32..256); "
                          "using the reference path for such layers")
    module._kcache["kernel"] = choice
    return choice


def qlinear_forward(module, x):
    kind, arg = choose_kernel(module)
    if kind == "int4":
        from .int4 import MAX_ROWS, int4_forward

        if x.numel() // x.shape[-1] <= MAX_ROWS:
            return int4_forward(module, x, arg)
    elif kind == "int8x2":
        from .int4 import MAX_ROWS, int8x2_forward

        if x.numel() // x.shape[-1] <= MAX_ROWS:
            return int8x2_forward(module, x, arg)
    elif kind == "w8":
        from .w8 import MAX_ROWS, w8_forward

        if x.numel() // x.shape[-1] <= MAX_ROWS:
            return w8_forward(module, x)
    return reference_forward(module, x)


__all__ = ["qlinear_forward", "reference_forward", "choose_kernel"]
