"""W4 weight-only: torch's CPU int4 matmul (`_weight_int4pack_mm_for_cpu`).

The kernel multiplies a float x [M, K] by a weight packed from unsigned 4-bit
codes u [N, K] in groups of G input columns (G in 32, 64, 128, 256), with

    w[n, k] = (u[n, k] - 8) * scale[k // G, n] + zero[k // G, n]

lowbit's codes are u = Q - qmin and w = s (u - z_u), so per lowbit group
    symmetric  (z_u = 8):   scale = s, zero = 0
    asymmetric (z_u = z):   scale = s, zero = s (8 - z)
A lowbit group of g columns (the last one possibly shorter) is cut into g / G
kernel groups that repeat its scale, with G the largest allowed size dividing
both g and K; so g128 on K = 576 runs with G = 64. Packing is done once per
module (kept in module.kstate.packed). Rounding differs from the reference (the kernel adds the
zero term instead of subtracting z before scaling), hence a float tolerance in
the equivalence test.

On an AVX2 CPU the kernel is fast only with bfloat16 activations and few rows: with
float32 activations it falls to a slow generic loop, and at hundreds of rows it is
slower than the fp32 matmul even in bf16. So the dispatch sends at most MAX_ROWS rows (decoding) here,
in bfloat16 (activations rounded to bf16, fp32 accumulation inside the kernel),
and larger batches (prefill, evaluation) to the reference path.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .reference import Kernel, qlinear_forward as reference_forward

KERNEL_GROUPS = (256, 128, 64, 32)
MAX_ROWS = 16  # rows of x up to which the kernel beats dequantize + fp32 matmul here


def kernel_group(module) -> int | None:
    """The kernel group size for this module (4-bit, or 8-bit as two 4-bit halves), or None if the
    kernel cannot run it."""
    s = module.scheme
    if s.bits not in (4, 8) or s.granularity == "tensor" or not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return None
    K = module.in_features
    if module.out_features % 16:  # the packer tiles output rows by 16
        return None
    g = s.group_len(K)
    for G in KERNEL_GROUPS:
        if K % G == 0 and g % G == 0:
            return G
    return None


CHUNK_ROWS = 4096  # rows converted to int32 and packed at a time (a multiple of the packer's 32-row blocks)


def _pack_rows(modules, transform=lambda u: [u]) -> torch.Tensor:
    """The kernel's packed weight of the modules' unsigned codes u = Q - qmin, stacked along the rows.
    `transform` maps codes to the 4-bit parts that go into the packed rows ([u], or [hi, lo] of 8-bit
    codes: [all hi rows; all lo rows]). Codes stay uint8 until packing, which converts CHUNK_ROWS
    rows at a time: no int32 copy of a whole large weight (lm_head: 113 MB as int32)."""
    from ..core.packing import unpack

    codes = torch.cat([unpack(m.qweight, m.scheme.bits, m.in_features) for m in modules])  # uint8 [N, K]
    rows = torch.cat(transform(codes))
    return torch.cat([torch.ops.aten._convert_weight_to_int4pack_for_cpu(rows[a: a + CHUNK_ROWS].to(torch.int32), 1)
                      for a in range(0, rows.shape[0], CHUNK_ROWS)])


def pack_int4(modules, G: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed weight, scale-and-zero [K/G, N, 2] in `dtype`) of one module, or of several that share
    the input and the scheme, stacked along the output rows (one fused matmul: q|k|v, gate|up)."""
    modules = modules if isinstance(modules, (list, tuple)) else [modules]
    s = modules[0].scheme
    K = modules[0].in_features
    packed = _pack_rows(modules)  # codes u = Q - qmin in 0..15, [N, K] -> packed
    scales = torch.cat([m.scales for m in modules]).float()  # [N, n_groups]
    zu = torch.cat([m.zero_points() for m in modules]).float() if not s.symmetric else torch.full_like(scales, 8.0)
    zero = scales * (8.0 - zu)
    rep = s.group_len(K) // G
    # a lowbit group -> rep kernel groups; the short last group needs fewer: cut to K / G
    sc = scales.repeat_interleave(rep, dim=1)[:, : K // G]
    ze = zero.repeat_interleave(rep, dim=1)[:, : K // G]
    sz = torch.stack([sc.T, ze.T], dim=-1).contiguous().to(dtype)  # [K/G, N, 2]
    return packed, sz


def pack_int8_as_int4x2(modules, G: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit codes c = 16·hi + lo (c = Q - qmin in 0..255) as one int4 weight of twice the rows,
    [hi rows; lo rows], so that y = y[:, :N] + y[:, N:] is the 8-bit matmul:
        hi rows: scale 16s, zero 0            -> 16s·hi - 128s
        lo rows: scale s,   zero s(136 - z_u) -> s·lo + 128s - s·z_u
    summing to s(c - z_u) = s(Q - z), lowbit's 8-bit weight, read at 4-bit kernel speed."""
    modules = modules if isinstance(modules, (list, tuple)) else [modules]
    s = modules[0].scheme
    K = modules[0].in_features
    packed = _pack_rows(modules, lambda c: [c >> 4, c & 15])  # c = Q - qmin in 0..255 -> [hi rows; lo rows]
    scales = torch.cat([m.scales for m in modules]).float()  # [N, n_groups]
    zu = torch.cat([m.zero_points() for m in modules]).float() if not s.symmetric else torch.full_like(scales, -s.qmin)
    rep = s.group_len(K) // G
    sc = torch.cat([16 * scales, scales]).repeat_interleave(rep, dim=1)[:, : K // G]
    ze = torch.cat([torch.zeros_like(scales), scales * (136.0 - zu)]).repeat_interleave(rep, dim=1)[:, : K // G]
    return packed, torch.stack([sc.T, ze.T], dim=-1).contiguous().to(dtype)


def int8x2_mm(x2: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, G: int) -> torch.Tensor:
    """x2 [M, K] times an 8-bit weight packed by pack_int8_as_int4x2 -> [M, N] in x2's dtype."""
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16).contiguous(), packed, G, sz)
    n = y.shape[-1] // 2
    return (y[:, :n].float() + y[:, n:].float()).to(x2.dtype)


def int8x2_forward(module, x: torch.Tensor, G: int) -> torch.Tensor:
    cached = module.kstate.packed
    if cached is None:
        cached = module.kstate.packed = pack_int8_as_int4x2(module, G, torch.bfloat16)
    lead = x.shape[:-1]
    y = int8x2_mm(x.reshape(-1, x.shape[-1]), *cached, G)
    if module.bias is not None:
        y = y + module.bias.to(y.dtype)
    return y.reshape(*lead, module.out_features)


def int4_mm(x2: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, G: int) -> torch.Tensor:
    """x2 [M, K] (any float dtype) times a packed weight -> [M, N] in x2's dtype (bf16 inside)."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16).contiguous(), packed, G, sz).to(x2.dtype)


def int4_forward(module, x: torch.Tensor, G: int) -> torch.Tensor:
    dtype = torch.bfloat16  # the kernel's fast path (see the module docstring)
    cached = module.kstate.packed
    if cached is None:
        cached = module.kstate.packed = pack_int4(module, G, dtype)
    packed, sz = cached
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).to(dtype)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), packed, G, sz)
    if module.bias is not None:
        y = y + module.bias.to(dtype)
    return y.to(x.dtype).reshape(*lead, module.out_features)


@dataclass(frozen=True, repr=True)
class Int4Kernel(Kernel):
    """4-bit codes through torch's int4 matmul with kernel groups of `group` columns (decode-sized inputs)."""

    group: int
    name = "int4"

    def pack(self, modules) -> tuple[torch.Tensor, torch.Tensor]:
        return pack_int4(modules, self.group, torch.bfloat16)

    def forward(self, module, x: torch.Tensor) -> torch.Tensor:
        if x.numel() // x.shape[-1] <= MAX_ROWS:
            return int4_forward(module, x, self.group)
        return reference_forward(module, x)


@dataclass(frozen=True, repr=True)
class Int8x2Kernel(Kernel):
    """8-bit codes as two 4-bit halves through torch's int4 matmul (decode-sized inputs)."""

    group: int
    name = "int8x2"

    def pack(self, modules) -> tuple[torch.Tensor, torch.Tensor]:
        return pack_int8_as_int4x2(modules, self.group, torch.bfloat16)

    def forward(self, module, x: torch.Tensor) -> torch.Tensor:
        if x.numel() // x.shape[-1] <= MAX_ROWS:
            return int8x2_forward(module, x, self.group)
        return reference_forward(module, x)
