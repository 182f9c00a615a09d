"""The budget solver: exact on small cases (brute force), budget respected, bounds honest, sizes parsed."""
import itertools
import random

import pytest
from hypothesis import given, settings, strategies as st

from lowbit.core.budget import Choice, Item, parse_size, solve
from lowbit.errors import LowbitError


def _brute(items, budget):
    best = None
    for combo in itertools.product(*[range(len(it.choices)) for it in items]):
        b = sum(it.choices[j].bytes for it, j in zip(items, combo))
        if b > budget:
            continue
        c = sum(it.choices[j].cost for it, j in zip(items, combo))
        if best is None or c < best:
            best = c
    return best


def _items(rng, n, k, unit=1):
    items = []
    for i in range(n):
        ch = [Choice(f"c{j}", unit * rng.randint(1, 40), rng.uniform(0, 10)) for j in range(k)]
        items.append(Item(f"t{i}", tuple(ch)))
    return items


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 5), st.integers(1, 4), st.integers(0, 200))
def test_exact_against_brute_force(seed, n, k, extra):
    rng = random.Random(seed)
    items = _items(rng, n, k)
    smallest = sum(min(c.bytes for c in it.choices) for it in items)
    budget = smallest + extra
    a = solve(items, budget)
    assert a.bytes <= budget
    assert a.bytes == sum(a.choice(it.name).bytes for it in items)
    assert a.cost == pytest.approx(sum(a.choice(it.name).cost for it in items))
    opt = _brute(items, budget)
    assert a.exact
    assert a.cost == pytest.approx(opt, abs=1e-9)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 5), st.integers(1, 4), st.integers(0, 200))
def test_bound_holds_without_dp(seed, n, k, extra):
    """With the exact pass off: within the budget, and the lower bound is below the true optimum."""
    rng = random.Random(seed)
    items = _items(rng, n, k, unit=7)
    budget = sum(min(c.bytes for c in it.choices) for it in items) + extra
    a = solve(items, budget, max_states=0)
    assert a.bytes <= budget
    opt = _brute(items, budget)
    assert a.lower_bound <= opt + 1e-9
    assert a.cost >= opt - 1e-9
    assert a.cost - a.gap == pytest.approx(a.lower_bound) or a.gap == 0


def test_infeasible_and_bad_items():
    items = [Item("a", (Choice("x", 10, 1.0),))]
    with pytest.raises(LowbitError, match="below the smallest"):
        solve(items, 9)
    with pytest.raises(LowbitError, match="no candidate"):
        solve([Item("a", ())], 100)
    with pytest.raises(LowbitError, match="twice"):
        solve(items + items, 100)


def test_large_budget_takes_best_and_ties():
    items = [Item(f"t{i}", (Choice("lo", 10, 5.0), Choice("hi", 20, 1.0), Choice("waste", 30, 1.0))) for i in range(3)]
    a = solve(items, 10_000)
    assert all(a.choice(f"t{i}").label == "hi" for i in range(3)) and a.bytes == 60


def test_parse_size():
    assert parse_size("80MB") == 80_000_000
    assert parse_size("80 MiB") == 80 * 2**20
    assert parse_size("1.5G") == 1_500_000_000
    assert parse_size("123456") == 123456
    assert parse_size(42) == 42
    for bad in ("", "abc", "-5MB", "0", "5 TB"):
        with pytest.raises(LowbitError):
            parse_size(bad)


def _brute_fill(items, budget, min_bytes):
    """(least cost, that it exists) over allocations with min_bytes <= bytes <= budget."""
    best = None
    for combo in itertools.product(*[range(len(it.choices)) for it in items]):
        b = sum(it.choices[j].bytes for it, j in zip(items, combo))
        if min_bytes <= b <= budget:
            c = sum(it.choices[j].cost for it, j in zip(items, combo))
            best = c if best is None or c < best else best
    return best


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 5), st.integers(1, 4), st.integers(0, 200), st.floats(0.5, 1.0))
def test_fill_spends_at_least_min_bytes(seed, n, k, extra, frac):
    """min_bytes: the allocation uses at least that many bytes whenever any allocation in [min_bytes, budget]
    exists and the greedy fill finds one; never over the budget; never cheaper than the unconstrained optimum
    (the lower bound stays that optimum's); unchanged when the optimum already spends enough."""
    rng = random.Random(seed)
    items = _items(rng, n, k)
    smallest = sum(min(c.bytes for c in it.choices) for it in items)
    budget = smallest + extra
    free = solve(items, budget)
    min_bytes = int(frac * budget)
    a = solve(items, budget, min_bytes=min_bytes)
    assert a.bytes <= budget
    assert a.bytes == sum(a.choice(it.name).bytes for it in items)
    assert a.cost == pytest.approx(sum(a.choice(it.name).cost for it in items))
    assert a.cost >= free.cost - 1e-9 and a.lower_bound <= a.cost + 1e-9
    if free.bytes >= min_bytes:
        assert a.picks == free.picks
    elif a.bytes < min_bytes:  # the fill stopped: no single change adding bytes fits any more
        for it in items:
            cur = a.choice(it.name)
            assert all(c.bytes <= cur.bytes or a.bytes + c.bytes - cur.bytes > budget for c in it.choices)
    else:
        assert _brute_fill(items, budget, min_bytes) is not None

