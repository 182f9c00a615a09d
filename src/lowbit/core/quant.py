"""Uniform affine quantization, as the textbook writes it.

For a range [a, b] that contains 0 and k bits:
    s = (b - a) / (2^k - 1)          scale (step size)
    z = -round(a / s)                zero point (0 for symmetric)
    Q = clamp(round(x / s) + z, qmin, qmax)
    x̂ = s * (Q - z),                 |x - x̂| <= s / 2 for x in [a, b]

Asymmetric: a = min(min x, 0), b = max(max x, 0), codes in [0, 2^k - 1].
Symmetric:  a = -max|x|, b = max|x|, z = 0, codes in [-2^(k-1), 2^(k-1) - 1].

Scales are stored in `scheme.scale_dtype` and rounded *up* to it, so the stored
scale s' >= s still covers [a, b] and the s'/2 bound holds with the stored value.
Codes are always computed with the stored scale: what is saved is what is used.

Shapes: weights are [rows, cols] = [out_features, in_features]; groups run along
cols. Internally a tensor is viewed as [R, G, g] (R rows of G groups of g
columns); a short last group is padded by repeating the row's last column, which
changes neither its min nor its max, and the padding is cut off again.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .scheme import Scheme


@dataclass
class QTensor:
    """Integer codes plus the parameters that map them back to floats."""

    codes: torch.Tensor  # [rows, cols] int8 (symmetric) or uint8 (asymmetric), textbook range
    scale: torch.Tensor  # [R, G] in scheme.scale_dtype; R in {1, rows}
    zero: torch.Tensor | None  # [R, G] int16, None for symmetric
    scheme: Scheme
    shape: torch.Size  # original shape of the float tensor


def _as_2d(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 0:
        return x.reshape(1, 1)
    if x.dim() == 1:
        return x.reshape(1, -1)
    return x.reshape(-1, x.shape[-1])


def grouped(x2: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """[rows, cols] -> [R, G, g]: the view on which per-group statistics are taken."""
    rows, cols = x2.shape
    if scheme.granularity == "tensor":
        return x2.reshape(1, 1, rows * cols)
    g = scheme.group_len(cols)
    n_groups = scheme.n_groups(cols)
    pad = n_groups * g - cols
    if pad:
        x2 = torch.cat([x2, x2[:, -1:].expand(rows, pad)], dim=1)
    return x2.reshape(rows, n_groups, g)


def ungrouped(xg: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of `grouped` (drops the padding)."""
    return xg.reshape(rows, -1)[:, :cols]


def round_scale_up(s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Smallest value of `dtype` that is >= s (s > 0). Returns a tensor of `dtype`."""
    stored = s.to(dtype)
    low = stored.float() < s
    if low.any():
        stored = torch.where(low, torch.nextafter(stored, torch.full_like(stored, float("inf"))), stored)
    if not torch.isfinite(stored).all():
        raise ValueError(f"scale overflows {dtype}: max |x| too large for the scale dtype")
    return stored


def compute_qparams(x: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min/max scale and zero point of `x` under `scheme`: ([R, G] scale, [R, G] zero or None)."""
    xg = grouped(_as_2d(x).float(), scheme)
    if scheme.symmetric:
        m = xg.abs().amax(dim=-1)
        a, b = -m, m
    else:
        a = xg.amin(dim=-1).clamp(max=0.0)
        b = xg.amax(dim=-1).clamp(min=0.0)
    s = (b - a) / (scheme.levels - 1)
    s = torch.where(s > 0, s, torch.ones_like(s))  # all-zero group: any positive scale is exact
    s = round_scale_up(s, scheme.torch_scale_dtype)
    if scheme.symmetric:
        return s, None
    z = (-torch.round(a / s.float())).clamp(0, scheme.qmax).to(torch.int16)
    return s, z


def quantize_codes(xg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: Scheme) -> torch.Tensor:
    """Codes of a grouped tensor [R, G, g] (any float dtype) -> int32 [R, G, g]."""
    q = torch.round(xg.float() / scale.float().unsqueeze(-1))
    if zero is not None:
        q = q + zero.unsqueeze(-1).float()
    return q.clamp(scheme.qmin, scheme.qmax).to(torch.int32)


def quantize(
    x: torch.Tensor,
    scheme: Scheme,
    scale: torch.Tensor | None = None,
    zero: torch.Tensor | None = None,
) -> QTensor:
    """Quantize `x` (weights: [out, in]). scale/zero default to min/max (RTN)."""
    if scale is None:
        scale, zero = compute_qparams(x, scheme)
    x2 = _as_2d(x)
    rows, cols = x2.shape
    q = quantize_codes(grouped(x2, scheme), scale, zero, scheme)
    code_dtype = torch.int8 if scheme.symmetric else torch.uint8
    codes = ungrouped(q, rows, cols).to(code_dtype)
    return QTensor(codes=codes, scale=scale, zero=zero, scheme=scheme, shape=x.shape)


def dequantize_grouped(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """x̂ = s * (Q - z) on grouped codes [R, G, g] -> float32 [R, G, g]."""
    qf = q.float()
    if zero is not None:
        qf = qf - zero.unsqueeze(-1).float()
    return qf * scale.float().unsqueeze(-1)


def dequantize(qt: QTensor) -> torch.Tensor:
    """float32 tensor of the original shape."""
    rows, cols = qt.codes.shape
    qg = grouped(qt.codes, qt.scheme)
    x = dequantize_grouped(qg, qt.scale, qt.zero)
    return ungrouped(x, rows, cols).reshape(qt.shape)


class _FakeQuantSTE(torch.autograd.Function):
    """Forward: dequantize(quantize(x)). Backward: straight-through, clipped.

    The gradient passes unchanged where round(x/s) + z lies inside [qmin, qmax]
    and is zero where the code was clamped (outside the representable range).
    """

    @staticmethod
    def forward(ctx, x, scale, zero, scheme):  # type: ignore[override]
        x2 = _as_2d(x)
        rows, cols = x2.shape
        xg = grouped(x2, scheme)
        raw = torch.round(xg.float() / scale.float().unsqueeze(-1))
        if zero is not None:
            raw = raw + zero.unsqueeze(-1).float()
        inside = (raw >= scheme.qmin) & (raw <= scheme.qmax)
        q = raw.clamp(scheme.qmin, scheme.qmax)
        xq = dequantize_grouped(q, scale, zero)
        ctx.save_for_backward(ungrouped(inside, rows, cols).reshape(x.shape))
        return ungrouped(xq, rows, cols).reshape(x.shape).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return grad * inside.to(grad.dtype), None, None, None


def fake_quantize(
    x: torch.Tensor,
    scheme: Scheme,
    scale: torch.Tensor | None = None,
    zero: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize-dequantize with a straight-through gradient (for QAT)."""
    if scale is None:
        with torch.no_grad():
            scale, zero = compute_qparams(x.detach(), scheme)
    return _FakeQuantSTE.apply(x, scale, zero, scheme)


def pair_sums(t: torch.Tensor) -> torch.Tensor:
    """|t[:, 2j]| + |t[:, 2j+1]| ([rows, ceil(cols/2)]: int32 for integer codes, float32 for floats; an odd
    last column pairs with 0). Weight codes whose pair sums stay <= 128 run exactly on AVX2's u8 x s8
    instruction (nn/int8.pair_bounded_qtensor, kernels/int8.kernel_for)."""
    a = (t.float() if t.is_floating_point() else t.to(torch.int32)).abs()
    if a.shape[1] % 2:
        a = torch.cat([a, torch.zeros_like(a[:, :1])], dim=1)
    return a[:, 0::2] + a[:, 1::2]
