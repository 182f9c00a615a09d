"""Integer matmul for W8A8 and LLM.int8(): a reference path and a oneDNN fast path.

    x [M, K] float --quantize_act--> u = Qx + 2^(b-1) (uint8 [M, K]), sx ([M, 1] or [1, 1])
                                     (asymmetric: u = Qx with a zero point zp per row, [M, 1])
    acc = (u - zp) @ Qw^T            int32 [M, N]
    y   = acc * sw * sx (+ bias)

kernel_for() picks one kernel object per module, once (kept in module.kstate): OneDNN (one GEMM),
OneDNNSparse (8-bit activations on CPUs where one GEMM would saturate: a 7-bit GEMM operand plus a sparse
rest, in C), OneDNNSplit (the same without the C library: two halves of 7 bits in one GEMM of twice the
rows), or the reference (Int8Gemm); every call then goes to its gemm().

reference  the codes in float64 through BLAS: every int32 accumulator is exact.
onednn     torch.ops.onednn.qlinear_pointwise on u8 x s8 with int32 accumulation,
           prepacked weight kept in module.kstate. On CPUs without VNNI the
           u8 x s8 instruction (vpmaddubsw) adds pairs of products in *saturating*
           int16, so it is exact only while 2 * max(u) * max|Qw| <= 32767: true for
           7-bit activations (u <= 127, |Qw| <= 128), false for 8-bit ones. Whether
           the fast path is exact for a given activation width is probed once, on
           the worst case, and the reference path is used where it is not (logged
           once). torch._int_mm is exact but far slower than an fp32 matmul on
           AVX2 CPUs, so it is not used.
"""
from __future__ import annotations

import functools
import threading
import weakref

import torch
import torch.nn.functional as F

from ..core.quant import pair_sums
from . import _log_once, native

# -- activation quantization ------------------------------------------------------------

def quantize_act(x2: torch.Tensor, act, static_scale: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, int | torch.Tensor]:
    """x2 float [M, K] -> (u uint8 [M, K], sx float32 [M, 1] or [1, 1], zp) with x ~ (u - zp) * sx.

    Symmetric textbook grid: s = 2 max|x| / (2^b - 1), Qx = clamp(round(x / s), qmin, qmax), u = Qx - qmin,
    zp = -qmin (an int). Asymmetric (act.symmetric False): on [a, b] = [min(x, 0), max(x, 0)] per row (or
    of x), s = (b - a) / (2^b - 1), z = -round(a / s), u = clamp(round(x / s) + z, 0, 2^b - 1), zp = z
    (float32 [M, 1] or [1, 1], integer values). Both grids hold 0 exactly and keep |x - x_hat| <= s/2."""
    x2 = x2.float()
    top = float((1 << act.bits) - 1)
    if act.static:
        s = static_scale.reshape(1, 1).float()
    elif act.symmetric:
        m = x2.abs().amax(dim=-1, keepdim=True) if act.granularity == "token" else x2.abs().amax().reshape(1, 1)
        s = _positive(m * (2.0 / top))
    else:
        if act.granularity == "token":
            lo, hi = x2.amin(dim=-1, keepdim=True), x2.amax(dim=-1, keepdim=True)
        else:
            lo, hi = x2.amin().reshape(1, 1), x2.amax().reshape(1, 1)
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
        s = _positive((hi - lo) / top)
        z = torch.round(-lo / s).clamp_(0.0, top)
        u = (x2 / s).round_().add_(z).clamp_(0.0, top).to(torch.uint8)
        return u, s, z
    u = (x2 / s).round_().clamp_(act.qmin, act.qmax).sub_(act.qmin).to(torch.uint8)
    return u, s, -act.qmin


def _positive(s: torch.Tensor) -> torch.Tensor:
    """The scale rounded up to the next float32 (>= the exact s: the s/2 bound holds in fp32); 1 where 0."""
    s = torch.nextafter(s, torch.full_like(s, float("inf")))
    return torch.where(s > 0, s, torch.ones_like(s))


# -- integer GEMM -----------------------------------------------------------------------

def int8_gemm_reference(u: torch.Tensor, zp: int, qw: torch.Tensor) -> torch.Tensor:
    """(u - zp) @ qw^T exactly: int32 [M, N]. u uint8 [M, K], qw int8 [N, K]."""
    a = u.double() - zp
    return (a @ qw.double().T).to(torch.int32)


def _onednn_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")
    except Exception:
        return False


@functools.lru_cache(maxsize=64)
def _zeros(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.long)


@functools.lru_cache(maxsize=64)
def _ones(n: int) -> torch.Tensor:
    return torch.ones(n, dtype=torch.float32)


def _onednn_call(u: torch.Tensor, zp: int, packed: torch.Tensor, sw: torch.Tensor) -> torch.Tensor:
    """float32 [M, N] = ((u - zp) @ Qw^T) * sw, int32 accumulation inside oneDNN."""
    wz = _zeros(sw.shape[0])
    return torch.ops.onednn.qlinear_pointwise(u, 1.0, zp, packed, sw, wz, None, 1.0, 0, torch.float32,
                                              "none", [], "")


@functools.lru_cache(maxsize=None)
def onednn_exact(act_bits: int) -> bool:
    """Does oneDNN's u8 x s8 GEMM give exact sums for `act_bits`-bit activations and 8-bit weights here?

    Probed on the worst case (every u = 2^b - 1 against weights of -128 and 127, and the
    most negative inputs), K = 64, against the exact reference."""
    if not _onednn_available():
        return False
    try:
        K, zp = 64, 1 << (act_bits - 1)
        umax = (1 << act_bits) - 1
        u = torch.tensor([[umax] * K, [0] * K, [umax, 0] * (K // 2)], dtype=torch.uint8)
        qw = torch.tensor([[127] * K, [-128] * K, [-128, 127] * (K // 2), [127, -128] * (K // 2)], dtype=torch.int8)
        packed = torch.ops.onednn.qlinear_prepack(qw, None)
        got = _onednn_call(u, zp, packed, torch.ones(qw.shape[0]))
        want = int8_gemm_reference(u, zp, qw).float()
        return bool(torch.equal(got, want))
    except Exception:
        return False


@functools.lru_cache(maxsize=None)
def onednn_pairs_exact() -> bool:
    """Is oneDNN's u8 x s8 GEMM exact here for 8-bit activations against pair-bounded weights
    (|Qw[n, 2j]| + |Qw[n, 2j+1]| <= 128, nn/int8.pair_bounded_qtensor)? Probed on the worst cases: every
    u = 255 (and alternating 255, 0) against pairs (127, 1), (-128, 0), (64, 64), (-64, -64), (1, 127),
    with zero points 0 and 128."""
    if not _onednn_available():
        return False
    try:
        K = 64
        u = torch.tensor([[255] * K, [255, 0] * (K // 2), [0, 255] * (K // 2), [0] * K], dtype=torch.uint8)
        pairs = [(127, 1), (-128, 0), (64, 64), (-64, -64), (1, 127), (0, -128), (-127, -1)]
        qw = torch.tensor([list(p) * (K // 2) for p in pairs], dtype=torch.int8)
        packed = torch.ops.onednn.qlinear_prepack(qw, None)
        return all(torch.equal(_onednn_call(u, zp, packed, torch.ones(qw.shape[0])),
                               int8_gemm_reference(u, zp, qw).float()) for zp in (0, 128))
    except Exception:
        return False


def _pairs_bounded(module) -> bool:
    st = module.kstate
    if st.pairs_bounded is None:
        st.pairs_bounded = bool(int(pair_sums(module.weight_codes_int8()).max()) <= 128)
    return st.pairs_bounded


def _packed(module) -> torch.Tensor:
    st = module.kstate
    if st.onednn is None:
        st.onednn = torch.ops.onednn.qlinear_prepack(module.weight_codes_int8(), None)
    return st.onednn


def _transposed(module) -> torch.Tensor:
    """The int8 weight codes as [K, N], contiguous (kept): rows the sparse rest adds from."""
    st = module.kstate
    if st.codes_t is None:
        st.codes_t = module.weight_codes_int8().T.contiguous()
    return st.codes_t


def _weight_sums(module) -> tuple[torch.Tensor, int]:
    """(Σ_k Qw[n, k] as float64 [N], max_n Σ_k |Qw[n, k]|), kept."""
    st = module.kstate
    if st.sums is None:
        qw = module.weight_codes_int8()
        st.sums = (qw.sum(dim=1, dtype=torch.int64).double(), int(qw.abs().sum(dim=1, dtype=torch.int64).max()))
    return st.sums


class Int8Gemm:
    """How a module's integer matmul runs: gemm(module, u, zp, sw) -> float32 [M, N] = ((u - zp) @ Qw^T) * sw,
    or None where this kernel is not exact for the call (then the reference runs it). This base is the
    reference: the codes through float64 BLAS, every int32 accumulator exact."""

    name = "reference"

    def gemm(self, module, u: torch.Tensor, zp: int | torch.Tensor, sw: torch.Tensor) -> torch.Tensor | None:
        return int8_gemm_reference(u, zp, module.weight_codes_int8()).float() * sw

    def __repr__(self) -> str:
        return f"<int8 kernel {self.name}>"


class OneDNN(Int8Gemm):
    """One u8 x s8 GEMM; exact for the module's activation width on this CPU, or exact because the module's
    weight codes are pair-bounded (|Qw[n, 2j]| + |Qw[n, 2j+1]| <= 128, see `onednn_pairs_exact`), which
    keeps the instruction's int16 pair sums from saturating. Per-row zero points: the GEMM on u itself, the
    zero points' share subtracted after (`_exact_sums`)."""

    name = "onednn"

    def gemm(self, module, u, zp, sw):
        if not isinstance(zp, torch.Tensor):
            return _onednn_call(u.contiguous(), zp, _packed(module), sw)
        return _exact_sums(module, u, zp, sw, one_gemm=True)


class OneDNNSparse(Int8Gemm):
    """8-bit activations where one GEMM would saturate: the codes q = u - zp split into c = clamp(q, -64, 63),
    one exact 7-bit GEMM, plus the rest q - c, nonzero only at a row's largest values (a small share of the
    entries), added from the transposed weight codes in C (kernels/native.py). Exact while
    max|u - zp| * sum_k |Qw[n, k]| < 2^24 for every row n (all partial sums are integers below it, in
    float32; max|u - zp| = 128 symmetric, 255 asymmetric), checked once per module."""

    name = "onednn-sparse"

    def gemm(self, module, u, zp, sw):  # q = u - zp = c + e: c in [-64, 63] through the GEMM, the sparse e in C
        M = u.shape[0]
        L = native.lib()
        zr = (zp.to(torch.int32).expand(M, 1).reshape(M) if isinstance(zp, torch.Tensor)
              else torch.full((M,), zp, dtype=torch.int32))
        uc, rowptr, cols, vals = native.i8_split(L, u.contiguous(), zr.contiguous())
        acc = _onednn_call(uc, 64, _packed(module), _ones(sw.shape[0]))  # exact integer sums in float32
        if vals.numel():
            native.i8_sparse_add(L, rowptr, cols, vals, _transposed(module), acc)
        return acc.mul_(sw)


class OneDNNSplit(Int8Gemm):
    """The same without the C library: u = 128 b + r with r < 128 and b in {0, 1}, both halves in one GEMM
    of 2M rows (exact: u <= 127), combined as acc = R + 128 B - 128 rowsum(Qw), exact while
    127 * sum_k |Qw[n, k]| < 2^24."""

    name = "onednn-split"

    def gemm(self, module, u, zp, sw):
        return _exact_sums(module, u, zp, sw, one_gemm=False)


INT8_KERNELS: dict[str, Int8Gemm] = {k.name: k for k in (Int8Gemm(), OneDNN(), OneDNNSparse(), OneDNNSplit())}
INT8_REFERENCE = INT8_KERNELS["reference"]


def kernel_for(module) -> Int8Gemm:
    """How this module's integer matmul runs here (one of INT8_KERNELS, chosen once per module): OneDNN where
    one GEMM is exact, else for 8-bit activations OneDNNSparse (with the C library) or OneDNNSplit where the
    weight sums allow, else the reference."""
    kind = module.kstate.int8
    if kind is not None:
        return kind
    kind = INT8_REFERENCE
    if onednn_exact(module.act.bits) or (module.act.bits == 8 and _pairs_bounded(module) and onednn_pairs_exact()):
        kind = INT8_KERNELS["onednn"]
    elif module.act.bits == 8 and onednn_exact(7):
        l1 = _weight_sums(module)[1]
        if l1 * (128 if module.act.symmetric else 255) < 2**24 and native.lib() is not None:  # max |u - zp|
            kind = INT8_KERNELS["onednn-sparse"]
        elif l1 * 127 < 2**24:
            kind = INT8_KERNELS["onednn-split"]
        else:
            _log_once(f"int8: a {module.out_features}x{module.in_features} layer's weight sums are too large for "
                      "the exact split path; using the reference path for it")
    elif not _onednn_available():
        _log_once("int8: oneDNN is not available in this torch build; using the reference path")
    module.kstate.int8 = kind
    return kind


def int8_linear_scaled(module, u: torch.Tensor, zp: int | torch.Tensor) -> torch.Tensor:
    """float32 [M, N] = ((u - zp) @ Qw^T) * sw through the module's kernel; zp an int, or one per row
    (float32 [M, 1] of integers: asymmetric activations)."""
    sw = module.weight_scale()
    kernel = module.kstate.int8 or kernel_for(module)
    try:
        y = kernel.gemm(module, u, zp, sw)
    except RuntimeError as e:  # a shape or layout the kernel refuses: the reference path, from now on
        _log_once(f"int8: oneDNN refused a {module.out_features}x{module.in_features} layer "
                  f"({str(e).splitlines()[0][:80]}); using the reference path for it")
        module.kstate.int8 = INT8_REFERENCE
        y = None
    return y if y is not None else INT8_REFERENCE.gemm(module, u, zp, sw)


def _exact_sums(module, u: torch.Tensor, zp: int | torch.Tensor, sw: torch.Tensor, one_gemm: bool
                ) -> torch.Tensor | None:
    """(u - zp) @ Qw^T * sw from GEMMs on zero-point-free codes (one on u where `one_gemm` and its sums stay
    exact in float32, else one on u's two 7-bit halves), the zero points' share subtracted after; None where
    the weight sums are too large for either."""
    M = u.shape[0]
    colsum, l1 = _weight_sums(module)
    # every sum below is an integer of magnitude <= 255 * l1: exact in float32 when that is < 2^24
    dt = torch.float32 if l1 * 255 < 2**24 else torch.float64
    if one_gemm and l1 * ((1 << module.act.bits) - 1) < 2**24:  # one GEMM; its sums are exact in fp32
        acc = _onednn_call(u.contiguous(), 0, _packed(module), _ones(sw.shape[0])).to(dt)
    elif l1 * 127 < 2**24:
        # u = 128 b + r with r < 128 and b in {0, 1}: both halves in one GEMM of 2M rows (exact: u <= 127)
        halves = torch.cat([u & 127, u >> 7])  # [2M, K]
        out = _onednn_call(halves, 0, _packed(module), _ones(sw.shape[0])).to(dt)  # exact integer sums
        acc = out[:M].add_(out[M:], alpha=128.0)
    else:
        return None
    if isinstance(zp, torch.Tensor):
        acc.sub_(zp.to(dt) * colsum.to(dt))  # [M, 1] x [N]
    else:
        acc.sub_(colsum.to(dt), alpha=float(zp))
    return acc.float().mul_(sw)


# -- module forwards --------------------------------------------------------------------

_last_input = threading.local()


def quantized_input(module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int | torch.Tensor]:
    """quantize_act of x [..., K] (turned by the module's rotation first, where it has one).

    Linears that read one tensor one after another (q/k/v; gate/up: `module.share` = (group, position,
    size), set from the architecture's mappings) quantize it once: position i reuses the codes only when the
    call just before was position i-1 of the same group, on the very same tensor object (and version, where
    it has one), with the same rotation and activation grid. The last position clears them, so the next
    call of position 0 (the next token or layer, even into a buffer rewritten in place) computes afresh."""
    def fresh():
        return quantize_act(module.rotate_input(x.reshape(-1, x.shape[-1])), module.act, module.input_scale)

    share = getattr(module, "share", None)
    if module.act.static or share is None:
        _last_input.value = None
        return fresh()
    group, pos, size = share
    rot = (module.rot_a.data_ptr(), module.rot_b.data_ptr()) if module.rotated else None
    key = (group, module.act, rot, None if x.is_inference() else x._version, tuple(x.shape))
    last = getattr(_last_input, "value", None)
    _last_input.value = None
    reuse = pos > 0 and last is not None and last[0] == pos and last[1]() is x and last[2] == key
    got = last[3] if reuse else fresh()
    if pos + 1 < size:
        _last_input.value = (pos + 1, weakref.ref(x), key, got)
    return got


def w8a8_forward(module, x: torch.Tensor) -> torch.Tensor:
    """[..., K] -> [..., N] in x's dtype."""
    lead = x.shape[:-1]
    u, sx, zp = quantized_input(module, x)
    y = int8_linear_scaled(module, u, zp).mul_(sx)
    if module.bias is not None:
        y += module.bias.float()
    return y.to(x.dtype).reshape(*lead, module.out_features)


def llm_int8_forward(module, x: torch.Tensor) -> torch.Tensor:
    """LLM.int8(): outlier input columns (any |x| >= threshold) in float, the rest in int8 per token."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).float()
    cols = (x2.abs() >= module.threshold).any(dim=0).nonzero().flatten()
    module.calls += 1
    module.outlier_columns += int(cols.numel())
    module.last_outlier_columns = cols
    if cols.numel():
        x_reg = x2.index_fill(1, cols, 0.0)
        w_out = module.weight_codes_int8()[:, cols].float() * module.weight_scale()[:, None]  # [N, n_out]
        y_out = x2[:, cols] @ w_out.T
    else:
        x_reg, y_out = x2, None
    u, sx, zp = quantize_act(x_reg, module.act)
    y = int8_linear_scaled(module, u, zp) * sx
    if y_out is not None:
        y = y + y_out
    if module.bias is not None:
        y = y + module.bias.float()
    return y.to(x.dtype).reshape(*lead, module.out_features)


def reference_forward(module, x: torch.Tensor) -> torch.Tensor:
    """Plain float statement of W8A8 (no kernels): dequantized codes times dequantized weight (both in the
    rotated basis where the module is rotated)."""
    x2 = module.rotate_input(x.reshape(-1, x.shape[-1]).float())
    u, sx, zp = quantize_act(x2, module.act, module.input_scale)
    xq = (u.float() - zp) * sx
    y = F.linear(xq, module.stored_weight(), None if module.bias is None else module.bias.float())
    return y.to(x.dtype).reshape(*x.shape[:-1], module.out_features)
