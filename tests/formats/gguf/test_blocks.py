"""GGUF block formats: gguf-py is the reference (its quantizers byte for byte, its decoder for all types),
and llama.cpp's own ggml_quantize_chunk where llama-cpp-python is installed."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from lowbit.formats.gguf.blocks import TYPES, get_type

LEGACY = ["BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
KQUANTS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
EXACT = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q6_K"]  # uncalibrated: all blocks equal
# relative RMS error of a round trip on Gaussian weights, per type (named bounds, generous by ~1.5x)
REL_RMSE = {"F32": 0.0, "F16": 1e-3, "BF16": 5e-3, "Q8_0": 0.01, "Q6_K": 0.03, "Q5_0": 0.065, "Q5_1": 0.06,
            "Q5_K": 0.055, "Q4_0": 0.13, "Q4_1": 0.12, "Q4_K": 0.11, "Q3_K": 0.23, "Q2_K": 0.45}


def weights(rows=16, cols=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * 0.05
    x[1, :64] = 0  # an all-zero block / sub-block
    x[2, 5] = 1.5  # an outlier
    x[3, 256:512] = 0.01  # a constant super-block
    return x.numpy()


@pytest.mark.parametrize("name", LEGACY)
def test_legacy_types_equal_gguf_py_bytes(name):
    x = weights()
    t = get_type(name)
    ours = t.quantize(x)
    ref = gguf_quantize(x, t.qtype)
    assert np.array_equal(ours, ref.reshape(ours.shape))


# Magnitudes below ~1e-30 make the block scale subnormal and its inverse infinite: ggml and gguf-py then cast
# inf/NaN to an integer (undefined behaviour in C, platform-dependent in numpy), so those inputs are left out.
_VALUES = st.one_of(st.just(0.0), st.floats(2.0 ** -20, 1e3, width=32), st.floats(-1e3, -(2.0 ** -20), width=32))


@settings(max_examples=40, deadline=None)
@given(arrays(np.float32, (3, 64), elements=_VALUES), st.sampled_from(LEGACY))
def test_legacy_types_equal_gguf_py_bytes_any_values(x, name):
    t = get_type(name)
    assert np.array_equal(t.quantize(x), gguf_quantize(x, t.qtype).reshape(3, -1))


@pytest.mark.parametrize("name", list(TYPES))
def test_round_trip_through_gguf_py(name):
    x = weights()
    t = get_type(name)
    data = t.quantize(x)
    assert data.shape == (x.shape[0], t.row_bytes(x.shape[1]))
    back = gguf_dequantize(data, t.qtype).reshape(x.shape)
    assert np.all(back[1, :64] == 0)
    rel = np.sqrt(((back - x) ** 2).mean()) / x.std()
    assert rel <= REL_RMSE[name], (name, rel)


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", *KQUANTS])
def test_importance_weights_lower_the_weighted_error(name):
    x = weights(rows=32)
    g = torch.Generator().manual_seed(1)
    qw = (torch.rand(x.shape[1], generator=g) ** 4 * 10).numpy()  # a few columns matter much more
    t = get_type(name)

    def werr(data):
        back = gguf_dequantize(data, t.qtype).reshape(x.shape)
        return float((((back - x) ** 2) * qw).sum())

    assert werr(t.quantize(x, qw)) < werr(t.quantize(x))


def test_uniform_importance_is_a_valid_quantization():
    """All-equal importance still gives a sane result (no division by the weights' scale)."""
    x = weights()
    for name in KQUANTS:
        t = get_type(name)
        back = gguf_dequantize(t.quantize(x, np.full(x.shape[1], 3.0, np.float32)), t.qtype).reshape(x.shape)
        assert np.sqrt(((back - x) ** 2).mean()) / x.std() <= REL_RMSE[name]


def test_rows_that_do_not_fit_are_refused():
    with pytest.raises(ValueError, match="not a multiple of 256"):
        get_type("Q4_K").quantize(np.zeros((2, 576), np.float32))


def _ggml_reference():
    """ggml_quantize_chunk from llama-cpp-python's libggml-base, or None."""
    try:
        import ctypes
        import pathlib

        import llama_cpp
    except ImportError:
        return None
    lib_dir = pathlib.Path(llama_cpp.__file__).parent / "lib"
    cands = sorted(lib_dir.glob("libggml-base.*"))
    if not cands:
        return None
    lib = ctypes.CDLL(str(cands[0]))
    f = lib.ggml_quantize_chunk
    f.restype = ctypes.c_size_t
    f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                  ctypes.c_void_p]

    def quantize(t, x, qw=None):
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.zeros((x.shape[0], t.row_bytes(x.shape[1])), np.uint8)
        q = None if qw is None else np.ascontiguousarray(qw, dtype=np.float32)
        f(int(t.qtype), x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1],
          None if q is None else q.ctypes.data)
        return out

    return quantize


@pytest.mark.parametrize("name", [*LEGACY[1:], *KQUANTS])
@pytest.mark.parametrize("calibrated", [False, True])
def test_blocks_match_llama_cpp(name, calibrated):
    """Same blocks as llama.cpp's quantizer (with and without an importance matrix).

    The searches run in float32 in ggml's order of operations, so most types are byte-identical. In a
    few blocks the least-squares refit of scale and min (a near-singular 2x2 system when a sub-block is
    almost constant) still lands an ulp apart and can pick another candidate: for those we require
    >= 97% identical blocks and the same total squared error within 0.5%."""
    ref = _ggml_reference()
    if ref is None:
        pytest.skip("llama-cpp-python is not installed (pip install llama-cpp-python)")
    t = get_type(name)
    x = weights(rows=64, cols=1024, seed=3)
    qw = None
    if calibrated:
        qw = (torch.rand(x.shape[1], generator=torch.Generator().manual_seed(2)) + 0.1).numpy()
    ours, theirs = t.quantize(x, qw), ref(t, x, qw)
    nb = x.size // t.block_size
    same = (ours.reshape(nb, -1) == theirs.reshape(nb, -1)).all(axis=1).mean()
    e_ours = ((gguf_dequantize(ours, t.qtype).reshape(x.shape) - x) ** 2).sum()
    e_ref = ((gguf_dequantize(theirs, t.qtype).reshape(x.shape) - x) ** 2).sum()
    if name in EXACT and not calibrated:
        assert same == 1.0, (name, same)
    assert same >= 0.97, (name, same)
    assert abs(e_ours - e_ref) <= 0.005 * e_ref, (name, e_ours / e_ref)


def _correlated(rows=32, cols=512, n=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * 0.05
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5 + torch.eye(cols)
    X = torch.randn(n, cols, generator=g) @ mix  # inputs with correlated columns
    return W, X, X.T @ X / n


@pytest.mark.parametrize("name", ["Q4_0", "Q5_1", *KQUANTS])
def test_gptq_with_identity_hessian_is_nearest_rounding_on_the_grid(name):
    """No error to compensate: every weight goes to its nearest code on the stored grid (= the requantize
    step of quantize() for the K-quants; Q4_0/Q5_1 pick codes inside their scale search, so there only
    the error is compared)."""
    t = get_type(name)
    x = weights(rows=16)
    plain = t.quantize(x)
    g = t.quantize_gptq(torch.from_numpy(x), torch.eye(x.shape[1]))
    back_p = gguf_dequantize(plain, t.qtype).reshape(x.shape)
    back_g = gguf_dequantize(g, t.qtype).reshape(x.shape)
    if name in KQUANTS:
        assert (back_p == back_g).mean() >= 0.999
    assert ((back_g - x) ** 2).sum() <= ((back_p - x) ** 2).sum() * 1.0001


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q8_0", *KQUANTS])
def test_gptq_on_the_grid_lowers_the_output_error(name):
    t = get_type(name)
    W, X, H = _correlated()
    qw = torch.diagonal(H)

    def out_err(data):
        back = torch.from_numpy(gguf_dequantize(data, t.qtype).reshape(W.shape))
        return float(((X @ (back - W).T) ** 2).sum())

    plain, gptq = t.quantize(W, qw), t.quantize_gptq(W, H, qw)
    # same block parameters (scales, mins), only the codes move
    a, b = plain.reshape(-1, t.type_size), gptq.reshape(-1, t.type_size)
    assert out_err(gptq) < out_err(plain)
    if name in ("Q4_0", "Q5_0", "Q8_0"):
        assert np.array_equal(a[:, :2], b[:, :2])
