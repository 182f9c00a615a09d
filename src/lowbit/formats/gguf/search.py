"""Scale searches behind ggml's block quantizers, vectorized over many groups at once.

Each function takes a batch of groups ``x: [B, n]`` (float32) and returns, per group, the scale
(and min) it chose and the integer codes. They follow the searches of ggml-quants.c
(make_qx_quants, make_q3_quants, make_qkx2/3_quants, make_qp_quants) step for step, so a file
quantized here holds the same blocks llama.cpp's own quantizer would write, up to float
summation order (we sum with torch, ggml sums left to right), which can flip a near-tie
between two candidate scales in a small share of groups.

``nearest_int`` in ggml rounds half to even (it adds 1.5*2^23 in float32): ``torch.round``.
"""

from __future__ import annotations

import numpy as np
import torch

GROUP_MAX_EPS = 1e-15


def f32(v: float) -> float:
    """A scalar computed the way C computes it in float32."""
    return float(np.float32(v))


def seqsum(t: torch.Tensor) -> torch.Tensor:
    """Sum over dim 1 left to right in float32, as ggml's C loops do (torch.sum's pairwise order rounds
    differently, and the least-squares fits below are sensitive enough for that to change a block)."""
    cols = t.t().contiguous()
    acc = cols[0].clone()
    for c in cols[1:]:
        acc += c
    return acc


_wsum = seqsum


def cdiv(c: float, t: torch.Tensor) -> torch.Tensor:
    """c / t with one rounding, as C's float division (torch computes ``c / t`` as ``c * (1 / t)``)."""
    return torch.full_like(t, c) / t


def signed_absmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The element of largest |x| per group (first one on ties), and its |x|."""
    idx = x.abs().argmax(dim=1, keepdim=True)
    mx = x.gather(1, idx).squeeze(1)
    return mx, mx.abs()


def qx_quants(x: torch.Tensor, nmax: int, qw: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric codes in [0, 2*nmax) around nmax; weighted least-squares scale, 19 candidate steps.

    ggml's make_qx_quants with rmse_type 1 (weights x^2 when ``qw`` is None). Returns (scale [B], L [B, n]).
    """
    w = x * x if qw is None else qw
    mx, amax = signed_absmax(x)
    zero = amax < GROUP_MAX_EPS
    safe = torch.where(zero, torch.ones_like(mx), mx)

    def codes(iscale):
        return torch.round(iscale[:, None] * x).clamp_(-nmax, nmax - 1)

    iscale = cdiv(-float(nmax), safe)
    lq = codes(iscale)
    sumlx = _wsum(w * x * lq)
    suml2 = _wsum(w * lq * lq)
    scale = torch.where(suml2 != 0, sumlx / torch.where(suml2 != 0, suml2, 1), torch.zeros_like(sumlx))
    best = scale * sumlx
    L = lq
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = cdiv(-f32(f32(f32(0.1) * step) + nmax), safe)
        lq = codes(iscale)
        slx = _wsum(w * x * lq)
        sl2 = _wsum(w * lq * lq)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        L = torch.where(better[:, None], lq, L)
        scale = torch.where(better, slx / torch.where(sl2 > 0, sl2, 1), scale)
        best = torch.where(better, scale * slx, best)
    L = torch.where(zero[:, None], torch.zeros_like(L), L + nmax)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale, L.to(torch.uint8)


def q3_quants(x: torch.Tensor, nmax: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's make_q3_quants with do_rmse: round at -nmax/max, then up to 5 passes of coordinate descent
    on the weighted (x^2) least-squares objective. Returns (scale [B], L [B, n] in [0, 2*nmax))."""
    mx, amax = signed_absmax(x)
    zero = amax < GROUP_MAX_EPS
    safe = torch.where(zero, torch.ones_like(mx), mx)
    L = torch.round(cdiv(-float(nmax), safe)[:, None] * x).clamp_(-nmax, nmax - 1)
    w = x * x
    sumlx = _wsum(w * x * L)
    suml2 = _wsum(w * L * L)
    L, sumlx, suml2 = _refine(x, w, L, sumlx, suml2, -nmax, nmax - 1, qp_style=False)
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, 1), torch.zeros_like(sumlx))
    L = torch.where(zero[:, None], torch.zeros_like(L), L + nmax)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale, L.to(torch.uint8)


def affine_quants(
    x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes in [0, nmax] with a scale and a min <= 0, chosen by weighted error over nstep+1 candidate
    ranges, each refit by weighted least squares (ggml's make_qkx2_quants / make_qkx3_quants).

    Returns (scale [B], the_min [B] = -min >= 0, L [B, n])."""
    mn = x.min(dim=1).values.clamp(max=0)
    mx = x.max(dim=1).values
    flat = mx <= mn
    rng = torch.where(flat, torch.ones_like(mx), mx - mn)
    sum_w = _wsum(w)
    sum_x = _wsum(w * x)

    def err(scale, mins, L):
        d = scale[:, None] * L + mins[:, None] - x
        return _wsum(w * (d.abs() if use_mad else d * d))

    iscale = cdiv(float(nmax), rng)
    scale = 1.0 / iscale
    L = torch.round(iscale[:, None] * (x - mn[:, None])).clamp_(0, nmax)
    best = err(scale, mn, L)
    for step in range(nstep + 1):
        # as in ggml, the range uses the min of the best fit so far
        rng = torch.where(flat, torch.ones_like(mx), mx - mn)
        iscale = cdiv(f32(f32(f32(rmin) + f32(f32(rdelta) * step)) + nmax), rng)
        La = torch.round(iscale[:, None] * (x - mn[:, None])).clamp_(0, nmax)
        sum_l = _wsum(w * La)
        sum_l2 = _wsum(w * La * La)
        sum_xl = _wsum(w * La * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Ds = torch.where(ok, D, 1)
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / Ds
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
        pos = this_min > 0
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(pos, sum_xl / torch.where(sum_l2 != 0, sum_l2, 1), this_scale)
        cur = err(this_scale, this_min, La)
        better = ok & (cur < best)
        L = torch.where(better[:, None], La, L)
        best = torch.where(better, cur, best)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    L = torch.where(flat[:, None], torch.zeros_like(L), L)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    return scale, -mn, L.to(torch.uint8)


def qp_quants(x: torch.Tensor, nmax: int, qw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative values (sub-block scales or mins) to codes in [0, nmax] under one scale:
    ggml's make_qp_quants (8 candidate scales, then 5 passes of coordinate descent). Returns (scale, L)."""
    mx = x.max(dim=1).values.clamp(min=0)
    zero = mx < GROUP_MAX_EPS
    safe = torch.where(zero, torch.ones_like(mx), mx)
    iscale = cdiv(float(nmax), safe)
    L = torch.round(iscale[:, None] * x)
    scale = 1.0 / iscale
    best = _wsum(qw * (x - scale[:, None] * L) ** 2)
    for step in range(-4, 5):
        if step == 0:
            continue
        isc = cdiv(f32(f32(f32(0.1) * step) + nmax), safe)
        sc = 1.0 / isc
        lq = torch.round(isc[:, None] * x).clamp_(max=nmax)
        mse = _wsum(qw * (x - sc[:, None] * lq) ** 2)
        better = mse < best
        best = torch.where(better, mse, best)
        iscale = torch.where(better, isc, iscale)
    L = torch.round(iscale[:, None] * x).clamp_(max=nmax)
    sumlx = _wsum(qw * x * L)
    suml2 = _wsum(qw * L * L)
    L, sumlx, suml2 = _refine(x, qw, L, sumlx, suml2, None, nmax, qp_style=True)
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, 1), torch.zeros_like(sumlx))
    L = torch.where(zero[:, None], torch.zeros_like(L), L)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale, L.to(torch.uint8)


def _refine(x, w, L, sumlx, suml2, lo, hi, qp_style: bool):
    """Up to 5 passes of ggml's coordinate descent on the weighted least-squares fit of one scale:
    each code in turn moves to round(x·Σwl²/Σwxl) (without itself) if that raises (Σwxl)²/Σwl².
    make_q3_quants (qp_style False) and make_qp_quants (True) differ only in their guards."""
    for _ in range(5):
        changed_any = torch.zeros(x.shape[0], dtype=torch.bool)
        for i in range(x.shape[1]):
            wi, xi, li = w[:, i], x[:, i], L[:, i]
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            ok = (slx > 0) & (sl2 > 0) if qp_style else slx > 0
            new_l = torch.round(xi * sl2 / torch.where(ok, slx, 1)).clamp_(lo, hi)
            slx2 = slx + wi * xi * new_l
            sl22 = sl2 + wi * new_l * new_l
            take = ok & (new_l != li) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            if not qp_style:
                take &= sl22 > 0
            L[:, i] = torch.where(take, new_l, li)
            sumlx = torch.where(take, slx2, sumlx)
            suml2 = torch.where(take, sl22, suml2)
            changed_any |= take
        if not bool(changed_any.any()):
            break
    return L, sumlx, suml2
