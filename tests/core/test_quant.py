import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.core.quant import compute_qparams, dequantize, fake_quantize, grouped, quantize
from lowbit.core.scheme import Scheme
from lowbit.errors import LowbitError

# The s/2 bound is exact in real arithmetic; fp32 adds rounding relative to s
# (x/s, the rounding point) and relative to |x| (the product s*(Q-z)).
BOUND_RTOL = 1e-5
FP32_ULPS = 4 * torch.finfo(torch.float32).eps


def within_half_step(x, xh, s):
    return ((x - xh).abs() <= s / 2 * (1 + BOUND_RTOL) + FP32_ULPS * x.abs().maximum(xh.abs()) + 1e-30).all()


@st.composite
def matrices(draw, max_rows=6, max_cols=70):
    rows = draw(st.integers(1, max_rows))
    cols = draw(st.integers(1, max_cols))
    vals = draw(st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=rows * cols, max_size=rows * cols))
    return torch.tensor(vals, dtype=torch.float32).reshape(rows, cols)


@st.composite
def schemes(draw, cols=None):
    bits = draw(st.integers(2, 8))
    sym = draw(st.booleans())
    gran = draw(st.sampled_from(["tensor", "channel", "group"]))
    gs = draw(st.integers(1, 80)) if gran == "group" else None
    sd = draw(st.sampled_from(["float16", "float32", "bfloat16"]))
    return Scheme(bits=bits, symmetric=sym, granularity=gran, group_size=gs, scale_dtype=sd)


def per_element_scale(x, scheme, scale):
    xg = grouped(x, scheme)
    s = scale.float().unsqueeze(-1).expand_as(xg)
    rows, cols = x.shape
    return s.reshape(xg.shape[0], -1)[:, : (cols if scheme.granularity != "tensor" else rows * cols)].reshape(rows, cols)


@settings(max_examples=300, deadline=None)
@given(matrices(), schemes())
def test_error_at_most_half_a_step(x, scheme):
    qt = quantize(x, scheme)
    xh = dequantize(qt)
    s = per_element_scale(x, scheme, qt.scale)
    assert torch.isfinite(xh).all()
    assert within_half_step(x, xh, s)


@settings(max_examples=200, deadline=None)
@given(matrices(), schemes())
def test_codes_in_range(x, scheme):
    qt = quantize(x, scheme)
    assert int(qt.codes.min()) >= scheme.qmin and int(qt.codes.max()) <= scheme.qmax
    if not scheme.symmetric:
        assert int(qt.zero.min()) >= 0 and int(qt.zero.max()) <= scheme.qmax
    assert (qt.scale.float() > 0).all()


def test_textbook_formula_asymmetric():
    x = torch.tensor([[-1.0, 0.0, 0.5, 2.0]])
    sch = Scheme(bits=2, symmetric=False, granularity="channel", scale_dtype="float32")
    qt = quantize(x, sch)
    s = (2.0 - (-1.0)) / 3  # (b - a) / (2^k - 1)
    z = -round(-1.0 / s)  # -round(a / s)
    assert math.isclose(float(qt.scale), s, rel_tol=1e-7) and int(qt.zero) == z == 1
    expected = torch.clamp(torch.round(x / s) + z, 0, 3)
    assert torch.equal(qt.codes.float(), expected)
    assert torch.allclose(dequantize(qt), s * (expected - z))


def test_textbook_formula_symmetric():
    x = torch.tensor([[-3.0, 1.0, 2.9]])
    sch = Scheme(bits=4, symmetric=True, granularity="tensor", scale_dtype="float32")
    qt = quantize(x, sch)
    s = 6.0 / 15
    assert qt.zero is None and math.isclose(float(qt.scale), s, rel_tol=1e-7)
    assert torch.equal(qt.codes.float(), torch.clamp(torch.round(x / s), -8, 7))


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(2, 8), st.booleans())
def test_per_channel_beats_per_tensor(seed, bits, sym):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 256, generator=g) * torch.rand(64, 1, generator=g).add(0.1)  # rows of differing spread
    err = {}
    for gran in ("tensor", "channel"):
        sch = Scheme(bits=bits, symmetric=sym, granularity=gran, scale_dtype="float32")
        qt = quantize(w, sch)
        err[gran] = float((dequantize(qt) - w).pow(2).mean())
        assert within_half_step(w, dequantize(qt), qt.scale.float().max())
    assert err["channel"] <= err["tensor"]


@pytest.mark.parametrize("value", [0.0, 3.25, -7.0])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("gran", ["tensor", "channel", "group"])
def test_constant_and_zero_tensors(value, sym, gran):
    x = torch.full((4, 40), value)
    sch = Scheme(bits=4, symmetric=sym, granularity=gran, group_size=16 if gran == "group" else None)
    qt = quantize(x, sch)
    xh = dequantize(qt)
    assert torch.isfinite(qt.scale.float()).all() and (qt.scale.float() > 0).all()
    assert torch.isfinite(xh).all()
    if value == 0.0:
        assert torch.equal(xh, x)
    assert within_half_step(x, xh, qt.scale.float().max())


def test_short_last_group():
    x = torch.randn(3, 70)
    sch = Scheme(bits=4, symmetric=False, granularity="group", group_size=32)
    qt = quantize(x, sch)
    assert qt.scale.shape == (3, 3)
    # the last group (columns 64..69) has its own range
    last = x[:, 64:]
    expected = (last.amax(1).clamp(min=0) - last.amin(1).clamp(max=0)) / 15
    assert torch.all(qt.scale[:, 2].float() >= expected) and torch.allclose(qt.scale[:, 2].float(), expected, rtol=1e-3)


def test_fake_quantize_straight_through():
    x = torch.randn(4, 32, requires_grad=True)
    sch = Scheme(bits=3, symmetric=True, granularity="channel")
    y = fake_quantize(x, sch)
    assert torch.equal(y.detach(), dequantize(quantize(x.detach(), sch)))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # min/max range: everything is inside


def test_fake_quantize_clipped_outside_range():
    x = torch.tensor([[-10.0, -0.5, 0.0, 0.5, 10.0]], requires_grad=True)
    sch = Scheme(bits=4, symmetric=True, granularity="tensor", scale_dtype="float32")
    scale = torch.tensor([[0.1]])
    fake_quantize(x, sch, scale=scale).sum().backward()
    assert x.grad.tolist() == [[0.0, 1.0, 1.0, 1.0, 0.0]]


@pytest.mark.parametrize("bad", [dict(bits=1), dict(bits=9), dict(bits=4.0), dict(granularity="row"),
                                 dict(granularity="group", group_size=0), dict(scale_dtype="int8")])
def test_scheme_validation(bad):
    with pytest.raises(LowbitError):
        Scheme(**bad)


@pytest.mark.parametrize("gs", [0, -2, -128])
def test_cli_group_size_convention(gs):
    assert Scheme.from_cli(4, -1).granularity == "channel"
    with pytest.raises(LowbitError):
        Scheme.from_cli(4, gs)
