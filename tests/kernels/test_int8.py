"""Integer matmul paths: exact accumulators, the fast path equals the reference, the activation grid."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lowbit.kernels import int8 as K
from lowbit.kernels import native
from lowbit.nn.int8 import W8_CHANNEL, W8_TENSOR, ActQuant, Int8OutlierLinear, W8A8Linear

# float32 rescaling of the same int32 accumulators: only the order of two multiplications may differ.
RESCALE_RTOL = 1e-6


def _linear(n_in=96, n_out=40, seed=0, bias=True):
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out, bias=bias)


@pytest.mark.parametrize("bits", [7, 8])
def test_reference_gemm_is_exact(bits):
    g = torch.Generator().manual_seed(bits)
    u = torch.randint(0, 1 << bits, (13, 200), dtype=torch.uint8, generator=g)
    qw = torch.randint(-128, 128, (17, 200), dtype=torch.int8, generator=g)
    zp = 1 << (bits - 1)
    want = ((u.long() - zp) @ qw.long().T).to(torch.int32)
    assert torch.equal(K.int8_gemm_reference(u, zp, qw), want)


@pytest.mark.skipif(not K.onednn_exact(7), reason="oneDNN int8 GEMM not available")
@pytest.mark.parametrize("shape", [(1, 96, 40), (37, 576, 192), (5, 1536, 64)])
def test_onednn_integer_sums_equal_reference(shape):
    M, Kd, N = shape
    g = torch.Generator().manual_seed(M)
    u = torch.randint(0, 128, (M, Kd), dtype=torch.uint8, generator=g)
    qw = torch.randint(-128, 128, (N, Kd), dtype=torch.int8, generator=g)
    packed = torch.ops.onednn.qlinear_prepack(qw, None)
    got = K._onednn_call(u, 64, packed, torch.ones(N))  # unit scales: the float32 output *is* the int32 sum
    want = K.int8_gemm_reference(u, 64, qw)
    assert (want.abs() < 2**24).all()  # exactly representable in float32
    assert torch.equal(got, want.float())


def _kinds_here(bits: int) -> list[str]:
    """The kernels that can run `bits`-bit activations on this machine."""
    kinds = ["reference"]
    if K.onednn_exact(bits):
        kinds.append("onednn")
    elif bits == 8 and K.onednn_exact(7):
        kinds.append("onednn-split")
        if native.lib() is not None:
            kinds.append("onednn-sparse")
    return kinds


@pytest.mark.skipif(not K.onednn_exact(7), reason="oneDNN int8 GEMM not available")
@pytest.mark.parametrize("kind", ["auto", "onednn-split", "onednn-sparse"])
@pytest.mark.parametrize("K_in", [96, 1536])
def test_8bit_activations_are_exact_on_every_path(K_in, kind):
    """Whatever kernel runs 8-bit activations here (one GEMM, the sparse rest, the split, the reference), the
    integer sums are the exact ones: outputs equal the reference path bit for bit."""
    if kind != "auto" and kind not in _kinds_here(8):
        pytest.skip(f"{kind} does not run here")
    torch.manual_seed(K_in)
    lin = nn.Linear(K_in, 64, bias=False)
    m = W8A8Linear.from_linear(lin, act=ActQuant("token", bits=8))
    assert K.kernel_for(m).name == _kinds_here(8)[-1]  # the fastest exact one
    if kind != "auto":
        m.kstate.int8 = K.INT8_KERNELS[kind]
    x = torch.randn(9, K_in) * 3
    x[:, 4] = -50.0  # codes at both ends of the range
    x[0, 5] = 80.0
    x[1] = 0.01 * torch.randn(K_in)  # a row of small values: its largest entries alone leave the 7-bit range
    u, sx, zp = K.quantize_act(x, m.act)
    assert zp == 128
    fast = K.int8_linear_scaled(m, u, 128)
    ref = K.int8_gemm_reference(u, 128, m.weight_codes_int8()).float() * m.weight_scale()
    assert torch.equal(fast, ref)


@pytest.mark.skipif(not K.onednn_exact(7), reason="oneDNN int8 GEMM not available")
@pytest.mark.parametrize("kind", ["auto", "onednn-split", "onednn-sparse"])
@pytest.mark.parametrize("bits", [7, 8])
@pytest.mark.parametrize("K_in", [96, 1536])
def test_asymmetric_activations_are_exact_on_every_path(bits, K_in, kind):
    """Per-row zero points (asymmetric activations): the fast paths' integer sums equal the reference path's
    bit for bit."""
    if kind != "auto" and kind not in _kinds_here(bits):
        pytest.skip(f"{kind} does not run {bits}-bit activations here")
    torch.manual_seed(K_in + bits)
    m = W8A8Linear.from_linear(nn.Linear(K_in, 64, bias=False), act=ActQuant("token", bits=bits, symmetric=False))
    if kind != "auto":
        m.kstate.int8 = K.INT8_KERNELS[kind]
    x = torch.randn(9, K_in) * 3
    x[:, 4] = 50.0  # one-signed outlier: zero points far from the middle
    x[0, 5] = -80.0
    u, sx, zp = K.quantize_act(x, m.act)
    assert zp.shape == (9, 1) and zp.min() >= 0 and zp.max() <= (1 << bits) - 1
    fast = K.int8_linear_scaled(m, u, zp)
    ref = K.int8_gemm_reference(u, zp, m.weight_codes_int8()).float() * m.weight_scale()
    assert torch.equal(fast, ref)


@pytest.mark.skipif(native.lib() is None, reason="no C compiler here")
@pytest.mark.parametrize("zp", [128, "rows"])
def test_i8_split_equals_reference(zp):
    g = torch.Generator().manual_seed(1)
    u = torch.randint(0, 256, (23, 200), dtype=torch.uint8, generator=g)
    z = torch.randint(0, 256, (23,), dtype=torch.int32, generator=g) if zp == "rows" else torch.full((23,), 128, dtype=torch.int32)
    got = native.i8_split(native.lib(), u, z)
    want = native.i8_split_reference(u, z)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b)
    uc, rowptr, cols, vals = got
    assert int(uc.max()) <= 127 and vals.abs().max() <= 192  # the GEMM operand is 7-bit
    e = torch.zeros(23, 200)
    e[torch.repeat_interleave(torch.arange(23), rowptr.diff()), cols.long()] = vals
    assert torch.equal(uc.long() - 64 + e.long(), u.long() - z.long().view(-1, 1))  # c + e = q


def test_probe_says_where_the_fast_path_is_exact():
    # 7-bit activations never saturate the u8 x s8 pair sums (2 * 127 * 128 <= 32767).
    if K._onednn_available():
        assert K.onednn_exact(7)


@pytest.mark.parametrize("bits", [7, 8])
@pytest.mark.parametrize("act", [ActQuant("token"), ActQuant("tensor"), ActQuant("tensor", static=True),
                                 ActQuant("token", symmetric=False), ActQuant("tensor", symmetric=False)],
                         ids=lambda a: a.describe())
@pytest.mark.parametrize("scheme", [W8_CHANNEL, W8_TENSOR])
def test_w8a8_forward_equals_plain_float_statement(bits, act, scheme):
    act = ActQuant(act.granularity, act.static, bits, act.symmetric)
    lin = _linear()
    x = torch.randn(3, 11, 96)
    m = W8A8Linear.from_linear(lin, scheme, act=act, input_amax=float(x.abs().max()) if act.static else None)
    y = m(x)
    assert y.shape == (3, 11, 40)
    assert torch.allclose(y, K.reference_forward(m, x), rtol=RESCALE_RTOL, atol=1e-5)
    assert (y - lin(x)).abs().max() < 0.05 * lin(x).abs().max()


@given(st.integers(1, 40), st.floats(0.01, 100.0), st.sampled_from([7, 8]), st.booleans(), st.floats(-3.0, 3.0))
@settings(max_examples=60, deadline=None)
def test_activation_grid_error_bound(m, mag, bits, symmetric, shift):
    """|x - x̂| <= s/2 on the per-token textbook grid (symmetric or asymmetric), codes in range, 0 exact."""
    g = torch.Generator().manual_seed(m)
    x = (torch.randn(m, 33, generator=g) + shift) * mag
    x[:, 0] = 0.0
    act = ActQuant("token", bits=bits, symmetric=symmetric)
    u, s, zp = K.quantize_act(x, act)
    assert int(u.max()) <= (1 << bits) - 1
    q = u.float() - zp
    x_hat = q * s
    assert (x_hat[:, 0] == 0).all()
    # the check itself rounds in float32: allow a few ulps of |x| beyond s/2
    assert ((x_hat - x).abs() <= s / 2 + 4 * torch.finfo(torch.float32).eps * x.abs().amax(-1, keepdim=True)).all()
    if not symmetric:  # the asymmetric step is never coarser than the symmetric one
        _, s_sym, _ = K.quantize_act(x, ActQuant("token", bits=bits))
        assert (s <= s_sym * (1 + 1e-6)).all()


def test_asymmetric_static_activations_are_refused():
    from lowbit import LowbitError

    with pytest.raises(LowbitError, match="dynamic only"):
        ActQuant("tensor", static=True, symmetric=False)


def test_static_scale_clips_outside_the_calibrated_range():
    lin = _linear(bias=False)
    m = W8A8Linear.from_linear(lin, act=ActQuant("tensor", static=True), input_amax=1.0)
    u, s, _ = K.quantize_act(torch.full((1, 96), 50.0), m.act, m.input_scale)
    assert float(s) == pytest.approx(2 / 255) and int(u.max()) == 255  # clamped to qmax


def test_llm_int8_routes_outlier_columns_through_float():
    lin = _linear(bias=False)
    m = Int8OutlierLinear.from_linear(lin, threshold=6.0)
    x = torch.randn(2, 9, 96)
    x[0, 3, 7] = 40.0
    x[1, 0, 50] = -9.0
    y = m(x)
    assert m.last_outlier_columns.tolist() == [7, 50] and m.calls == 1 and m.outlier_columns == 2
    # the same computation written out: float for the outlier columns, per-token int8 for the rest
    x2 = x.reshape(-1, 96)
    w = m.dequantize_weight()
    reg = x2.clone()
    reg[:, [7, 50]] = 0
    u, s, zp = K.quantize_act(reg, m.act)
    want = ((u.float() - zp) * s) @ w.T + x2[:, [7, 50]] @ w[:, [7, 50]].T
    assert torch.allclose(y.reshape(-1, 40), want, rtol=RESCALE_RTOL, atol=1e-5)
    # the outlier does not blow up the error of the other columns, as it does for plain per-token W8A8
    err_int8 = (y - lin(x)).abs().max()
    err_w8a8 = (W8A8Linear.from_linear(lin)(x) - lin(x)).abs().max()
    assert err_int8 < err_w8a8


def test_llm_int8_without_outliers_is_w8a8():
    lin = _linear()
    x = torch.randn(4, 96).clamp(-5, 5)
    a = Int8OutlierLinear.from_linear(lin, threshold=6.0)
    b = W8A8Linear.from_linear(lin)
    assert torch.equal(a(x), b(x)) and a.outlier_columns == 0


def test_int8_weights_take_one_byte():
    m = W8A8Linear.from_linear(_linear(576, 192, bias=False))
    assert m.weight_nbytes() == 576 * 192 + 192 * 2  # codes + fp16 scales: half of FP16


def test_group_scheme_is_refused():
    from lowbit import LowbitError, Scheme

    with pytest.raises(LowbitError, match="per-channel or per-tensor"):
        W8A8Linear.from_linear(_linear(), Scheme(8, True, "group", 32))


def test_a_refusing_kernel_falls_back_to_the_reference(monkeypatch):
    lin = _linear()
    m = W8A8Linear.from_linear(lin, act=ActQuant("token", bits=7))
    x = torch.randn(4, 96)
    want = K.reference_forward(m, x)

    def refuse(*a, **k):
        raise RuntimeError("unsupported shape")

    for kernel in K.INT8_KERNELS.values():
        if kernel is not K.INT8_REFERENCE:
            monkeypatch.setattr(type(kernel), "gemm", refuse)
    assert torch.allclose(m(x), want, rtol=RESCALE_RTOL, atol=1e-5)
    assert K.kernel_for(m) is K.INT8_REFERENCE


# -- rotation and pair-bounded weights ---------------------------------------------------

def _outlier_input(m=16, k=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, 7] *= 60.0  # an emergent-outlier channel
    return x


@pytest.mark.parametrize("bits", [7, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("pair_bound", [False, True])
def test_rotated_w8a8_equals_its_float_statement(bits, symmetric, pair_bound):
    if pair_bound and bits == 7:
        pytest.skip("pair-bounded weights are for 8-bit activations")
    lin = _linear(96, 40)
    m = W8A8Linear.from_linear(lin, act=ActQuant("token", bits=bits, symmetric=symmetric), rotate=True,
                               pair_bound=pair_bound)
    x = _outlier_input().reshape(2, 8, 96)
    y = m(x)
    assert torch.allclose(y, K.reference_forward(m, x), rtol=RESCALE_RTOL, atol=1e-5)
    assert (y - lin(x)).abs().max() < 0.05 * lin(x).abs().max()


def test_rotation_cuts_the_error_of_an_outlier_channel():
    lin = _linear(96, 40, bias=False)
    x = _outlier_input()
    with torch.no_grad():
        err = {rot: float((W8A8Linear.from_linear(lin, rotate=rot)(x) - lin(x)).norm()) for rot in (False, True)}
    assert err[True] < err[False] / 2


def test_rotated_weight_dequantizes_in_the_model_basis():
    lin = _linear(96, 40, bias=False)
    m = W8A8Linear.from_linear(lin, rotate=True)
    plain = W8A8Linear.from_linear(lin)
    w = lin.weight.detach()
    assert (m.dequantize_weight() - w).norm() < 2 * (plain.dequantize_weight() - w).norm()
    assert m.rel_error == pytest.approx(float((m.dequantize_weight() - w).norm() / w.norm()), rel=1e-4)
    # what the integer GEMM multiplies: the stored codes times their scales, in the rotated basis
    assert torch.equal(m.stored_weight(), m.weight_codes_int8().float() * m.weight_scale()[:, None])


def test_shared_rotation_bytes_count_once():
    from lowbit.eval.size import weight_stats

    model = nn.Sequential(*[W8A8Linear.from_linear(_linear(96, 40, seed=i), rotate=True) for i in range(3)])
    codes = sum(m.weight_nbytes() for m in model)
    assert codes == 3 * (96 * 40 + 40 * 2)  # int8 codes + fp16 scales
    a, b = model[0].shared_tensors()
    assert model[2].shared_tensors()[0] is a
    assert weight_stats(model)["quantized_bytes"] == codes + 4 * (a.numel() + b.numel())


def test_rotated_static_activations_are_refused():
    from lowbit import LowbitError

    with pytest.raises(LowbitError, match="run time"):
        W8A8Linear.from_linear(_linear(), act=ActQuant("tensor", static=True), input_amax=1.0, rotate=True)


@given(st.integers(0, 1000), st.sampled_from([95, 96, 576]), st.floats(0.001, 10.0))
@settings(max_examples=40, deadline=None)
def test_pair_bounded_codes(seed, k, mag):
    """|Q[n, 2j]| + |Q[n, 2j+1]| <= 128 for every pair (an odd last column pairs with 0), codes in int8,
    and the textbook bound |w - ŵ| <= s/2 with the stored scale."""
    from lowbit.core.quant import pair_sums
    from lowbit.nn.int8 import pair_bounded_qtensor

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(12, k, generator=g) * mag
    w[0, :2] = mag * 5  # a pair at the maximum
    qt = pair_bounded_qtensor(w, W8_CHANNEL)
    assert int(pair_sums(qt.codes).max()) <= 128
    s = qt.scale.float()
    w_hat = qt.codes.float() * s
    assert ((w_hat - w).abs() <= s / 2 * (1 + 1e-6)).all()


@pytest.mark.skipif(not K.onednn_pairs_exact(), reason="no exact pair-bounded oneDNN GEMM here")
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("K_in", [96, 576, 1536])
def test_pair_bounded_weights_run_8bit_activations_in_one_exact_gemm(symmetric, K_in):
    torch.manual_seed(K_in)
    lin = nn.Linear(K_in, 64, bias=False)
    lin.weight.data[:, :2] *= 10  # neighbours both at the maximum
    m = W8A8Linear.from_linear(lin, act=ActQuant("token", bits=8, symmetric=symmetric), pair_bound=True)
    assert K.kernel_for(m).name == "onednn"
    x = torch.randn(9, K_in) * 3
    x[:, 4] = 50.0
    x[0, 5] = -80.0
    u, sx, zp = K.quantize_act(x, m.act)
    fast = K.int8_linear_scaled(m, u, zp)
    ref = K.int8_gemm_reference(u, zp, m.weight_codes_int8()).float() * m.weight_scale()
    assert torch.equal(fast, ref)


def test_linears_reading_one_tensor_share_its_codes(monkeypatch):
    """q/k/v (or gate/up) read the same tensor one after another: one rotation and quantization serves the
    group; the next call of its first member, a tensor written to in place, or another tensor computes
    afresh."""
    calls = []
    real = K.quantize_act
    monkeypatch.setattr(K, "quantize_act", lambda *a, **k: calls.append(1) or real(*a, **k))
    mods = [W8A8Linear.from_linear(_linear(96, 40 - 8 * i, seed=i), rotate=True) for i in range(3)]
    for i, m in enumerate(mods):
        m.share = ("blk.q+k+v", i, 3)
    x = _outlier_input()
    ys = [m(x) for m in mods]
    assert len(calls) == 1
    for m, y in zip(mods, ys):
        assert torch.allclose(y, K.reference_forward(m, x), rtol=RESCALE_RTOL, atol=1e-5)  # the right codes
    calls.clear()
    mods[0](x), mods[1](x.clone())
    assert len(calls) == 2  # position 0 always computes; another tensor object too
    calls.clear()
    mods[0](x)
    x.mul_(2.0)
    mods[1](x)
    assert len(calls) == 2  # the version moved: quantized again
    calls.clear()
    mods[0](x), mods[2](x)
    assert len(calls) == 2  # not the next position of the group


def test_shared_codes_are_not_reused_across_a_buffer_rewritten_in_place():
    """The lean decoder writes each layer's normed input into one buffer in C (no version bump): a group's
    first member always quantizes afresh, so layer after layer gets its own codes."""
    mods = [W8A8Linear.from_linear(_linear(96, 40, seed=i), rotate=True) for i in range(2)]
    for i, m in enumerate(mods):
        m.share = ("blk.gate+up", i, 2)
    with torch.inference_mode():
        h = _outlier_input()
        [m(h) for m in mods]
        h.copy_(torch.randn(16, 96))  # the next layer's input, same buffer
        got = [m(h) for m in mods]
        want = [K.reference_forward(m, h) for m in mods]
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=RESCALE_RTOL, atol=1e-5)
