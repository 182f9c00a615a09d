"""Orthogonal rotations (core/rotation.py): Hadamard constructions, orthogonality, the fast apply."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.core import rotation as R

# float32 rotation of O(1) values through two GEMMs of length <= 48: a few ulps of the row norm
ROT_ATOL = 1e-5


@pytest.mark.parametrize("n", [1, 2, 4, 8, 12, 20, 24, 48, 72, 96, 160, 576, 1536])
def test_hadamard_is_a_hadamard_matrix(n):
    h = R.hadamard(n)
    assert h is not None and h.shape == (n, n)
    assert set(h.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))  # exact: integer arithmetic


@pytest.mark.parametrize("n", [3, 6, 28, 37])
def test_orders_without_a_construction_give_none(n):
    assert R.hadamard(n) is None


def test_split_prefers_hadamard_factors_near_the_square_root():
    assert R.split(576) == (24, 24)
    assert R.split(1536) == (32, 48)
    assert R.split(37) == (1, 37)  # a prime: one dense (random orthogonal) factor


@pytest.mark.parametrize("n", [12, 72, 160, 576, 1536, 100, 37])
def test_rotation_is_orthogonal_and_matches_its_dense_form(n):
    fa, fb = R.make_rotation(n)
    q = R.dense(fa, fb)
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-6)
    x = torch.randn(7, n)
    y = R.rotate(x, fa, fb)
    assert torch.allclose(y.double(), x.double() @ q, atol=ROT_ATOL)
    assert torch.allclose(R.unrotate(y, fa, fb), x, atol=ROT_ATOL)


def test_rotation_is_deterministic():
    a = [t.clone() for t in R.make_rotation(576)]
    R.make_rotation.cache_clear()
    b = R.make_rotation(576)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(R.make_rotation(576, seed=1)[0], b[0])


@pytest.mark.parametrize("n", [72, 576, 1536])
def test_a_hadamard_rotation_spreads_a_spike_evenly(n):
    """One channel of 100 becomes n channels of 100/√n: the per-token scale no longer has to cover it."""
    x = torch.zeros(1, n)
    x[0, 5] = 100.0
    y = R.rotate(x, *R.make_rotation(n))
    assert torch.allclose(y.abs(), torch.full_like(y, 100 / math.sqrt(n)), rtol=1e-5)


@given(st.sampled_from([12, 40, 72, 100, 576]), st.integers(1, 6), st.floats(0.01, 1000.0))
@settings(max_examples=40, deadline=None)
def test_rotation_keeps_norms_and_dot_products(n, m, mag):
    g = torch.Generator().manual_seed(n * 7 + m)
    x, w = torch.randn(m, n, generator=g) * mag, torch.randn(3, n, generator=g)
    rot = R.make_rotation(n)
    xr, wr = R.rotate(x, *rot), R.rotate(w, *rot)
    assert torch.allclose(xr.norm(dim=1), x.norm(dim=1), rtol=1e-5)
    assert torch.allclose(xr @ wr.T, x @ w.T, rtol=1e-4, atol=1e-4 * mag * math.sqrt(n))


def test_has_hadamard_agrees_with_the_construction():
    from lowbit.core.rotation import has_hadamard, hadamard

    for n in range(1, 300):
        assert has_hadamard(n) == (hadamard(n) is not None), n


def test_split_builds_no_matrix(monkeypatch):
    """Fuzz finding: split(n) built hadamard(b) for every divisor b of n to test it (970 MB for n = 11008, a
    config's default intermediate_size): choosing the factors must build nothing."""
    import lowbit.core.rotation as R

    monkeypatch.setattr(R, "hadamard", lambda n: (_ for _ in ()).throw(AssertionError(f"built {n}")))
    a, b = R.split(11008)
    assert a * b == 11008 and a <= b



def test_split_chooses_as_before():
    """The same factors as choosing by building the matrices (the rule before has_hadamard)."""
    import math

    from lowbit.core.rotation import hadamard, split

    for n in range(1, 700):
        pairs = [(a, n // a) for a in range(1, math.isqrt(n) + 1) if n % a == 0]
        want = max(pairs, key=lambda p: ((hadamard(p[0]) is not None) + (hadamard(p[1]) is not None), p[0]))
        assert split(n) == want, n
