"""Integer matmul for W8A8 and LLM.int8(): a reference path and a oneDNN fast path.

    x [M, K] float --quantize_act--> u = Qx + 2^(b-1) (uint8 [M, K]), sx ([M, 1] or [1, 1])
    acc = (u - 2^(b-1)) @ Qw^T        int32 [M, N]
    y   = acc * sw * sx (+ bias)

kernel_for() picks, per module: onednn (one GEMM), onednn-split (8-bit activations on
CPUs where one GEMM would saturate: two halves of 7 bits in one GEMM), or reference.

reference  the codes in float64 through BLAS: every int32 accumulator is exact.
onednn     torch.ops.onednn.qlinear_pointwise on u8 x s8 with int32 accumulation,
           prepacked weight cached on the module. On CPUs without VNNI the
           u8 x s8 instruction (vpmaddubsw) adds pairs of products in *saturating*
           int16, so it is exact only while 2 * max(u) * max|Qw| <= 32767: true for
           7-bit activations (u <= 127, |Qw| <= 128), false for 8-bit ones. Whether
           the fast path is exact for a given activation width is probed once, on
           the worst case, and the reference path is used where it is not (logged
           once). torch._int_mm is exact but measured ~30x slower than an fp32
           matmul on this AVX2 CPU, so it is not used.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from . import _log_once

# -- activation quantization ------------------------------------------------------------

def quantize_act(x2: torch.Tensor, act, static_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x2 float [M, K] -> (u uint8 [M, K] = Qx - qmin, sx float32 [M, 1] or [1, 1]).

    Symmetric textbook grid: s = 2 max|x| / (2^b - 1), Qx = clamp(round(x / s), qmin, qmax)."""
    x2 = x2.float()
    if act.static:
        s = static_scale.reshape(1, 1).float()
    else:
        m = x2.abs().amax(dim=-1, keepdim=True) if act.granularity == "token" else x2.abs().amax().reshape(1, 1)
        s = m * (2.0 / ((1 << act.bits) - 1))
        s = torch.nextafter(s, torch.full_like(s, float("inf")))  # >= the exact s: the s/2 bound holds in fp32
        s = torch.where(s > 0, s, torch.ones_like(s))
    u = (x2 / s).round_().clamp_(act.qmin, act.qmax).sub_(act.qmin).to(torch.uint8)
    return u, s


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


def kernel_for(module) -> str:
    """How this module's integer matmul runs here:

    'onednn'        one u8 x s8 GEMM; exact for the module's activation width on this CPU
    'onednn-split'  8-bit activations where one GEMM would saturate: u = 128 b + r with r < 128 and
                    b in {0, 1}, both halves in one GEMM of 2M rows (exact: u <= 127), combined as
                    acc = R + 128 B - 128 rowsum(Qw). The halves come back as float32, exact while
                    127 * sum_k |Qw[n, k]| < 2^24 for every row n, which is checked once per module.
    'reference'     the codes through float64 BLAS
    """
    kind = module._kcache.get("int8_kernel")
    if kind is not None:
        return kind
    kind = "reference"
    if onednn_exact(module.act.bits):
        kind = "onednn"
    elif module.act.bits == 8 and onednn_exact(7):
        l1 = module.weight_codes_int8().abs().sum(dim=1, dtype=torch.int64)
        if int(l1.max()) * 127 < 2**24:
            kind = "onednn-split"
        else:
            _log_once(f"int8: a {module.out_features}x{module.in_features} layer's weight sums are too large for "
                      "the exact split path; using the reference path for it")
    elif not _onednn_available():
        _log_once("int8: oneDNN is not available in this torch build; using the reference path")
    module._kcache["int8_kernel"] = kind
    return kind


def _packed(module) -> torch.Tensor:
    packed = module._kcache.get("onednn")
    if packed is None:
        packed = module._kcache["onednn"] = torch.ops.onednn.qlinear_prepack(module.weight_codes_int8(), None)
    return packed


def int8_linear_scaled(module, u: torch.Tensor, zp: int) -> torch.Tensor:
    """float32 [M, N] = ((u - zp) @ Qw^T) * sw through the module's kernel."""
    sw = module.weight_scale()
    kind = kernel_for(module)
    if kind != "reference":
        try:
            return _fast(module, kind, u, zp, sw)
        except RuntimeError as e:  # a shape or layout the kernel refuses: the reference path, from now on
            _log_once(f"int8: oneDNN refused a {module.out_features}x{module.in_features} layer "
                      f"({str(e).splitlines()[0][:80]}); using the reference path for it")
            module._kcache["int8_kernel"] = "reference"
    return int8_gemm_reference(u, zp, module.weight_codes_int8()).float() * sw


def _fast(module, kind: str, u: torch.Tensor, zp: int, sw: torch.Tensor) -> torch.Tensor:
    if kind == "onednn":
        return _onednn_call(u.contiguous(), zp, _packed(module), sw)
    if kind == "onednn-split":
        M = u.shape[0]
        halves = torch.cat([u & 127, u >> 7])  # [2M, K], every value <= 127
        out = _onednn_call(halves, 0, _packed(module), _ones(sw.shape[0]))  # exact integer sums, as float32
        colsum = module._kcache.get("colsum")
        if colsum is None:
            colsum = module._kcache["colsum"] = module.weight_codes_int8().sum(dim=1, dtype=torch.int64).double()
        acc = out[:M].double().add_(out[M:].double(), alpha=128.0).sub_(colsum, alpha=float(zp))  # exact in float64
        return acc.float().mul_(sw)
    raise ValueError(f"unknown int8 kernel {kind!r}")


# -- module forwards --------------------------------------------------------------------

def w8a8_forward(module, x: torch.Tensor) -> torch.Tensor:
    """[..., K] -> [..., N] in x's dtype."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    u, sx = quantize_act(x2, module.act, module.input_scale)
    y = int8_linear_scaled(module, u, -module.act.qmin).mul_(sx)
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
    u, sx = quantize_act(x_reg, module.act)
    y = int8_linear_scaled(module, u, -module.act.qmin) * sx
    if y_out is not None:
        y = y + y_out
    if module.bias is not None:
        y = y + module.bias.float()
    return y.to(x.dtype).reshape(*lead, module.out_features)


def reference_forward(module, x: torch.Tensor) -> torch.Tensor:
    """Plain float statement of W8A8 (no kernels): dequantized codes times dequantized weight."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    u, sx = quantize_act(x2, module.act, module.input_scale)
    xq = (u.float() + module.act.qmin) * sx
    y = F.linear(xq, module.dequantize_weight(), None if module.bias is None else module.bias.float())
    return y.to(x.dtype).reshape(*x.shape[:-1], module.out_features)
