"""What the kernels keep per quantized module: `module.kstate`, one KernelState.

Built on first use by the kernel that needs it; nn/qlinear.py puts a fresh, empty one in place whenever the
module's weights change (new codes, `.to()` and the like, `load_state_dict`), so nothing stale is read.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KernelState:
    # QuantLinear (kernels/__init__.py)
    kernel: object | None = None  # the compute path choose_kernel picked (a kernels.Kernel)
    packed: tuple[torch.Tensor, ...] | None = None  # that kernel's copy of the weight, in its layout
    # W8A8Linear / Int8OutlierLinear (kernels/int8.py)
    int8: object | None = None  # the integer GEMM kernel_for picked (a kernels.int8.Int8Gemm)
    codes: torch.Tensor | None = None  # int8 weight codes Q [N, K]
    scale: torch.Tensor | None = None  # float32 per-output-channel weight scale [N]
    codes_t: torch.Tensor | None = None  # Q transposed, [K, N] contiguous: rows the sparse rest adds from
    sums: tuple[torch.Tensor, int] | None = None  # (Σ_k Q[n, k] float64 [N], max_n Σ_k |Q[n, k]|)
    pairs_bounded: bool | None = None  # |Q[n, 2j]| + |Q[n, 2j+1]| <= 128 everywhere
    onednn: torch.Tensor | None = None  # oneDNN's prepacked weight
