"""GPTQ's memory-lean path (core/gptq.py): H permuted and factored in its own memory for large layers, weights
swept as a list of parts. Equal to the reference path: exactly where the arithmetic is the same, within named
tolerances where the factorization's rounding differs."""
import pytest
import torch

from lowbit.core import gptq as G
from lowbit.core.scheme import Scheme

FACTOR_RTOL = 1e-5  # the in-place factor against torch's potrf/potri/potrf, relative to its largest entry
CODE_FLIPS = 0.005  # fraction of codes the factor's last-bit differences may move to the neighbouring level


def _hessian(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * n, n, generator=g) * torch.linspace(0.05, 3, n)
    return G.gram(x) * (2 / (3 * n))


@pytest.mark.parametrize("n,block", [(1, 4), (7, 4), (64, 16), (100, 32), (257, 64)])
def test_in_place_factor_equals_the_reference(n, block):
    H = _hessian(n)
    H.diagonal().add_(0.01 * H.diagonal().mean())
    want = G.inverse_hessian_factor(H.clone(), 0.0)
    got = G.inverse_hessian_factor_(H, block=block)
    assert got.data_ptr() == H.data_ptr()  # in place
    assert torch.equal(got, got.triu())
    assert (got - want).abs().max() <= FACTOR_RTOL * want.abs().max()


@pytest.mark.parametrize("n", [1, 2, 5, 64, 131])
def test_in_place_permutation_is_exact(n):
    H = _hessian(n)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    want = H[perm][:, perm]
    ptr = H.data_ptr()
    assert torch.equal(G.permute_symmetric_(H, perm), want) and H.data_ptr() == ptr


@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("symmetric", [True, False])
def test_weights_as_parts_equal_their_concatenation(act_order, symmetric):
    """Stacked sweeps take the parts as a list: codes, params and losses equal those of the concatenated weight."""
    torch.manual_seed(0)
    parts = [torch.randn(24, 96), torch.randn(8, 96).to(torch.bfloat16)]
    H = _hessian(96)
    H[5] = 0
    H[:, 5] = 0  # a dead column
    scheme = Scheme(4, symmetric, "group", 32)
    a, la = G.gptq_rows(parts, H, scheme, act_order=act_order)
    b, lb = G.gptq_rows(torch.cat([p.float() for p in parts]), H, scheme, act_order=act_order)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale) and torch.equal(la, lb)
    assert (a.zero is None) == (b.zero is None) and (a.zero is None or torch.equal(a.zero, b.zero))


@pytest.mark.parametrize("act_order", [True, False])
def test_consumed_large_hessian_takes_the_lean_path(monkeypatch, act_order):
    """With LEAN_N lowered, consume=True factors H in its own memory: the codes equal the reference path's
    except where the factor's rounding moves a value across a rounding boundary (counted, bounded)."""
    torch.manual_seed(1)
    W = torch.randn(48, 200)
    H = _hessian(200, seed=3)
    H[7] = 0
    H[:, 7] = 0
    scheme = Scheme(4, True, "group", 40)
    want, _ = G.gptq_rows(W, H, scheme, act_order=act_order)
    monkeypatch.setattr(G, "LEAN_N", 100)
    monkeypatch.setattr(G, "LEAN_BLOCK", 32)
    called = []
    real = G.inverse_hessian_factor_
    monkeypatch.setattr(G, "inverse_hessian_factor_", lambda h, block=32: called.append(1) or real(h, block))
    Hc = H.clone()
    got, _ = G.gptq_rows(W, Hc, scheme, act_order=act_order, consume=True)
    assert called, "the lean path was not taken"
    flips = (got.codes != want.codes).float().mean().item()
    assert flips <= CODE_FLIPS
    if act_order:  # static params (natural order fits them on updated weights, which a flip may move)
        assert torch.equal(got.scale, want.scale)
    # without consume the caller's H is left as it was
    H2 = H.clone()
    G.gptq_rows(W, H2, scheme, act_order=act_order)
    assert torch.equal(H2, H)


@pytest.mark.parametrize("n", [5, 300, 700])
def test_panelwise_accumulation_has_the_bits_of_the_running_mean(n):
    """Hessian.add never holds xᵀx whole, and gives the very bits of H·c/(c+m) + 2/(c+m)·gram(x)."""
    g = torch.Generator().manual_seed(n)
    xs = [torch.randn(m, n, generator=g) * 3 for m in (17, 64, 5, 33)]
    h = G.Hessian(n)
    want = torch.zeros(n, n)
    count = 0
    for x in xs:
        h.add(x)
        m = x.shape[0]
        want *= count / (count + m)
        count += m
        want.add_(G.gram(x), alpha=2 / count)
        assert torch.equal(h.H, want) and h.count == count


def test_linears_reading_one_input_share_one_h():
    """q, k, v observed as a group: one H tensor, added to once per input; a linear that then sees another
    input gets its own copy; take() says whether the caller holds the only reference."""
    lin = {n: torch.nn.Linear(16, 4) for n in ("q", "k", "v")}
    hs = G.Hessians(lin)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(8, 16, generator=g)
        hs.observe_group(["q", "k", "v"], x)
    assert hs["q"]._H is hs["k"]._H is hs["v"]._H and hs["k"].count == 24
    ref = G.Hessian(16)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        ref.add(torch.randn(8, 16, generator=g))
    assert torch.equal(hs["v"].H, ref.H)
    assert hs.distinct(["q", "k", "v"]) == ["q"]
    y = torch.randn(8, 16, generator=g)
    hs.observe("v", y)  # v alone sees another input: it stops sharing
    assert hs["v"]._H is not hs["q"]._H and torch.equal(hs["q"].H, ref.H)
    assert hs.shared(["q", "k", "v"]) == [["q", "k"], ["v"]]
    H, alone = hs.take("q")
    assert not alone  # k still holds it
    hs["k"].forget()
    H2, alone2 = hs.take("v")
    assert alone2



@pytest.mark.parametrize("n,unit,world", [(16, 8, 2), (17, 8, 2), (12, 8, 2), (8, 8, 2), (5, 8, 2), (40, 8, 3),
                                          (7, 1, 3), (3, 8, 4)])
def test_shard_takes_whole_batches(monkeypatch, n, unit, world):
    """Shares cover 0..n in order; in whole units (all but the last) whenever there are as many units as ranks."""
    from lowbit.core import dist

    monkeypatch.setattr(dist, "world_size", lambda: world)
    shares = []
    for r in range(world):
        monkeypatch.setattr(dist, "rank", lambda r=r: r)
        shares.append(dist.shard(n, unit))
    assert shares[0].start == 0 and shares[-1].stop == n
    assert all(a.stop == b.start for a, b in zip(shares, shares[1:]))
    if -(-n // unit) >= world:
        assert all(s.stop > s.start for s in shares)
        assert all((s.stop - s.start) % unit == 0 for s in shares[:-1])
