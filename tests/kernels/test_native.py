"""kernels/decode.c against its torch references (kernels/native.py), and the C build's failure path."""
import pytest
import torch
from torch import nn

from lowbit.core.scheme import Scheme
from lowbit.kernels import native as N
from lowbit.nn.qlinear import QuantLinear

L = N.lib()
pytestmark = pytest.mark.skipif(L is None, reason="no C compiler: the lean decoder uses torch ops")

F32_RTOL = 1e-5  # float32 sums in another order (vectorized)
BF16_RTOL = 2 ** -7  # one bf16 rounding step where the float32 value before rounding differs in its last bits


def close(a, b, rtol):
    return (a.float() - b.float()).abs().max().item() <= rtol * b.float().abs().max().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_y", [True, False])
def test_add_rmsnorm(dtype, with_y):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(576, generator=g)
    y = torch.randn(576, generator=g).to(dtype) if with_y else None
    w = torch.randn(576, generator=g)
    x_ref, out = x.clone(), torch.empty(576, dtype=dtype)
    N.add_rmsnorm(L, x, y, w, 1e-5, out)
    ref = N.add_rmsnorm_reference(x_ref, y, w, 1e-5, dtype)
    assert torch.equal(x, x_ref)  # the residual update is one float32 add per element
    assert close(out, ref, BF16_RTOL if dtype == torch.bfloat16 else F32_RTOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_silu_mul(dtype):
    gu = torch.randn(2 * 1536, generator=torch.Generator().manual_seed(1)).to(dtype)
    out = torch.empty(1536, dtype=dtype)
    N.silu_mul(L, gu, out)
    assert close(out, N.silu_mul_reference(gu, dtype), BF16_RTOL if dtype == torch.bfloat16 else F32_RTOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("nh,nkv,hd,pos", [(9, 3, 64, 0), (9, 3, 64, 37), (4, 4, 32, 100), (8, 2, 16, 7)])
def test_attn_decode(dtype, nh, nkv, hd, pos):
    g = torch.Generator().manual_seed(pos)
    max_len = 128
    qkv = torch.randn((nh + 2 * nkv) * hd, generator=g).to(dtype)
    cos, sin = torch.randn(hd, generator=g), torch.randn(hd, generator=g)
    kc = torch.randn(nkv, max_len, hd, generator=g).half()
    vc = torch.randn(nkv, max_len, hd, generator=g).half()
    kc_ref, vc_ref = kc.clone(), vc.clone()
    out = torch.empty(nh * hd, dtype=dtype)
    N.attn_decode(L, qkv, cos, sin, kc, vc, pos, nh, nkv, hd, hd ** -0.5, torch.empty(nh * max_len + (nh + nkv) * hd), out)
    ref = N.attn_decode_reference(qkv, cos, sin, kc_ref, vc_ref, pos, nh, nkv, hd, hd ** -0.5, dtype)
    assert torch.equal(vc, vc_ref)  # v rows copied; other positions untouched
    assert (kc.float() - kc_ref.float()).abs().max() <= 2 ** -10 * kc_ref.float().abs().max()  # k roped (fma), then fp16
    assert close(out, ref, BF16_RTOL if dtype == torch.bfloat16 else F32_RTOL)


def qlinear(bits, sym, group, K, N_out, bias=False, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(K, N_out, bias=bias)
    scheme = Scheme(bits, sym, "channel") if group is None else Scheme(bits, sym, "group", group)
    return QuantLinear.from_linear(lin, scheme)


CASES = [(4, True, 128, 576), (4, False, 128, 576), (4, True, 64, 128), (4, False, 64, 1536), (4, True, None, 192),
         (8, True, None, 576), (8, False, 128, 576), (8, True, 32, 96)]


@pytest.mark.parametrize("bits,sym,group,K", CASES)
def test_qweight_holds_the_modules_weight(bits, sym, group, K):
    m = qlinear(bits, sym, group, K, 48)
    qw = N.QWeight([m])
    assert qw.weights[0].data_ptr() == m.qweight.data_ptr()  # read in place, not copied
    reps = qw.G
    s = qw.s.repeat_interleave(reps, 1)[:, :K]
    sz = qw.sz.repeat_interleave(reps, 1)[:, :K]
    assert torch.allclose(s * qw.codes() - sz, m.dequantize_weight(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("xdtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits,sym,group,K", CASES)
def test_linear_q_equals_its_reference_and_the_float_matvec(bits, sym, group, K, xdtype):
    mods = [qlinear(bits, sym, group, K, n, bias=True, seed=n) for n in (64, 36, 8)]  # segments, N % 4 != 0
    qw = N.QWeight(mods)
    x = torch.randn(K, generator=torch.Generator().manual_seed(3)).to(xdtype)
    out = torch.empty(qw.N)
    N.linear_q(L, qw, x, out)
    ref = N.linear_q_reference(qw, x, torch.float32)
    assert close(out, ref, F32_RTOL)  # exact integer dots; float combination in another order
    full = torch.cat([m(x.float().unsqueeze(0))[0] for m in mods])
    assert close(out, full, 2e-2)  # int8 activations per 32 columns (llama.cpp's Q8_0) against float x


@pytest.mark.parametrize("interleave", [False, True])
def test_activation_quantization_is_within_half_a_step(interleave):
    x = torch.randn(4096, generator=torch.Generator().manual_seed(4)) * 3
    xq, d, cols = N.quantize_act_reference(x, interleave)
    assert xq.abs().max() <= 127 and torch.equal(cols.flatten().sort().values, torch.arange(4096))
    err = (x[cols] - xq.float() * d.unsqueeze(1)).abs()
    assert (err <= d.unsqueeze(1) / 2 * (1 + 1e-6)).all()


def test_applies_only_where_the_layout_fits():
    assert N.QWeight.applies([qlinear(4, True, 128, 576, 16)])
    assert not N.QWeight.applies([qlinear(4, True, 128, 96, 16)])  # 4-bit needs K % 64
    assert not N.QWeight.applies([qlinear(4, True, 32, 192, 16)])  # 4-bit: groups of 64k columns
    assert N.QWeight.applies([qlinear(8, True, 32, 192, 16)])  # 8-bit: groups of 32k columns
    assert not N.QWeight.applies([qlinear(3, True, 128, 576, 16)])
    assert not N.QWeight.applies([qlinear(4, True, 128, 576, 16), qlinear(4, False, 128, 576, 16)])


def test_loading_the_library_keeps_denormals():
    # a library linked with -ffast-math would switch the process to flush-to-zero when loaded
    assert (torch.tensor([1e-40]) * 1).item() != 0


def test_build_failure_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with pytest.raises(OSError):
        N.build(tmp_path)
    assert not list(tmp_path.glob("*.so"))  # nothing half-written
