"""Fused decode-step ops in C (decode.c), built on first use with the system compiler, called through ctypes.

    add_rmsnorm(x, y, w, eps, out)     x += y (or no y); out = rms_norm(x) · w
    attn_decode(qkv, cos, sin, kc, vc, pos, ...)   rope, K/V cache write, one query's attention
    silu_mul(gu, out)                  out = silu(g) · u
    linear_q(qw, x, out)               out = x Wᵀ (+ b), W 4- or 8-bit codes read in place (QWeight), x int8 per 32
    i8_split(u, zp) / i8_sparse_add    W8A8 prefill: 8-bit activation codes as a 7-bit GEMM operand plus a sparse
                                       rest (kernels/int8.py, kind "onednn-sparse")
(inputs and outputs float32 or bfloat16, per tensor; the math and the residual in float32; the K/V cache float16).

Each has a torch reference here (`*_reference`, the same math in torch ops) and an equivalence test.
The library is compiled once per source, compiler and CPU into the lowbit cache (`cc -O3 -march=native
-ffast-math -fopenmp`, linked without fast-math) and reused; without a C compiler, or with
LOWBIT_NATIVE=0, `lib()` returns None (the reason logged once) and the lean decoder keeps its torch ops.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from ..core.paths import cache_dir

SOURCE = Path(__file__).with_name("decode.c")
ABI_VERSION = 6
MAX_HEAD_DIM = 512  # decode.c's per-head accumulator
_LIB: list = []  # [ctypes.CDLL or None] once tried


def _log(msg: str) -> None:
    from . import _log_once

    _log_once(msg)


def _cache_dir() -> Path:
    return cache_dir() / "native"


def _cpu_key() -> str:
    try:
        flags = next((ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def build(out_dir: Path | None = None) -> Path:
    """Compile decode.c into a shared library (cached by source, compiler and CPU) and return its path."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise OSError("no C compiler (cc/gcc) on PATH")
    # -ffast-math only when compiling (vectorized expf, reassociated sums): linked with it, gcc < 13 adds
    # crtfastmath.o, which turns on flush-to-zero for the whole process (torch included) when the library loads
    cflags = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC"]
    lflags = ["-shared", "-fopenmp", "-lmvec", "-lm"]
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([cc, *cflags, *lflags, _cpu_key()]).encode()).hexdigest()[:16]
    out_dir = out_dir or _cache_dir()
    path = out_dir / f"lowbit_decode_{key}.so"
    if path.exists():
        return path
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        obj, so = os.path.join(tmp, "decode.o"), os.path.join(tmp, "decode.so")
        for cmd in ([cc, *cflags, "-c", str(SOURCE), "-o", obj], [cc, obj, "-o", so, *lflags]):
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                err = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"
                raise OSError(f"{cc} failed on {SOURCE.name}: {err}")
        os.replace(so, path)  # whole file or nothing
    return path


def lib():
    """The loaded library, or None where it cannot be built (reason logged once) or LOWBIT_NATIVE=0."""
    if _LIB:
        return _LIB[0]
    handle = None
    if os.environ.get("LOWBIT_NATIVE", "1") == "0":
        _log("native decode ops: off (LOWBIT_NATIVE=0)")
    else:
        try:
            handle = ctypes.CDLL(str(build()))
            if handle.lb_abi_version() != ABI_VERSION:
                raise OSError("ABI version mismatch")
            p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
            handle.lb_add_rmsnorm.argtypes = [p, p, i, p, f, i, p, i]
            handle.lb_silu_mul.argtypes = [p, i, i, p, i]
            handle.lb_attn_decode.argtypes = [p, i, p, p, p, p, i, i, i, i, i, f, p, p, i]
            handle.lb_linear_q.argtypes = [i, i, p, p, p, p, i, i, p, i, p, p, i]
            handle.lb_i8_split.argtypes = [p, i, i, p, p, p, p, p]
            handle.lb_i8_split.restype = ctypes.c_int64
            handle.lb_i8_sparse_add.argtypes = [i, i, p, p, p, p, p]
            for fn in (handle.lb_add_rmsnorm, handle.lb_silu_mul, handle.lb_attn_decode, handle.lb_linear_q,
                       handle.lb_i8_sparse_add):
                fn.restype = None
        except OSError as e:
            _log(f"native decode ops unavailable ({e}); the lean decoder uses torch ops")
            handle = None
    _LIB.append(handle)
    return handle



# ---- quantized weights for lb_linear_q4 / lb_linear_q8 ----------------------------------------------------

class QWeight:
    """One or more QuantLinears that read the same input (q|k|v), as lb_linear_q reads them: their packed codes
    in place (no copy), and per row and group float32 s and sz' (w = s (c − z), c = u for 4-bit, u − 128 for
    8-bit, sz' = s · z in c's units), stacked along the rows like the biases."""

    def __init__(self, modules) -> None:
        m0 = modules[0]
        sch = m0.scheme
        self.bits, self.K = sch.bits, m0.in_features
        self.G = sch.group_len(self.K)
        self.modules = list(modules)
        self.weights = [m.qweight.contiguous() for m in modules]  # held: lb_linear_q reads their memory
        self.rows = [m.out_features for m in modules]
        self.N = sum(self.rows)
        s = torch.cat([m.scales for m in modules]).float()  # [N, n_groups]
        zu = (torch.cat([m.zero_points() for m in modules]).float() if not sch.symmetric
              else torch.full_like(s, float(-sch.qmin)))
        z = zu if self.bits == 4 else zu - 128
        self.s = s.contiguous()
        self.sz = (s * z).contiguous()
        biases = [m.bias for m in modules]
        self.bias = (None if all(b is None for b in biases) else
                     torch.cat([b.float() if b is not None else torch.zeros(m.out_features)
                                for b, m in zip(biases, modules)]).contiguous())
        self._w_ptrs = (ctypes.c_void_p * len(self.weights))(*[w.data_ptr() for w in self.weights])
        self._rows = (ctypes.c_int * len(self.rows))(*self.rows)

    @staticmethod
    def applies(modules) -> bool:
        m0 = modules[0]
        sch = m0.scheme
        K = m0.in_features
        step = 64 if sch.bits == 4 else 32  # see decode.c: 4-bit codes are read 64 columns at a time
        return (sch.bits in (4, 8) and sch.granularity != "tensor" and sch.group_len(K) % step == 0
                and K % step == 0 and len({(m.scheme, m.in_features) for m in modules}) == 1)

    def nbytes(self) -> int:
        """Bytes a matvec reads: the codes (the modules' own) and the float32 scales and biases."""
        return sum(t.numel() * t.element_size() for t in (*self.weights, self.s, self.sz, self.bias) if t is not None)

    def codes(self) -> torch.Tensor:
        """The codes c as int32 [N, K] (u for 4-bit, u − 128 for 8-bit), for the reference."""
        from ..core.packing import unpack

        u = torch.cat([unpack(w, self.bits, self.K) for w in self.weights]).to(torch.int32)
        return u if self.bits == 4 else u - 128


def quantize_act_reference(x: torch.Tensor, interleave: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [K] -> (xq int32 [K/32, 32], d [K/32], columns [K/32, 32]): int8 per block of 32, d = max|x| / 127; blocks
    of 32 consecutive columns, or (interleave, for 4-bit weights) the even and the odd columns of each 64."""
    K = x.shape[-1]
    cols = torch.arange(K).view(-1, 32, 2).transpose(1, 2).reshape(-1, 32) if interleave else torch.arange(K).view(-1, 32)
    v = x.float()[cols]
    d = v.abs().amax(1) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    return torch.round(v * inv.unsqueeze(1)).to(torch.int32), d, cols


def linear_q_reference(qw: QWeight, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """The C matvec's math in torch: exact integer dots per 32-block, then the float combination."""
    xq, d, cols = quantize_act_reference(x, qw.bits == 4)
    nb = qw.K // 32
    c = qw.codes()[:, cols]  # [N, nb, 32], the blocks' columns
    dots = (c * xq.unsqueeze(0)).sum(-1).float() * d  # [N, nb]
    bpg = qw.G // 32
    ng = qw.s.shape[1]
    pad = ng * bpg - nb
    per_group = F.pad(dots, (0, pad)).view(qw.N, ng, bpg).sum(-1)  # [N, ng]
    A = F.pad(d * xq.sum(1).float(), (0, pad)).view(ng, bpg).sum(-1)  # [ng]
    y = (qw.s * per_group).sum(1) - (qw.sz * A).sum(1)
    if qw.bias is not None:
        y = y + qw.bias
    return y.to(out_dtype)


# ---- torch references (the same math; the tests compare against these) --------------------------------

def add_rmsnorm_reference(x: torch.Tensor, y: torch.Tensor | None, w: torch.Tensor, eps: float,
                          out_dtype: torch.dtype) -> torch.Tensor:
    """x [n] float32 is updated in place (x += y); returns rms_norm(x) · w in out_dtype."""
    if y is not None:
        x += y.float()
    return (x * torch.rsqrt(x.pow(2).mean() + eps) * w).to(out_dtype)


def silu_mul_reference(gu: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    n = gu.shape[-1] // 2
    g, u = gu[:n].float(), gu[n:].float()
    return (F.silu(g) * u).to(out_dtype)


def attn_decode_reference(qkv, cos, sin, kc, vc, pos, nh, nkv, hd, scale, out_dtype) -> torch.Tensor:
    """qkv [(nh+2nkv) hd]; cos/sin [hd]; kc/vc [nkv, max_len, hd] float16 (k, v written at pos)."""
    x = qkv.float().view(nh + 2 * nkv, hd)
    half = hd // 2
    qk = x[: nh + nkv]
    rot = torch.cat((-qk[:, half:], qk[:, :half]), -1)
    qk = qk * cos + rot * sin
    q, k, v = qk[:nh], qk[nh:], x[nh + nkv:]
    kc[:, pos] = k
    vc[:, pos] = v
    o = F.scaled_dot_product_attention(q.view(1, nh, 1, hd), kc[:, : pos + 1].float().unsqueeze(0),
                                       vc[:, : pos + 1].float().unsqueeze(0), scale=scale, enable_gqa=nh != nkv)
    return o.reshape(nh * hd).to(out_dtype)


# ---- ctypes calls: contiguous tensors, float32 or bfloat16 where the C side takes either -----------------
# (no checks here: this is the per-token hot path; runtime/decoder.py sets the buffers up once)

def _bf(t: torch.Tensor) -> int:
    return int(t.dtype == torch.bfloat16)


def add_rmsnorm(L, x, y, w, eps: float, out) -> None:
    L.lb_add_rmsnorm(x.data_ptr(), None if y is None else y.data_ptr(), 0 if y is None else _bf(y), w.data_ptr(),
                     eps, x.numel(), out.data_ptr(), _bf(out))


def silu_mul(L, gu, out) -> None:
    L.lb_silu_mul(gu.data_ptr(), _bf(gu), out.numel(), out.data_ptr(), _bf(out))


def attn_decode(L, qkv, cos, sin, kc, vc, pos: int, nh: int, nkv: int, hd: int, scale: float, scratch, out) -> None:
    L.lb_attn_decode(qkv.data_ptr(), _bf(qkv), cos.data_ptr(), sin.data_ptr(), kc.data_ptr(), vc.data_ptr(),
                     pos, kc.shape[1], nh, nkv, hd, scale, scratch.data_ptr(), out.data_ptr(), _bf(out))


def i8_split(L, u: torch.Tensor, zp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """u uint8 [M, K], zp int32 [M] -> (uc uint8 [M, K], rowptr int64 [M+1], cols int32, vals float32): q = u - zp
    as c = clamp(q, -64, 63) (uc = c + 64) plus the rest q - c in CSR (see decode.c)."""
    M, K = u.shape
    uc = torch.empty_like(u)
    rowptr = torch.empty(M + 1, dtype=torch.int64)
    cols = torch.empty(M * K, dtype=torch.int32)  # capacity; only the pages written are touched
    vals = torch.empty(M * K, dtype=torch.float32)
    nnz = L.lb_i8_split(u.data_ptr(), M, K, zp.data_ptr(), uc.data_ptr(), rowptr.data_ptr(), cols.data_ptr(),
                        vals.data_ptr())
    return uc, rowptr, cols[:nnz], vals[:nnz]


def i8_split_reference(u: torch.Tensor, zp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`i8_split` in torch ops."""
    q = u.long() - zp.long().view(-1, 1)
    c = q.clamp(-64, 63)
    e = q - c
    rows, cols = e.nonzero(as_tuple=True)
    rowptr = torch.zeros(u.shape[0] + 1, dtype=torch.int64)
    rowptr[1:] = torch.bincount(rows, minlength=u.shape[0]).cumsum(0)
    return (c + 64).to(torch.uint8), rowptr, cols.to(torch.int32), e[rows, cols].float()


def i8_sparse_add(L, rowptr: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, wT: torch.Tensor,
                  out: torch.Tensor) -> None:
    """out [M, N] float32 += the CSR rows (rowptr, cols, vals) times wT (int8 [K, N], contiguous)."""
    L.lb_i8_sparse_add(out.shape[0], out.shape[1], rowptr.data_ptr(), cols.data_ptr(), vals.data_ptr(),
                       wT.data_ptr(), out.data_ptr())


def linear_q(L, qw: QWeight, x, out) -> None:
    """out [N] = x [K] Wᵀ (+ bias); x and out bf16 or float32."""
    L.lb_linear_q(qw.bits, len(qw.rows), qw._w_ptrs, qw._rows, qw.s.data_ptr(), qw.sz.data_ptr(), qw.K, qw.G,
                  x.data_ptr(), _bf(x), None if qw.bias is None else qw.bias.data_ptr(), out.data_ptr(), _bf(out))


__all__ = ["lib", "build", "QWeight", "linear_q", "i8_split", "i8_split_reference", "i8_sparse_add", "linear_q_reference", "quantize_act_reference", "add_rmsnorm", "silu_mul", "attn_decode", "add_rmsnorm_reference",
           "silu_mul_reference", "attn_decode_reference", "MAX_HEAD_DIM"]
