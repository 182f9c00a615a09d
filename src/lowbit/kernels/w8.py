"""W8 weight-only: torch's CPU int8 weight matmul (`_weight_int8pack_mm`).

    y[m, n] = Σ_k x[m, k] · w[n, k] · scale[n]        w int8 [N, K], scale [N], x float32

This is lowbit's 8-bit per-output-channel symmetric scheme as it is stored
(x̂ = s · Q), so the kernel's result equals the reference (dequantize, matmul)
up to float summation order (a named tolerance in the test). The int8 codes
are unpacked once per module (kept in module.kstate.packed); activations stay float32 (the kernel's
bf16 path accumulates in bf16 here and loses accuracy).

On an AVX2 CPU the kernel is slow: it reads int8 weights at a fraction of the bandwidth F.linear gets
from fp32 ones, so a W8 model decodes slower than the float32 one, and a prefill through it is far
slower still. So the dispatch sends at most MAX_ROWS rows (decoding) here and larger batches to the
reference path.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .reference import Kernel, qlinear_forward as reference_forward

MAX_ROWS = 16  # rows of x up to which the kernel runs (decoding); more go to the reference


def applies(module) -> bool:
    s = module.scheme
    return (s.bits == 8 and s.symmetric and s.granularity == "channel"
            and hasattr(torch.ops.aten, "_weight_int8pack_mm"))


def pack_int8(modules) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes [N, K], float32 scales [N]) of one module or of several stacked along the rows."""
    modules = modules if isinstance(modules, (list, tuple)) else [modules]
    w = torch.cat([m.codes() for m in modules]).to(torch.int8).contiguous()
    scale = torch.cat([m.scales[:, 0] for m in modules]).float().contiguous()
    return w, scale


def int8_mm(x2: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x2 [M, K] float -> [M, N] float32."""
    return torch.ops.aten._weight_int8pack_mm(x2.float().contiguous(), w, scale)


def w8_forward(module, x: torch.Tensor) -> torch.Tensor:
    cached = module.kstate.packed
    if cached is None:
        cached = module.kstate.packed = pack_int8(module)
    lead = x.shape[:-1]
    y = int8_mm(x.reshape(-1, x.shape[-1]), *cached)
    if module.bias is not None:
        y = y + module.bias.float()
    return y.to(x.dtype).reshape(*lead, module.out_features)


@dataclass(frozen=True, repr=True)
class W8Kernel(Kernel):
    """8-bit per-channel symmetric codes through torch's int8 weight matmul (decode-sized inputs)."""

    name = "w8"

    def pack(self, modules) -> tuple[torch.Tensor, torch.Tensor]:
        return pack_int8(modules)

    def forward(self, module, x: torch.Tensor) -> torch.Tensor:
        if x.numel() // x.shape[-1] <= MAX_ROWS:
            return w8_forward(module, x)
        return reference_forward(module, x)
