"""llama.cpp's tensor types, one class per type: float rows in, the exact block bytes out.

Every class writes the block layout of ggml (ggml-common.h) for rows whose length is a multiple
of its block size. ``quantize(x, qw)`` takes ``x: [rows, cols]`` float32 and optionally ``qw:
[cols]``, an importance per input column (Σx² from calibration, llama.cpp's "imatrix"); it
returns ``uint8 [rows, cols // block_size * type_size]``.

Without ``qw`` each type follows ggml's reference quantizer (the one `llama-quantize` runs without
an imatrix); the legacy types (Q4_0 … Q8_0) then equal gguf-py's `quantize` byte for byte. With
``qw`` each type runs ggml's importance-weighted search (quantize_row_*_impl), fed with lowbit's
activation statistics. Decoding is gguf-py's `dequantize`, the reference the tests hold us to.

Block layouts (little-endian; "d" = fp16 super-scale, L = integer code per weight):
  Q8_0  34 B / 32 w : d | int8 q[32]                                     w = d*q
  Q4_0  18 B / 32 w : d | qs[16]: q[j] low nibble, q[j+16] high nibble    w = d*(q-8)
  Q4_1  20 B / 32 w : d | m | qs[16]                                       w = d*q + m
  Q5_0  22 B / 32 w : d | qh u32 (bit j = bit 4 of q[j]) | qs[16]          w = d*(q-16)
  Q5_1  24 B / 32 w : d | m | qh | qs[16]                                  w = d*q + m
  Q2_K  84 B / 256 w: scales[16] (lo nibble scale, hi nibble min, per 16 w) | qs[64] (2-bit, 4 planes:
                      byte 32h+l holds L[128h+l+32p] at bits 2p) | d | dmin   w = d*sc*L - dmin*m
  Q3_K 110 B / 256 w: hmask[32] (bit p of byte l = bit 2 of L[32p+l]) | qs[64] as Q2_K (low 2 bits) |
                      scales[12] (16 six-bit values: low nibbles in bytes 0-7 (j, j+8 share a byte),
                      high 2 bits in bytes 8-11 at bit 2*(j//4) of byte 8+j%4) | d
                      w = d*(sc-32)*(L-4)
  Q4_K 144 B / 256 w: d | dmin | scales[12] (8 six-bit scales sc and mins m per 32 w: bytes 0-3 = sc[0:4],
                      4-7 = m[0:4], 8-11 = low nibbles of sc[4:8] | m[4:8] << 4, top 2 bits of sc[4:8] /
                      m[4:8] in bits 6-7 of bytes 0-3 / 4-7) | qs[128] (byte 32c+l: L[64c+l] low nibble,
                      L[64c+32+l] high nibble)                            w = d*sc*L - dmin*m
  Q5_K 176 B / 256 w: d | dmin | scales[12] as Q4_K | qh[32] (byte l, bits 2c / 2c+1 = bit 4 of
                      L[64c+l] / L[64c+32+l]) | qs[128] as Q4_K (low 4 bits)
  Q6_K 210 B / 256 w: ql[128] (byte 64h+l: L[128h+l] | L[128h+64+l] << 4; byte 64h+32+l: L[128h+32+l] |
                      L[128h+96+l] << 4, low 4 bits each) | qh[64] (byte 32h+l: bits 2p..2p+1 = top 2 bits
                      of L[128h+32p+l]) | int8 scales[16] | d          w = d*sc*(L-32)
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from .search import affine_quants, cdiv, q3_quants, qp_quants, qx_quants, seqsum

QK_K = 256


def _fp16_bytes(v: torch.Tensor) -> torch.Tensor:
    """[N] float -> [N, 2] uint8 (fp16, round to nearest even as ggml's GGML_FP32_TO_FP16)."""
    return v.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def _fp16(v: torch.Tensor) -> torch.Tensor:
    return v.to(torch.float16).to(torch.float32)


def _nibbles(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    return (lo.to(torch.uint8) & 15) | ((hi.to(torch.uint8) & 15) << 4)


def _bits_u32(bits: torch.Tensor) -> torch.Tensor:
    """[N, 32] of 0/1 -> [N, 4] uint8: a little-endian uint32 whose bit j is bits[:, j]."""
    b = bits.to(torch.uint8).reshape(-1, 4, 8)
    shifts = torch.arange(8, dtype=torch.uint8)
    return (b << shifts).sum(dim=2, dtype=torch.uint8)


def _row_sigma2(x: torch.Tensor) -> torch.Tensor:
    """Mean x² of each row (ggml's sigma2 for the legacy weighted quantizers)."""
    return seqsum(x * x) / x.shape[1]


class GGMLType:
    """One llama.cpp tensor type. Subclasses set the constants and ``_quantize``."""

    name: str
    qtype: T
    block_size: int
    type_size: int
    chunk_rows: int = 256

    @classmethod
    def row_bytes(cls, cols: int) -> int:
        return cols // cls.block_size * cls.type_size

    @classmethod
    def fits(cls, cols: int) -> bool:
        return cols % cls.block_size == 0

    @classmethod
    def _inputs(cls, x, qw):
        """float32 [rows, cols] rows, the importance as [cols] (or None), and the rows per chunk."""
        x = torch.as_tensor(x, dtype=torch.float32)
        if x.dim() == 1:
            x = x[None]
        cols = x.shape[1]
        if not cls.fits(cols):
            raise ValueError(f"{cls.name}: row length {cols} is not a multiple of {cls.block_size}")
        if qw is not None:
            qw = torch.as_tensor(qw, dtype=torch.float32).reshape(cols)
        return x, qw, max(1, cls.chunk_rows * 4096 // max(cols, 1))

    @classmethod
    def quantize(cls, x: torch.Tensor | np.ndarray, qw: torch.Tensor | np.ndarray | None = None) -> np.ndarray:
        x, qw, step = cls._inputs(x, qw)
        rows, cols = x.shape
        out = np.empty((rows, cls.row_bytes(cols)), dtype=np.uint8)
        for r in range(0, rows, step):
            chunk = x[r : r + step].contiguous()
            out[r : r + step] = cls._quantize(chunk, qw).reshape(chunk.shape[0], -1).numpy()
        return out

    @classmethod
    def _quantize(cls, x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
        P, L = cls._fit(x, qw)
        return cls._pack(P, L)

    # Quantized types split into: _fit (block parameters P and codes L of [rows, cols] floats, as ggml),
    # _pack (P, L -> bytes) and _grid (P -> the per-weight grid ŵ = a·L + c, L in [lo, hi]).
    @classmethod
    def _fit(cls, x: torch.Tensor, qw: torch.Tensor | None) -> tuple[dict, torch.Tensor]:
        raise NotImplementedError

    @classmethod
    def _pack(cls, P: dict, L: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def _grid(cls, P: dict) -> tuple[torch.Tensor, torch.Tensor, int, int, int]:
        """(a [NB, n_sub], c [NB, n_sub], weights per sub-block, lo, hi)."""
        raise NotImplementedError

    @classmethod
    def quantize_gptq(cls, x: torch.Tensor, H: torch.Tensor, qw: torch.Tensor | None = None,
                      blocksize: int = 128, percdamp: float = 0.01) -> np.ndarray:
        """Blocks whose scales/mins are chosen as ``quantize`` does, then whose codes are chosen by GPTQ
        against the exact stored grid (scales and mins already rounded to fp16 and 6/4 bits), with
        H = E[x xᵀ] of the layer's input: each column's rounding error is compensated in the columns
        after it."""
        from .gptq import gptq_on_grid

        x, qw, step = cls._inputs(x, qw)
        rows, cols = x.shape
        fits = [cls._fit(x[r: r + step].contiguous(), qw) for r in range(0, rows, step)]
        P = {k: torch.cat([f[0][k] for f in fits]) for k in fits[0][0]}
        L0 = torch.cat([f[1].reshape(-1, cls.block_size) for f in fits])
        a, c, sub, lo, hi = cls._grid(P)
        a = a.repeat_interleave(sub, dim=1).reshape(rows, cols)
        c = c.repeat_interleave(sub, dim=1).reshape(rows, cols)
        L = gptq_on_grid(x, H, a, c, lo, hi, L0.reshape(rows, cols).float(), blocksize, percdamp)
        return cls._pack(P, L.reshape(-1, cls.block_size)).reshape(rows, -1).numpy()


# ----------------------------------------------------------------------------- float types


class F32(GGMLType):
    name, qtype, block_size, type_size = "F32", T.F32, 1, 4

    @classmethod
    def _quantize(cls, x, qw):
        return x.contiguous().view(torch.uint8)


class F16(GGMLType):
    name, qtype, block_size, type_size = "F16", T.F16, 1, 2

    @classmethod
    def _quantize(cls, x, qw):
        return x.to(torch.float16).contiguous().view(torch.uint8)


class BF16(GGMLType):
    name, qtype, block_size, type_size = "BF16", T.BF16, 1, 2

    @classmethod
    def _quantize(cls, x, qw):
        # ggml_compute_fp32_to_bf16: NaN kept quiet, otherwise round to nearest even
        n = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        nan = (n & 0x7FFFFFFF) > 0x7F800000
        r = (n + (0x7FFF + ((n >> 16) & 1))) >> 16
        r = torch.where(nan, ((n >> 16) & 0xFFFF) | 64, r) & 0xFFFF
        return r.to(torch.int32).to(torch.int16).contiguous().view(torch.uint8)


# ----------------------------------------------------------------------------- 32-weight blocks


class Q8_0(GGMLType):
    name, qtype, block_size, type_size = "Q8_0", T.Q8_0, 32, 34

    @classmethod
    def _fit(cls, x, qw):  # no importance-weighted variant in ggml
        b = x.reshape(-1, 32)
        d = b.abs().max(dim=1).values / 127
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / torch.where(d == 0, 1, d))
        v = b * inv[:, None]
        q = torch.sign(v) * torch.floor(v.abs() + 0.5)  # roundf: half away from zero
        return {"d": d}, q

    @classmethod
    def _pack(cls, P, L):
        return torch.cat([_fp16_bytes(P["d"]), L.to(torch.int8).view(torch.uint8)], dim=1)

    @classmethod
    def _grid(cls, P):
        a = _fp16(P["d"])[:, None]
        return a, torch.zeros_like(a), 32, -127, 127


class Q4_0(GGMLType):
    name, qtype, block_size, type_size = "Q4_0", T.Q4_0, 32, 18

    @classmethod
    def _fit(cls, x, qw):
        if qw is not None:
            w = qw.repeat(x.shape[0]).reshape(-1, 32) * torch.sqrt(_row_sigma2(x).repeat_interleave(x.shape[1] // 32)[:, None] + x.reshape(-1, 32) ** 2)
            d, L = qx_quants(x.reshape(-1, 32), 8, w)
            return {"d": d}, L
        b = x.reshape(-1, 32)
        mx = b.gather(1, b.abs().argmax(dim=1, keepdim=True)).squeeze(1)
        d = mx / -8
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / torch.where(d == 0, 1, d))
        q = torch.trunc(b * inv[:, None] + 8.5).clamp_(0, 15)
        return {"d": d}, q

    @classmethod
    def _pack(cls, P, L):
        return torch.cat([_fp16_bytes(P["d"]), _nibbles(L[:, :16], L[:, 16:])], dim=1)

    @classmethod
    def _grid(cls, P):
        a = _fp16(P["d"])[:, None]
        return a, -8 * a, 32, 0, 15


class Q4_1(GGMLType):
    name, qtype, block_size, type_size = "Q4_1", T.Q4_1, 32, 20
    nmax = 15

    @classmethod
    def _codes(cls, x, qw):
        b = x.reshape(-1, 32)
        if qw is not None:
            w = qw.repeat(x.shape[0]).reshape(-1, 32) * torch.sqrt(_row_sigma2(x).repeat_interleave(x.shape[1] // 32)[:, None] + b * b)
            d, neg_min, L = affine_quants(b, w, cls.nmax, -0.9, 0.05, 36, False)
            return d, -neg_min, L
        lo = b.min(dim=1).values
        hi = b.max(dim=1).values
        d = (hi - lo) / cls.nmax
        inv = torch.where(d == 0, torch.zeros_like(d), 1 / torch.where(d == 0, 1, d))
        q = torch.trunc((b - lo[:, None]) * inv[:, None] + 0.5).clamp_(0, cls.nmax)
        return d, lo, q

    @classmethod
    def _fit(cls, x, qw):
        d, m, q = cls._codes(x, qw)
        return {"d": d, "m": m}, q

    @classmethod
    def _pack(cls, P, L):
        return torch.cat([_fp16_bytes(P["d"]), _fp16_bytes(P["m"]), _nibbles(L[:, :16], L[:, 16:])], dim=1)

    @classmethod
    def _grid(cls, P):
        return _fp16(P["d"])[:, None], _fp16(P["m"])[:, None], 32, 0, cls.nmax


class Q5_0(GGMLType):
    name, qtype, block_size, type_size = "Q5_0", T.Q5_0, 32, 22

    @classmethod
    def _fit(cls, x, qw):
        b = x.reshape(-1, 32)
        if qw is not None:
            w = qw.repeat(x.shape[0]).reshape(-1, 32) * torch.sqrt(_row_sigma2(x).repeat_interleave(x.shape[1] // 32)[:, None] + b * b)
            d, q = qx_quants(b, 16, w)
        else:
            mx = b.gather(1, b.abs().argmax(dim=1, keepdim=True)).squeeze(1)
            d = mx / -16
            inv = torch.where(d == 0, torch.zeros_like(d), 1 / torch.where(d == 0, 1, d))
            q = torch.trunc(b * inv[:, None] + 16.5).clamp_(0, 31)
        return {"d": d}, q

    @classmethod
    def _pack(cls, P, L):
        q = L.to(torch.uint8)
        return torch.cat([_fp16_bytes(P["d"]), _bits_u32(q >> 4), _nibbles(q[:, :16], q[:, 16:])], dim=1)

    @classmethod
    def _grid(cls, P):
        a = _fp16(P["d"])[:, None]
        return a, -16 * a, 32, 0, 31


class Q5_1(Q4_1):
    name, qtype, block_size, type_size = "Q5_1", T.Q5_1, 32, 24
    nmax = 31

    @classmethod
    def _pack(cls, P, L):
        q = L.to(torch.uint8)
        return torch.cat([_fp16_bytes(P["d"]), _fp16_bytes(P["m"]), _bits_u32(q >> 4), _nibbles(q[:, :16], q[:, 16:])], dim=1)


# ----------------------------------------------------------------------------- K-quants (256-weight super-blocks)


def _planes_2bit(L: torch.Tensor) -> torch.Tensor:
    """[NB, 256] codes 0..3 -> [NB, 64]: byte 32h+l = Σ_p L[128h+32p+l] << 2p."""
    v = L.to(torch.uint8).reshape(-1, 2, 4, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)
    return (v << shifts).sum(dim=2, dtype=torch.uint8).reshape(-1, 64)


def _pack_scales_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """8 six-bit scales and 8 six-bit mins -> the 12 bytes of Q4_K/Q5_K."""
    ls, lm = ls.to(torch.uint8), lm.to(torch.uint8)
    a = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    b = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    c = (ls[:, 4:] & 15) | ((lm[:, 4:] & 15) << 4)
    return torch.cat([a, b, c], dim=1)


def _pack_scales_q3(l6: torch.Tensor) -> torch.Tensor:
    """16 six-bit values -> the 12 bytes of Q3_K."""
    l6 = l6.to(torch.uint8)
    lo = (l6[:, :8] & 15) | ((l6[:, 8:] & 15) << 4)
    hi2 = (l6 >> 4).reshape(-1, 4, 4)  # [NB, g = j//4, k = j%4]
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 4, 1)
    hi = (hi2 << shifts).sum(dim=1, dtype=torch.uint8)
    return torch.cat([lo, hi], dim=1)


def _superblocks(x: torch.Tensor, qw: torch.Tensor | None):
    xb = x.reshape(-1, QK_K)
    qb = None if qw is None else qw.reshape(1, -1).expand(x.shape[0], -1).reshape(-1, QK_K)
    return xb, qb


def _requant_affine(xb, d, sc, dmin, m, L, sub, nmax):
    """Codes again from the stored (fp16 x 6/4-bit) scale and min; groups whose scale is 0 keep theirs."""
    dj = (d[:, None] * sc).repeat_interleave(sub, dim=1)
    mj = (dmin[:, None] * m).repeat_interleave(sub, dim=1)
    new = torch.round((xb + mj) / torch.where(dj == 0, 1, dj)).clamp_(0, nmax)
    return torch.where(dj == 0, L.to(new.dtype), new)


def _requant_sym(xb, d, sc, L, sub, lo, hi):
    dj = (d[:, None] * sc).repeat_interleave(sub, dim=1)
    new = torch.round(xb / torch.where(dj == 0, 1, dj)).clamp_(lo, hi) - lo
    return torch.where(dj == 0, L.to(new.dtype), new)


class Q2_K(GGMLType):
    name, qtype, block_size, type_size = "Q2_K", T.Q2_K, QK_K, 84

    @classmethod
    def _fit(cls, x, qw):
        xb, qb = _superblocks(x, qw)
        nb = xb.shape[0]
        g = xb.reshape(-1, 16)
        if qb is None:
            scales, mins, L = affine_quants(g, g.abs(), 3, -0.5, 0.1, 15, True)
            scales, mins = scales.reshape(nb, 16), mins.reshape(nb, 16)
            max_scale = scales.max(dim=1).values.clamp(min=0)
            max_min = mins.max(dim=1).values.clamp(min=0)
            pos_s, pos_m = max_scale > 0, max_min > 0
            ls = torch.where(pos_s[:, None], torch.round(cdiv(15.0, torch.where(pos_s, max_scale, 1))[:, None] * scales), 0)
            lm = torch.where(pos_m[:, None], torch.round(cdiv(15.0, torch.where(pos_m, max_min, 1))[:, None] * mins), 0)
            d = torch.where(pos_s, max_scale / 15.0, 0)
            dmin = torch.where(pos_m, max_min / 15.0, 0)
        else:
            sigma2 = seqsum(xb * xb) / QK_K
            w = qb * torch.sqrt(sigma2[:, None] + xb * xb)
            wg = w.reshape(-1, 16)
            scales, mins, L = affine_quants(g, wg, 3, -0.9, 0.05, 36, False)
            sw = seqsum(wg).reshape(nb, 16)
            d, ls = qp_quants(scales.reshape(nb, 16), 15, sw)
            dmin, lm = qp_quants(mins.reshape(nb, 16), 15, sw)
        ls, lm = ls.to(torch.uint8) & 15, lm.to(torch.uint8) & 15
        d16, dmin16 = _fp16(d), _fp16(dmin)
        L = _requant_affine(xb, d16, ls.float(), dmin16, lm.float(), L.reshape(nb, QK_K), 16, 3)
        return {"d": d, "dmin": dmin, "ls": ls, "lm": lm}, L

    @classmethod
    def _pack(cls, P, L):
        return torch.cat([P["ls"] | (P["lm"] << 4), _planes_2bit(L), _fp16_bytes(P["d"]), _fp16_bytes(P["dmin"])], dim=1)

    @classmethod
    def _grid(cls, P):
        return _fp16(P["d"])[:, None] * P["ls"].float(), -_fp16(P["dmin"])[:, None] * P["lm"].float(), 16, 0, 3


class Q3_K(GGMLType):
    name, qtype, block_size, type_size = "Q3_K", T.Q3_K, QK_K, 110

    @classmethod
    def _fit(cls, x, qw):
        xb, qb = _superblocks(x, qw)
        nb = xb.shape[0]
        g = xb.reshape(-1, 16)
        if qb is None:
            scales, L = q3_quants(g, 4)
            scales = scales.reshape(nb, 16)
            idx = scales.abs().argmax(dim=1, keepdim=True)
            max_scale = scales.gather(1, idx).squeeze(1)
            has = max_scale != 0
            iscale = cdiv(-32.0, torch.where(has, max_scale, 1))
            l6 = torch.round(iscale[:, None] * scales).clamp_(-32, 31) + 32
            l6 = torch.where(has[:, None], l6, torch.zeros_like(l6))
            d = torch.where(has, 1 / iscale, 0)
        else:
            sigma2 = 2 * seqsum(xb * xb) / QK_K
            w = qb * torch.sqrt(sigma2[:, None] + xb * xb)
            wg = w.reshape(-1, 16)
            scales, L = qx_quants(g, 4, wg)
            d, l6 = qx_quants(scales.reshape(nb, 16), 32, seqsum(wg).reshape(nb, 16))
        l6 = l6.to(torch.uint8)
        d16 = _fp16(d)
        sc = l6.float() - 32
        L = _requant_sym(xb, d16, sc, L.reshape(nb, QK_K), 16, -4, 3)
        return {"d": d, "l6": l6}, L

    @classmethod
    def _pack(cls, P, L):
        L = L.to(torch.uint8)
        nb = L.shape[0]
        high = (L > 3).reshape(nb, 8, 32)  # bit p of hmask byte l <- element 32p + l
        hmask = (high.to(torch.uint8) << torch.arange(8, dtype=torch.uint8).reshape(1, 8, 1)).sum(dim=1, dtype=torch.uint8)
        L = torch.where(L > 3, L - 4, L)
        return torch.cat([hmask, _planes_2bit(L), _pack_scales_q3(P["l6"]), _fp16_bytes(P["d"])], dim=1)

    @classmethod
    def _grid(cls, P):
        a = _fp16(P["d"])[:, None] * (P["l6"].float() - 32)
        return a, -4 * a, 16, 0, 7


class Q4_K(GGMLType):
    name, qtype, block_size, type_size = "Q4_K", T.Q4_K, QK_K, 144
    nmax, ref_search = 15, (-1.0, 0.1, 20)

    @classmethod
    def _fit(cls, x, qw):
        """Super-block scale/min, 6-bit sub-block scales/mins, and codes 0..nmax after requantization."""
        xb, qb = _superblocks(x, qw)
        nb = xb.shape[0]
        g = xb.reshape(-1, 32)
        if qb is None:
            av_x = torch.sqrt(seqsum(g * g) / 32)
            scales, mins, L = affine_quants(g, av_x[:, None] + g.abs(), cls.nmax, *cls.ref_search, False)
            scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
            max_scale = scales.max(dim=1).values.clamp(min=0)
            max_min = mins.max(dim=1).values.clamp(min=0)
            inv_s = torch.where(max_scale > 0, cdiv(63.0, torch.where(max_scale > 0, max_scale, 1)), 0)
            inv_m = torch.where(max_min > 0, cdiv(63.0, torch.where(max_min > 0, max_min, 1)), 0)
            ls = torch.round(inv_s[:, None] * scales).clamp_(max=63)
            lm = torch.round(inv_m[:, None] * mins).clamp_(max=63)
            d, dmin = max_scale / 63.0, max_min / 63.0
        else:
            sigma2 = 2 * seqsum(xb * xb) / QK_K
            w = qb * torch.sqrt(sigma2[:, None] + xb * xb)
            wg = w.reshape(-1, 32)
            scales, mins, L = affine_quants(g, wg, cls.nmax, -0.9, 0.05, 36, False)
            sw = seqsum(wg).reshape(nb, 8)
            d, ls = qp_quants(scales.reshape(nb, 8), 63, sw)
            dmin, lm = qp_quants(mins.reshape(nb, 8), 63, sw)
        L = _requant_affine(xb, _fp16(d), ls.float(), _fp16(dmin), lm.float(), L.reshape(nb, QK_K), 32, cls.nmax)
        return {"d": d, "dmin": dmin, "ls": ls, "lm": lm}, L

    @classmethod
    def _grid(cls, P):
        return _fp16(P["d"])[:, None] * P["ls"].float(), -_fp16(P["dmin"])[:, None] * P["lm"].float(), 32, 0, cls.nmax

    @classmethod
    def _pack(cls, P, L):
        v = L.to(torch.uint8).reshape(-1, 4, 2, 32)
        qs = _nibbles(v[:, :, 0], v[:, :, 1]).reshape(-1, 128)
        return torch.cat([_fp16_bytes(P["d"]), _fp16_bytes(P["dmin"]), _pack_scales_k4(P["ls"], P["lm"]), qs], dim=1)


class Q5_K(Q4_K):
    name, qtype, block_size, type_size = "Q5_K", T.Q5_K, QK_K, 176
    nmax, ref_search = 31, (-0.5, 0.1, 15)

    @classmethod
    def _pack(cls, P, L):
        v = L.to(torch.uint8).reshape(-1, 4, 2, 32)  # [NB, c, half, l]
        qs = _nibbles(v[:, :, 0], v[:, :, 1]).reshape(-1, 128)
        high = (v >> 4).reshape(-1, 8, 32)  # bit 2c+half of byte l
        qh = (high << torch.arange(8, dtype=torch.uint8).reshape(1, 8, 1)).sum(dim=1, dtype=torch.uint8)
        return torch.cat([_fp16_bytes(P["d"]), _fp16_bytes(P["dmin"]), _pack_scales_k4(P["ls"], P["lm"]), qh, qs], dim=1)


class Q6_K(GGMLType):
    name, qtype, block_size, type_size = "Q6_K", T.Q6_K, QK_K, 210

    @classmethod
    def _fit(cls, x, qw):
        xb, qb = _superblocks(x, qw)
        nb = xb.shape[0]
        g = xb.reshape(-1, 16)
        scales, L = qx_quants(g, 32, None if qb is None else qb.reshape(-1, 16))
        scales = scales.reshape(nb, 16)
        idx = scales.abs().argmax(dim=1, keepdim=True)
        max_scale = scales.gather(1, idx).squeeze(1)
        zero = max_scale.abs() < 1e-15
        iscale = cdiv(-128.0, torch.where(zero, 1, max_scale))
        sc = torch.round(iscale[:, None] * scales).clamp_(max=127)
        d = 1 / iscale
        L = _requant_sym(xb, _fp16(d), sc, L.reshape(nb, QK_K), 16, -32, 31)
        return {"d": d, "sc": sc, "zero": zero}, L

    @classmethod
    def _pack(cls, P, L):
        v = L.to(torch.uint8).reshape(-1, 2, 4, 32)  # [NB, h, p, l]
        ql = torch.cat([_nibbles(v[:, :, 0], v[:, :, 2]), _nibbles(v[:, :, 1], v[:, :, 3])], dim=2).reshape(-1, 128)
        qh = ((v >> 4) << torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)).sum(dim=2, dtype=torch.uint8)
        out = torch.cat([ql, qh.reshape(-1, 64), P["sc"].to(torch.int8).view(torch.uint8), _fp16_bytes(P["d"])], dim=1)
        return torch.where(P["zero"][:, None], torch.zeros_like(out), out)

    @classmethod
    def _grid(cls, P):
        a = torch.where(P["zero"][:, None], 0, _fp16(P["d"])[:, None] * P["sc"])
        return a, -32 * a, 16, 0, 63


TYPES: dict[str, type[GGMLType]] = {
    t.name: t for t in (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)
}
BY_QTYPE = {t.qtype: t for t in TYPES.values()}


def get_type(name: str) -> type[GGMLType]:
    try:
        return TYPES[name.upper()]
    except KeyError:
        raise ValueError(f"unknown GGUF tensor type {name!r} (known: {', '.join(TYPES)})") from None


def dequantize(data: np.ndarray, qtype: T) -> np.ndarray:
    """Decode with gguf-py (the reference decoder)."""
    from gguf.quants import dequantize as gq

    return gq(data, qtype)
