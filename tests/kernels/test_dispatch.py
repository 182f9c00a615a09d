"""Run-time CPU dispatch of the native kernels (issue 25): one library per instruction set, each path checked where
this CPU runs it (skipped with the reason elsewhere), and the plain-C fallback forced on any CPU."""
import pytest
import torch

from lowbit.kernels import native as N
from tests.kernels.test_native import CASES, F32_RTOL, close, qlinear

pytestmark = pytest.mark.skipif(N.lib() is None, reason="no C compiler: the lean decoder uses torch ops")


def gemm(L, qw, x):
    out = torch.empty(x.shape[0], qw.N)
    N.gemm_q(L, qw, x, out)
    return out


def matvec(L, qw, x):
    out = torch.empty(qw.N)
    N.linear_q(L, qw, x, out)
    return out


def isa_lib(isa):
    if isa not in N.supported_isas():
        pytest.skip(f"this CPU has no {isa} (flags: {' '.join(k for k, v in N.cpu_features().items() if v)}): "
                    f"the {isa} kernels are compiled elsewhere, not tested here")
    L = N.lib(isa)
    assert L is not None and N.isa(L) == isa
    return L


def with_ab(qw, ab):
    if qw.G % ab:
        pytest.skip(f"activation blocks of {ab} do not divide groups of {qw.G}")
    qw.ab = ab
    qw._check()
    return qw


@pytest.mark.parametrize("ab", [32, 64, 128])
@pytest.mark.parametrize("isa", ["avx512-amx", "avx512-vnni", "generic"])
@pytest.mark.parametrize("bits,sym,group,K", CASES)
def test_every_path_gives_its_twins_bits(isa, bits, sym, group, K, ab):
    """Two float orders over the same exact integers (decode.c): the exact per-block integers then one fma sequence
    per output (plain C everywhere, the AMX GEMM, and every build's GEMM for blocks of 64 or 128), and the lane
    order of the SIMD builds' matvec and of their GEMM at blocks of 32 (maddubs + madd and vpdpbusd give the same
    lanes). Each path equals its twin bit for bit, and the other order within float32 rounding."""
    other, avx2, generic = isa_lib(isa), isa_lib("avx2"), isa_lib("generic")
    qw = with_ab(N.QWeight([qlinear(bits, sym, group, K, n, bias=True, seed=n) for n in (64, 7)]), ab)
    for M in (5, 37):
        for x in (torch.randn(M, K, generator=torch.Generator().manual_seed(M)),):
            for xin in (x, x.to(torch.bfloat16)):
                g = gemm(other, qw, xin)
                exact = ab != 32 or isa == "generic" or (isa == "avx512-amx" and M >= 16)
                assert torch.equal(g, gemm(generic if exact else avx2, qw, xin))
                assert close(g, gemm(avx2, qw, xin), F32_RTOL)
    mv, mv2 = matvec(other, qw, x[0].contiguous()), matvec(avx2, qw, x[0].contiguous())
    if isa == "generic" and ab == 32:  # the SIMD builds' decode matvec sums its lanes in its own float order
        assert close(mv, mv2, F32_RTOL)
    else:
        assert torch.equal(mv, mv2)


@pytest.mark.parametrize("ab", [32, 128])
@pytest.mark.parametrize("isa", ["avx512-amx", "avx2", "generic"])
@pytest.mark.parametrize("bits,sym,group,K", CASES)
def test_each_path_equals_the_reference(isa, bits, sym, group, K, ab):
    L = isa_lib(isa)
    qw = with_ab(N.QWeight([qlinear(bits, sym, group, K, n, bias=True, seed=n) for n in (64, 7)]), ab)
    x = torch.randn(20, K, generator=torch.Generator().manual_seed(1))
    out = gemm(L, qw, x)
    assert close(out, N.gemm_q_reference(qw, x, torch.float32), F32_RTOL)
    row = matvec(L, qw, x[2].contiguous())
    if isa == "avx512-amx" and ab == 32:  # the AMX GEMM's order against the matvec's lanes: float32 rounding apart
        assert close(out[2], row, F32_RTOL)
    else:  # the same order in both: the GEMM's rows are the matvec's
        assert torch.equal(out[2], row)


def test_forced_fallback(monkeypatch):
    monkeypatch.setenv("LOWBIT_ISA", "generic")
    assert N.selected_isa() == "generic"
    monkeypatch.setattr(N, "_LIB", [])
    L = N.lib()
    assert L is not None and N.isa(L) == "generic" and N.describe().startswith("generic")
    monkeypatch.setenv("LOWBIT_ISA", "no-such-isa")
    with pytest.raises(OSError):
        N.selected_isa()


def test_the_best_supported_path_is_the_default(monkeypatch):
    monkeypatch.delenv("LOWBIT_ISA", raising=False)
    best = N.supported_isas()[0]
    assert N.selected_isa() == best
    assert N.describe().split()[0] == N.isa(N.lib()) == (best if best != "native" else N.isa(N.lib()))


@pytest.mark.parametrize("isa", ["avx512-amx", "avx512-vnni", "avx2", "generic"])
def test_degenerate_activation_blocks_give_the_same_codes_on_every_path(isa):
    """Blocks of near-zero values (1 / d overflows: zeros) and non-finite values (clamped codes) quantize alike
    on every path; the outputs of the finite rows stay finite and equal to the generic build's."""
    L, ref = isa_lib(isa), isa_lib("generic")
    twin = ref if isa in ("avx512-amx", "generic") else isa_lib("avx2")  # 20 rows: AMX's exact order; else lanes
    qw = N.QWeight([qlinear(4, True, 128, 576, n, bias=False, seed=n) for n in (64, 7)])
    x = torch.randn(20, 576)
    x[:, :32] = 1e-39  # subnormal: 1 / d overflows
    x[3, 100] = float("inf")
    x[4, 200] = float("nan")
    a = gemm(L, qw, x)
    fine = [m for m in range(20) if m not in (3, 4)]
    assert torch.isfinite(a[fine]).all() and torch.equal(a[fine], gemm(twin, qw, x)[fine])
    assert close(a[fine], gemm(ref, qw, x)[fine], F32_RTOL)
