"""Fused decode-step ops in C (decode.c), built on first use with the system compiler, called through ctypes.

    add_rmsnorm(x, y, w, eps, out)     x += y (or no y); out = rms_norm(x) · w
    attn_decode(qkv, cos, sin, kc, vc, pos, ...)   rope, K/V cache write, one query's attention
    silu_mul(gu, out)                  out = silu(g) · u
    linear_q(qw, x, out)               out = x Wᵀ (+ b), W 4- or 8-bit codes read in place (QWeight), x int8 per block of
                                       up to 128 columns (act_block)
    gemm_q(qw, x, out)                 the same for x [M, K] (prefill, evaluation): tiles of rows, each row of out
                                       equal to linear_q's for that row of x (AMX tiles where granted: within
                                       float32 rounding, the same integers)
    i8_split(u, zp) / i8_sparse_add    W8A8 prefill: 8-bit activation codes as a 7-bit GEMM operand plus a sparse
                                       rest (kernels/int8.py, kind "onednn-sparse")
(inputs and outputs float32 or bfloat16, per tensor; the math and the residual in float32; the K/V cache float16).

Each has a torch reference here (`*_reference`, the same math in torch ops) and an equivalence test.
The library is compiled once per source, compiler and CPU into the lowbit cache (`cc -O3 -march=native
-ffast-math -fopenmp`, linked without fast-math) and reused: from a folder only this user can
write, and only while its sha256 is the one recorded when it was built (see `build`; anything else there is
built again, never loaded). Without a C compiler, or with LOWBIT_NATIVE=0, `lib()` returns None (the reason
logged once) and the lean decoder keeps its torch ops. Every call checks its tensors' dtypes, contiguity and
sizes against the dims it passes first: the C side trusts no size.
"""
from __future__ import annotations

import atexit
import ctypes
import hashlib
import json
import os
import platform
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from ..core.paths import cache_dir
from ..errors import LowbitError

SOURCE = Path(__file__).with_name("decode.c")
ABI_VERSION = 8
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


# ---- the library's cache: a folder only this user can write, a hash of every library built ----------------
#
# A library is loaded only from a private folder (owned by this user, no group/world write, created 0700, no
# folder above it that anyone may rename it in), only if it is a regular file of this user (no link followed)
# whose sha256 equals the one recorded next to it when it was built (lowbit_decode_KEY.json: the hash of the
# library and of the source + compiler + flags + CPU it was built from), and it is loaded from the very file
# descriptor that was hashed. A library that is missing, empty, foreign, a link or altered is built again (to a
# temporary name, then renamed over it). A cache folder that fails the checks is ignored: the library is built
# in a private temporary folder for this process.

_PRIVATE: list[Path] = []  # this process's temporary build folder, where the cache is unusable


# ---- CPU dispatch: one library per instruction set, chosen at run time --------------------------------------
#
# x86-64: the best of ISAS that the CPU has (from /proc/cpuinfo), or LOWBIT_ISA (a lower one: "generic" forces the
# plain C loops); each is compiled with its own flags and cached under its own digest. decode.c picks its code
# paths from the compiler's macros (__AVX2__, __AVX512VNNI__, __AMX_INT8__ ...): "avx512-vnni" runs the same tiles with
# vpdpbusd, "avx512-amx" the GEMMs of 16 rows or more on AMX tiles (granted by Linux at load: lb_amx_init, else the
# next set is used). Every path computes the same exact integers per activation block and then the same float
# operations (decode.c), so all of them give the same bits.
# Other machines: one "native" build (-march=native).

ISAS = ("avx512-amx", "avx512-vnni", "avx2", "generic")  # best first
ISA_FLAGS = {
    "avx512-amx": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni",
                   "-mamx-tile", "-mamx-int8"],
    "avx512-vnni": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "generic": [],
    "native": ["-march=native"],
}
ISA_NEEDS = {"avx512-amx": {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx2", "fma", "f16c", "amx_tile",
                            "amx_int8"},
             "avx512-vnni": {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx2", "fma", "f16c"},
             "avx2": {"avx2", "fma", "f16c"}, "generic": set()}
_ISA_LIBS: dict = {}
_HELD_FDS: list[int] = []  # descriptors the loaded libraries were opened through (see load)  # isa -> loaded library (or None), for explicitly requested instruction sets


def cpu_flags() -> set[str]:
    try:
        line = next((ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")), "")
    except OSError:
        line = ""
    return set(line.split(":", 1)[1].split()) if ":" in line else set()


def cpu_features() -> dict:
    """What this CPU offers that the kernels could use (AMX-INT8: the "avx512-amx" GEMM; AVX-512 BF16 is detected, no
    kernel uses it)."""
    f = cpu_flags()
    names = {"avx2": "avx2", "fma": "fma", "f16c": "f16c", "avx512f": "avx512f", "avx512bw": "avx512bw",
             "avx512vl": "avx512vl", "avx512_vnni": "avx512_vnni", "avx512_bf16": "avx512_bf16",
             "avx_vnni": "avx_vnni", "amx_tile": "amx_tile", "amx_int8": "amx_int8", "amx_bf16": "amx_bf16"}
    return {k: v in f for k, v in names.items()}


def supported_isas() -> list[str]:
    """Instruction sets this machine can run, best first."""
    if platform.machine() not in ("x86_64", "AMD64", "i686", "i386"):
        return ["native"]
    f = cpu_flags()
    return [i for i in ISAS if ISA_NEEDS[i] <= f]


def selected_isa() -> str:
    """The best supported instruction set, or LOWBIT_ISA where it names a supported one (else an error)."""
    have = supported_isas()
    want = os.environ.get("LOWBIT_ISA", "").strip()
    if not want:
        return have[0]
    if want not in have:
        raise OSError(f"LOWBIT_ISA={want}: this CPU runs {', '.join(have)}")
    return want


def _toolchain(isa: str | None = None) -> tuple[str, list[str], list[str], str]:
    """(compiler, compile flags, link flags, digest of source + compiler + flags + CPU) for one instruction set."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise OSError("no C compiler (cc/gcc) on PATH")
    isa = isa or selected_isa()
    # -ffast-math only when compiling (vectorized expf, reassociated sums): linked with it, gcc < 13 adds
    # crtfastmath.o, which turns on flush-to-zero for the whole process (torch included) when the library loads
    tune = [] if isa == "native" else ["-mtune=native"]
    cflags = ["-O3", *ISA_FLAGS[isa], *tune, "-ffast-math", "-fopenmp", "-fPIC"]
    lflags = ["-shared", "-fopenmp", "-lmvec", "-lm"]
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join([cc, *cflags, *lflags, _cpu_key()]).encode()).hexdigest()
    return cc, cflags, lflags, digest


def private_dir(d: Path) -> Path:
    """d, created 0700 where missing; OSError unless it is a folder (not a link) of this user that no one else
    can write, under folders that no other user can rename it in."""
    d = Path(d).absolute()
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    uid = os.getuid()
    st = os.lstat(d)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise OSError(f"{d} is not a folder (a link?)")
    if st.st_uid != uid:
        raise OSError(f"{d} belongs to another user (uid {st.st_uid})")
    if st.st_mode & 0o022:
        raise OSError(f"{d} is writable by group or others")
    for a in d.parents:
        ast = os.stat(a)
        if ast.st_uid not in (uid, 0) or (ast.st_mode & 0o002 and not ast.st_mode & stat.S_ISVTX):
            raise OSError(f"{a}, above {d.name}, belongs to another user or anyone may write to it")
    if st.st_mode & 0o077:
        os.chmod(d, 0o700)
    return d


def _cache_or_private() -> Path:
    try:
        return private_dir(_cache_dir())
    except OSError as e:
        if not _PRIVATE:
            _log(f"native decode ops: cache folder ignored ({e}); building in a private temporary folder")
            d = Path(tempfile.mkdtemp(prefix="lowbit-native-"))
            atexit.register(shutil.rmtree, d, True)
            _PRIVATE.append(d)
        return _PRIVATE[0]


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def _open_own(path: Path) -> tuple[int, os.stat_result] | None:
    """(read-only descriptor, stat) of a regular, non-empty file of this user at `path` (a link is not
    followed), or None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_size == 0:
        os.close(fd)
        return None
    return fd, st


def _fd_sha256(fd: int) -> str:
    h = hashlib.sha256()
    os.lseek(fd, 0, os.SEEK_SET)
    while chunk := os.read(fd, 1 << 20):
        h.update(chunk)
    return h.hexdigest()


def _open_verified(path: Path, digest: str) -> int | None:
    """A descriptor of the library at `path` if it is the one recorded at build time for `digest`, else None."""
    got = _open_own(_sidecar(path))
    if got is None:
        return None
    fd, st = got
    try:
        rec = json.loads(os.read(fd, 4096)) if st.st_size < 4096 else None
    except ValueError:
        rec = None
    finally:
        os.close(fd)
    if not isinstance(rec, dict) or rec.get("source") != digest or rec.get("abi") != ABI_VERSION:
        return None
    got = _open_own(path)
    if got is None:
        return None
    fd = got[0]
    if _fd_sha256(fd) != rec.get("sha256"):
        os.close(fd)
        return None
    return fd


def _compile(cc: str, cflags: list[str], lflags: list[str], digest: str, out_dir: Path, path: Path) -> None:
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        obj, so = os.path.join(tmp, "decode.o"), os.path.join(tmp, "decode.so")
        for cmd in ([cc, *cflags, "-c", str(SOURCE), "-o", obj], [cc, obj, "-o", so, *lflags]):
            r = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
            if r.returncode != 0:
                err = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"
                raise OSError(f"{cc} failed on {SOURCE.name}: {err}")
        fd = os.open(so, os.O_RDONLY | os.O_CLOEXEC)
        try:
            sha = _fd_sha256(fd)
        finally:
            os.close(fd)
        side = os.path.join(tmp, "decode.json")
        with open(side, "w") as f:
            json.dump({"sha256": sha, "source": digest, "abi": ABI_VERSION}, f)
        os.replace(so, path)  # whole file or nothing
        os.replace(side, _sidecar(path))  # recorded after the library: a crash between leaves a mismatch (rebuilt)


def build(out_dir: Path | None = None, isa: str | None = None) -> Path:
    """Compile decode.c into a shared library (cached by source, compiler, instruction set and CPU, in a private
    folder) and return its path: the cached one where it is the library recorded at build time, else built again."""
    cc, cflags, lflags, digest = _toolchain(isa)
    out_dir = private_dir(out_dir) if out_dir is not None else _cache_or_private()
    path = out_dir / f"lowbit_decode_{digest[:16]}.so"
    fd = _open_verified(path, digest)
    if fd is not None:
        os.close(fd)
        return path
    _compile(cc, cflags, lflags, digest, out_dir, path)
    return path


def load(out_dir: Path | None = None, isa: str | None = None):
    """The library built (or found) by `build`, loaded through the descriptor of the file whose hash was checked
    (no window in which another file can take its place). OSError where it cannot be built or stays unverified."""
    digest = _toolchain(isa)[3]
    for _ in range(2):  # a library changed between build and load is built once more
        path = build(out_dir, isa)
        fd = _open_verified(path, digest)
        if fd is None:
            continue
        proc = f"/proc/self/fd/{fd}"
        if not os.path.exists(proc):
            os.close(fd)
            return ctypes.CDLL(str(path))
        handle = ctypes.CDLL(proc)
        # the descriptor stays open while the library is loaded: dlopen matches libraries by path name first, and a
        # reused descriptor number would hand back the library loaded earlier under that name (another ISA's)
        _HELD_FDS.append(fd)
        return handle
    raise OSError(f"{path}: does not match the hash recorded when it was built")


def lib(isa: str | None = None):
    """The loaded library for this CPU's instruction set (selected_isa: the best, or LOWBIT_ISA), or for `isa`
    (tests: each path where the CPU runs it); None where it cannot be built (reason logged once), the CPU cannot run
    `isa`, or LOWBIT_NATIVE=0."""
    if isa is not None:
        if isa not in _ISA_LIBS:
            _ISA_LIBS[isa] = _open(isa) if isa in supported_isas() else None
        return _ISA_LIBS[isa]
    if _LIB:
        return _LIB[0]
    handle = None
    if os.environ.get("LOWBIT_NATIVE", "1") == "0":
        _log("native decode ops: off (LOWBIT_NATIVE=0)")
    else:
        chosen = selected_isa()
        have = supported_isas()
        for isa in have[have.index(chosen):] if chosen in have else [chosen]:  # the next set where one fails
            try:
                handle = _open(isa, raise_=True)
                break
            except (OSError, AttributeError) as e:
                _log(f"native decode ops for {isa} unavailable ({e})")
                handle = None
    _LIB.append(handle)  # once per process: callers ask on every matmul
    return handle


def _open(isa: str, raise_: bool = False):
    """The library of one instruction set, loaded and its entry points typed; None (or the error) on failure."""
    handle = None
    try:
        handle = load(isa=isa)
        if handle.lb_abi_version() != ABI_VERSION:
            raise OSError("ABI version mismatch")
        p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
        handle.lb_add_rmsnorm.argtypes = [p, p, i, p, f, i, p, i]
        handle.lb_silu_mul.argtypes = [p, i, i, p, i]
        handle.lb_attn_decode.argtypes = [p, i, p, p, p, p, i, i, i, i, i, f, p, p, i]
        handle.lb_linear_q.argtypes = [i, i, p, p, p, p, i, i, i, p, i, p, p, i]
        handle.lb_gemm_q.argtypes = [i, i, p, p, p, p, i, i, i, i, p, i, p, p, i]
        handle.lb_gemm_q.restype = ctypes.c_int
        handle.lb_isa.restype = ctypes.c_int
        handle.lb_amx_init.restype = ctypes.c_int
        if isa == "avx512-amx" and handle.lb_amx_init() != 0:
            raise OSError("Linux did not grant the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM)")
        handle.lb_add_rmsnorm_rows.argtypes = [p, p, i, p, f, i, i, p, i]
        handle.lb_silu_mul_rows.argtypes = [p, i, i, i, p, i]
        handle.lb_rope_rows.argtypes = [p, i, p, p, i, i, p, p, i, i, i, i, p, p, p]
        for fn in (handle.lb_add_rmsnorm_rows, handle.lb_silu_mul_rows, handle.lb_rope_rows):
            fn.restype = None
        handle.lb_gptq_cols.argtypes = [p, i, i, p, i, i, i, i, p, p, p, f, f, p, i, p]
        handle.lb_gptq_cols.restype = None
        handle.lb_i8_split.argtypes = [p, i, i, p, p, p, p, p]
        handle.lb_i8_split.restype = ctypes.c_int64
        handle.lb_i8_sparse_add.argtypes = [i, i, p, p, p, p, p]
        for fn in (handle.lb_add_rmsnorm, handle.lb_silu_mul, handle.lb_attn_decode, handle.lb_linear_q,
                   handle.lb_i8_sparse_add):
            fn.restype = None
    except (OSError, AttributeError) as e:
        if raise_:
            raise
        _log(f"native decode ops for {isa} unavailable ({e})")
        handle = None
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
        self.ab = act_block(self.G)  # activation block (32; tests set 64 or 128 to cover the kernels' other sizes)
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
        self.ng = self.s.shape[1] if self.s.dim() == 2 else 0
        self._check()
        self._w_ptrs = (ctypes.c_void_p * len(self.weights))(*[w.data_ptr() for w in self.weights])
        self._rows = (ctypes.c_int * len(self.rows))(*self.rows)

    def _check(self) -> None:
        """What lb_linear_q will read, against the dims it is told (it trusts none): the layout it tiles
        (K and G in whole blocks of 64 (4-bit) or 32 columns), each segment's codes exactly [rows, K/2 or K]
        uint8, s and sz' [N, ceil(K/G)] float32, the bias [N], every size within a C int."""
        K, G, bits = self.K, self.G, self.bits
        step = 64 if bits == 4 else 32
        if bits not in (4, 8) or not 0 < K <= MAX_K or K % step or G < step or G % step:
            raise LowbitError(f"native linear: {bits}-bit codes of {K} columns in groups of {G} do not tile")
        if self.ab not in (32, 64, 128) or G % self.ab:
            raise LowbitError(f"native linear: activation blocks of {self.ab} in groups of {G}")
        row_bytes = K // 2 if bits == 4 else K
        for w, r in zip(self.weights, self.rows):
            _need(w, (torch.uint8,), r * row_bytes, "linear codes")
            if tuple(w.shape) != (r, row_bytes) or r < 1:
                raise LowbitError(f"native linear: codes {list(w.shape)}, need [{r}, {row_bytes}]")
        if self.N >= (1 << 31) - 64 or self.ng != -(-K // G):  # (C rounds N and M up to whole tiles in int)
            raise LowbitError(f"native linear: {self.N} rows, scales of {self.ng} groups for {K} columns / {G}")
        _need(self.s, _F32, self.N * self.ng, "linear scales")
        _need(self.sz, _F32, self.N * self.ng, "linear zero terms")
        if self.bias is not None:
            _need(self.bias, _F32, self.N, "linear bias")

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


def act_block(G: int) -> int:
    """Positions per activation block of the native matvec/GEMM: 32, as llama.cpp's Q8_0 (decode.c takes 32, 64 or
    128 dividing G; larger blocks run the AMX GEMM faster and cost more perplexity: docs/results.md §13)."""
    return 32


def quantize_act_reference(x: torch.Tensor, interleave: bool, ab: int = 32
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [K] -> (xq int32 [K], d [ceil(K/ab)], columns [K], block [K]): int8 per block of ab columns (the last may be
    shorter), d = max|x| / 127, in decode.c's storage order: sub-blocks of 32 consecutive columns, or (interleave,
    for 4-bit weights) the even and the odd columns of each 64; block[p] = the activation block of position p."""
    K = x.shape[-1]
    pos = torch.arange(K)
    b, j = pos // 32, pos % 32
    cols = (b // 2) * 64 + 2 * j + (b % 2) if interleave else pos
    blk = pos // ab
    nab = -(-K // ab)
    v = x.float()[cols]
    amax = F.pad(v.abs(), (0, nab * ab - K)).view(nab, ab).amax(1)
    d = amax / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    inv = torch.where(inv <= torch.finfo(torch.float32).max, inv, torch.zeros_like(inv))  # act_inverse
    return torch.round(v * inv[blk]).clamp(-127, 127).to(torch.int32), d, cols, blk


def block_ints(qw: QWeight, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(I int64 [N, nab], S int64 [nab], d [nab]) of one row x [K]: the exact integer dot of every weight row with
    each activation block, and each block's sum of codes."""
    xq, d, cols, blk = quantize_act_reference(x, qw.bits == 4, qw.ab)
    prod = qw.codes()[:, cols].long() * xq.long().unsqueeze(0)  # [N, K] in storage order
    nab = d.shape[0]
    I = torch.zeros(qw.N, nab, dtype=torch.long).index_add_(1, blk, prod)
    S = torch.zeros(nab, dtype=torch.long).index_add_(0, blk, xq.long())
    return I, S, d


def linear_q_reference(qw: QWeight, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """The C matvec's math in torch: exact integer dots per activation block, then the float combination (here
    without fused multiply-adds: equal to the C result within float32 rounding)."""
    I, S, d = block_ints(qw, x)
    bpg = qw.G // qw.ab
    ng = qw.s.shape[1]
    pad = ng * bpg - d.shape[0]
    per_group = F.pad(I.float() * d, (0, pad)).view(qw.N, ng, bpg).sum(-1)  # [N, ng]
    A = F.pad(S.float() * d, (0, pad)).view(ng, bpg).sum(-1)  # [ng]
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
# The C side trusts no size: before every call, each tensor's dtype, contiguity and element count are checked
# against the dims the call passes (`_need`: attribute reads only, no data scans).

_F32 = (torch.float32,)
_IO = (torch.float32, torch.bfloat16)
INT_MAX = (1 << 31) - 1
MAX_GEMM_ELEMS = 1 << 40  # rows x columns of one gemm_q input or output (indexing is size_t in C)
MAX_K = 1 << 20  # decode.c keeps a row's int8 activations (K bytes) and per-block floats on the stack


def _bad(t: torch.Tensor, dtypes: tuple, n: int, what: str) -> LowbitError:
    return LowbitError(f"native decode ops: {what} is {t.dtype} {list(t.shape)}"
                       f"{'' if t.is_contiguous() else ' (not contiguous)'}{'' if t.is_cpu else ' (not on the CPU)'}, "
                       f"the call needs {n} contiguous {' or '.join(str(d).replace('torch.', '') for d in dtypes)} "
                       "elements on the CPU")


def _need(t: torch.Tensor, dtypes: tuple, n: int, what: str) -> None:
    """t must be a contiguous CPU tensor of exactly n elements of one of `dtypes`."""
    if t.dtype not in dtypes or t.numel() != n or not t.is_contiguous() or not t.is_cpu:
        raise _bad(t, dtypes, n, what)


def _f32(t: torch.Tensor, n: int, what: str) -> None:
    """`_need` for float32 (the decode path's checks: one dtype read each)."""
    if t.dtype is not torch.float32 or t.numel() != n or not t.is_contiguous() or not t.is_cpu:
        raise _bad(t, _F32, n, what)


def _io(t: torch.Tensor, n: int, what: str) -> int:
    """`_need` for a float32 or bfloat16 tensor; returns the C side's bf16 flag."""
    d = t.dtype
    if (d is not torch.float32 and d is not torch.bfloat16) or t.numel() != n or not t.is_contiguous() or not t.is_cpu:
        raise _bad(t, _IO, n, what)
    return d is torch.bfloat16


def _bf(t: torch.Tensor) -> int:
    return int(t.dtype == torch.bfloat16)


def add_rmsnorm(L, x, y, w, eps: float, out) -> None:
    n = x.numel()
    if n > INT_MAX:
        raise LowbitError(f"native decode ops: add_rmsnorm of {n} elements")
    _f32(x, n, "add_rmsnorm x")
    y_bf = 0 if y is None else _io(y, n, "add_rmsnorm y")
    _f32(w, n, "add_rmsnorm weight")
    out_bf = _io(out, n, "add_rmsnorm out")
    L.lb_add_rmsnorm(x.data_ptr(), None if y is None else y.data_ptr(), y_bf, w.data_ptr(), eps, n, out.data_ptr(),
                     out_bf)


def silu_mul(L, gu, out) -> None:
    n = out.numel()
    if n > INT_MAX // 2:
        raise LowbitError(f"native decode ops: silu_mul of {n} elements")
    gu_bf = _io(gu, 2 * n, "silu_mul gate|up")
    out_bf = _io(out, n, "silu_mul out")
    L.lb_silu_mul(gu.data_ptr(), gu_bf, n, out.data_ptr(), out_bf)


def attn_decode(L, qkv, cos, sin, kc, vc, pos: int, nh: int, nkv: int, hd: int, scale: float, scratch, out) -> None:
    shape = kc.shape
    if (len(shape) != 3 or shape != vc.shape or shape[0] != nkv or shape[2] != hd or not 0 <= pos < shape[1]
            or not 0 < hd <= MAX_HEAD_DIM or hd % 2 or nkv < 1 or nh < 1 or nh % nkv
            or kc.numel() > INT_MAX or (nh + 2 * nkv) * hd > INT_MAX):
        raise LowbitError(f"native decode ops: attention of {nh}/{nkv} heads of {hd} at position {pos} on caches "
                          f"{list(kc.shape)}, {list(vc.shape)}")
    in_bf = _io(qkv, (nh + 2 * nkv) * hd, "attention q|k|v")
    _f32(cos, hd, "attention cos")
    _f32(sin, hd, "attention sin")
    n = kc.numel()
    if kc.dtype is not torch.float16 or not kc.is_contiguous() or not kc.is_cpu:
        raise _bad(kc, (torch.float16,), n, "attention K cache")
    if vc.dtype is not torch.float16 or not vc.is_contiguous() or not vc.is_cpu:
        raise _bad(vc, (torch.float16,), n, "attention V cache")
    need = nh * (pos + 1) + (nh + nkv) * hd
    if scratch.numel() < need:
        raise LowbitError(f"native decode ops: attention scratch of {scratch.numel()} floats, {need} needed at "
                          f"position {pos}")
    _f32(scratch, scratch.numel(), "attention scratch")
    out_bf = _io(out, nh * hd, "attention out")
    L.lb_attn_decode(qkv.data_ptr(), in_bf, cos.data_ptr(), sin.data_ptr(), kc.data_ptr(), vc.data_ptr(),
                     pos, shape[1], nh, nkv, hd, scale, scratch.data_ptr(), out.data_ptr(), out_bf)


def add_rmsnorm_rows(L, x, y, w, eps: float, out) -> None:
    """x [M, n] float32 (+= y [M, n]); out [M, n] = rms_norm(x) · w, each row as add_rmsnorm."""
    if x.dim() != 2 or x.numel() > INT_MAX or x.shape[0] < 1:
        raise LowbitError(f"native prefill ops: add_rmsnorm of {list(x.shape)}")
    M, n = x.shape
    _f32(x, M * n, "add_rmsnorm x")
    y_bf = 0 if y is None else _io(y, M * n, "add_rmsnorm y")
    _f32(w, n, "add_rmsnorm weight")
    out_bf = _io(out, M * n, "add_rmsnorm out")
    L.lb_add_rmsnorm_rows(x.data_ptr(), None if y is None else y.data_ptr(), y_bf, w.data_ptr(), eps, M, n,
                          out.data_ptr(), out_bf)


def silu_mul_rows(L, gu, out) -> None:
    """gu [M, 2n] -> out [M, n] = silu(gate) · up, each row as silu_mul."""
    if out.dim() != 2 or 2 * out.numel() > INT_MAX or out.shape[0] < 1:
        raise LowbitError(f"native prefill ops: silu_mul into {list(out.shape)}")
    M, n = out.shape
    gu_bf = _io(gu, 2 * M * n, "silu_mul gate|up")
    out_bf = _io(out, M * n, "silu_mul out")
    L.lb_silu_mul_rows(gu.data_ptr(), gu_bf, M, n, out.data_ptr(), out_bf)


def rope_rows(L, qkv, cos, sin, kc, vc, p: int, nh: int, nkv: int, hd: int, q, k, v) -> None:
    """qkv [M, (nh+2nkv)·hd] at positions p..p+M-1; cos/sin float32 tables [≥ p+M, hd]; kc/vc float16
    [nkv, max_len, hd] (k roped and v written at p..p+M-1); q [nh, M, hd], k, v [nkv, M, hd] float32 out."""
    shape = kc.shape
    M = qkv.shape[0] if qkv.dim() == 2 else -1
    if (len(shape) != 3 or shape != vc.shape or shape[0] != nkv or shape[2] != hd or M < 1 or p < 0
            or p + M > shape[1] or p + M > cos.shape[0] or not 0 < hd <= MAX_HEAD_DIM or hd % 2 or nkv < 1
            or nh < 1 or nh % nkv or kc.numel() > INT_MAX or M * (nh + 2 * nkv) * hd > INT_MAX
            or cos.dim() != 2 or cos.shape != sin.shape or cos.shape[1] != hd):
        raise LowbitError(f"native prefill ops: rope of {list(qkv.shape)} at {p} ({nh}/{nkv} heads of {hd}) on "
                          f"caches {list(kc.shape)}, tables {list(cos.shape)}")
    in_bf = _io(qkv, M * (nh + 2 * nkv) * hd, "rope q|k|v")
    _f32(cos, cos.numel(), "rope cos")
    _f32(sin, sin.numel(), "rope sin")
    for c, what in ((kc, "K cache"), (vc, "V cache")):
        if c.dtype is not torch.float16 or not c.is_contiguous() or not c.is_cpu:
            raise _bad(c, (torch.float16,), c.numel(), f"rope {what}")
    _f32(q, nh * M * hd, "rope q out")
    _f32(k, nkv * M * hd, "rope k out")
    _f32(v, nkv * M * hd, "rope v out")
    L.lb_rope_rows(qkv.data_ptr(), in_bf, cos.data_ptr(), sin.data_ptr(), p, M, kc.data_ptr(), vc.data_ptr(),
                   shape[1], nh, nkv, hd, q.data_ptr(), k.data_ptr(), v.data_ptr())


def i8_split(L, u: torch.Tensor, zp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """u uint8 [M, K], zp int32 [M] -> (uc uint8 [M, K], rowptr int64 [M+1], cols int32, vals float32): q = u - zp
    as c = clamp(q, -64, 63) (uc = c + 64) plus the rest q - c in CSR (see decode.c)."""
    if u.dim() != 2 or u.shape[0] > INT_MAX or u.shape[1] > INT_MAX:
        raise LowbitError(f"native int8 split: codes {list(u.shape)}")
    M, K = u.shape
    _need(u, (torch.uint8,), M * K, "int8 split codes")
    _need(zp, (torch.int32,), M, "int8 split zero points")
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
    """out [M, N] float32 += the CSR rows (rowptr, cols, vals) times wT (int8 [K, N], contiguous). Prefill only:
    besides the sizes, the CSR's row pointers and columns are checked against the arrays they index."""
    if out.dim() != 2 or wT.dim() != 2 or wT.shape[1] != out.shape[1] or out.shape[0] > INT_MAX or out.shape[1] > INT_MAX:
        raise LowbitError(f"native int8 sparse add: out {list(out.shape)}, weight codes {list(wT.shape)}")
    (M, N), nnz = out.shape, cols.numel()
    _need(out, _F32, M * N, "int8 sparse add out")
    _need(wT, (torch.int8,), wT.numel(), "int8 sparse add weight codes")
    _need(rowptr, (torch.int64,), M + 1, "int8 sparse add row pointers")
    _need(cols, (torch.int32,), nnz, "int8 sparse add columns")
    _need(vals, _F32, nnz, "int8 sparse add values")
    if (int(rowptr[0]) != 0 or int(rowptr[-1]) != nnz or bool((rowptr[1:] < rowptr[:-1]).any())
            or (nnz and not 0 <= int(cols.min()) <= int(cols.max()) < wT.shape[0])):
        raise LowbitError("native int8 sparse add: row pointers or columns outside their arrays")
    L.lb_i8_sparse_add(out.shape[0], out.shape[1], rowptr.data_ptr(), cols.data_ptr(), vals.data_ptr(),
                       wT.data_ptr(), out.data_ptr())


def linear_q(L, qw: QWeight, x, out) -> None:
    """out [N] = x [K] Wᵀ (+ bias); x and out bf16 or float32. What qw holds (codes, scales, zero terms, bias,
    the pointer and row arrays) was checked against K, G and the rows when it was made (QWeight._check) and is
    not replaced after; here the tensors of this call."""
    x_bf = _io(x, qw.K, "linear input")
    out_bf = _io(out, qw.N, "linear out")
    L.lb_linear_q(qw.bits, len(qw.rows), qw._w_ptrs, qw._rows, qw.s.data_ptr(), qw.sz.data_ptr(), qw.K, qw.G, qw.ab,
                  x.data_ptr(), x_bf, None if qw.bias is None else qw.bias.data_ptr(), out.data_ptr(), out_bf)


def gemm_q(L, qw: QWeight, x, out) -> None:
    """out [M, N] = x [M, K] Wᵀ (+ bias): lb_gemm_q, row m equal to linear_q of x[m] (on AMX tiles: within float32
    rounding, the same integers). x and out bf16 or float32.
    M, K and N are checked against both tensors here (qw's own arrays were checked when it was made)."""
    if x.dim() != 2 or out.dim() != 2 or x.shape[0] != out.shape[0] or not 0 < x.shape[0] <= INT_MAX - 64:
        raise LowbitError(f"native gemm: input {list(x.shape)}, output {list(out.shape)}")
    M = x.shape[0]
    if M * qw.K > MAX_GEMM_ELEMS or M * qw.N > MAX_GEMM_ELEMS:
        raise LowbitError(f"native gemm: {M} rows of {qw.K} -> {qw.N} exceed {MAX_GEMM_ELEMS} elements")
    x_bf = _io(x, M * qw.K, "gemm input")
    out_bf = _io(out, M * qw.N, "gemm out")
    if L.lb_gemm_q(qw.bits, len(qw.rows), qw._w_ptrs, qw._rows, qw.s.data_ptr(), qw.sz.data_ptr(), qw.K, qw.G, qw.ab, M,
                   x.data_ptr(), x_bf, None if qw.bias is None else qw.bias.data_ptr(), out.data_ptr(), out_bf):
        raise MemoryError(f"native gemm: no scratch for {M} rows of {qw.K}")


def gemm_q_reference(qw: QWeight, x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """lb_gemm_q's math in torch: linear_q_reference row by row."""
    return torch.stack([linear_q_reference(qw, r, out_dtype) for r in x])


def block_dots_reference(qw: QWeight, x: torch.Tensor) -> torch.Tensor:
    """The exact integer sums under lb_gemm_q: int64 [M, N, nab], dot(c, xq) per activation block of each row."""
    return torch.stack([block_ints(qw, r)[0] for r in x])


def gptq_cols(L, W1: torch.Tensor, H1: torch.Tensor, c0: int, c1: int, grp: torch.Tensor, sT: torch.Tensor,
              zT: torch.Tensor | None, qmin: float, qmax: float, Q: torch.Tensor, E: torch.Tensor) -> None:
    """lb_gptq_cols: columns c0..c1 of a GPTQ lazy block (core/gptq.gptq_rows' loop, the same operations), every
    tensor and index checked against the others first."""
    b, rows = W1.shape if W1.dim() == 2 else (-1, -1)
    ng = sT.shape[0] if sT.dim() == 2 else -1
    ok = (W1.dtype == torch.float32 and W1.is_contiguous() and H1.dtype == torch.float32 and H1.dim() == 2
          and tuple(H1.shape) == (b, b) and min(H1.stride()) >= 1 and max(H1.stride()) < INT_MAX and 0 <= c0 < c1 <= b
          and grp.dtype == torch.int32 and grp.is_contiguous() and grp.numel() == b
          and sT.dtype == torch.float32 and sT.is_contiguous() and sT.shape[1:] == (rows,)
          and (zT is None or (zT.dtype == torch.float32 and zT.is_contiguous() and zT.shape == sT.shape))
          and Q.dtype in (torch.int8, torch.uint8) and Q.is_contiguous() and tuple(Q.shape) == (b, rows)
          and E.dtype == torch.float32 and E.is_contiguous() and tuple(E.shape) == (b, rows) and 0 < rows < INT_MAX
          and all(t.device.type == "cpu" for t in (W1, H1, grp, sT, Q, E, *(() if zT is None else (zT,)))))
    if ok:
        g = grp[c0:c1]
        ok = bool(((g >= 0) & (g < ng)).all())
    if not ok:
        raise LowbitError("native gptq columns: arrays that do not match the block")
    L.lb_gptq_cols(W1.data_ptr(), b, rows, H1.data_ptr(), H1.stride(0), H1.stride(1), c0, c1, grp.data_ptr(), sT.data_ptr(),
                   None if zT is None else zT.data_ptr(), qmin, qmax, Q.data_ptr(), int(Q.dtype == torch.int8),
                   E.data_ptr())


def gptq_cols_kernel():
    """core/gptq.gptq_rows' native column loop (a function of its arguments), or None without the library."""
    L = lib()
    if L is None:
        return None
    return lambda *args: gptq_cols(L, *args)


def isa(L) -> str:
    """The instruction set this library's kernels were compiled for."""
    return {0: "generic", 1: "avx2", 2: "avx512-vnni", 3: "avx512-amx"}.get(int(L.lb_isa()), "unknown")


def describe() -> str:
    """Which native path runs here, for `lowbit bench`: e.g. "avx2 (CPU: avx2 fma f16c)"."""
    L = lib()
    have = " ".join(k for k, v in cpu_features().items() if v) or "no SIMD flags"
    return f"{isa(L) if L is not None else 'torch ops (no native library)'} (CPU: {have})"


__all__ = ["lib", "build", "QWeight", "linear_q", "gemm_q", "gemm_q_reference", "block_dots_reference", "isa", "describe", "gptq_cols", "gptq_cols_kernel", "cpu_features", "supported_isas", "selected_isa", "add_rmsnorm_rows", "silu_mul_rows", "rope_rows", "i8_split", "i8_split_reference", "i8_sparse_add", "linear_q_reference", "quantize_act_reference", "act_block", "block_ints", "add_rmsnorm", "silu_mul", "attn_decode", "add_rmsnorm_reference",
           "silu_mul_reference", "attn_decode_reference", "MAX_HEAD_DIM"]
