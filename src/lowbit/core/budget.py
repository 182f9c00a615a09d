"""Budgeted allocation: one choice (scheme, tensor type) per tensor, least summed cost under a byte budget.

The problem is a multiple-choice knapsack: items (tensors, or groups of tensors that must share a choice,
such as tied ones), each with choices of (bytes, cost); pick one choice per item so that the bytes sum to at
most the budget and the costs sum to the least. `solve` does it in three steps:

1. the LP relaxation (= the Lagrangian dual): per item the lower convex hull of its choices in the
   (bytes, cost) plane; upgrades along the hulls taken in order of cost saved per byte until the budget
   runs out; the first upgrade that no longer fits, taken fractionally, gives a lower bound on the optimum;
2. a repair pass: the upgrades left over (hull or not) that still fit, best saving per byte first;
3. exact dynamic programming over bytes when the budget in units of the bytes' common divisor is small
   enough (`max_states`), which replaces the greedy answer when it is better.

The result carries its cost, the lower bound and the gap between them: the answer is within `gap` of the
optimum (0 when exact). Everything here is pure Python on numbers; what the costs mean is the caller's.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from ..errors import LowbitError

PLAN_FORMAT = "lowbit-budget-plan/1"  # the JSON plans of algorithms/budget.py and formats/gguf/budget.py


@dataclass(frozen=True)
class Choice:
    label: str  # what the choice is ("W4 g128 asym", "Q4_K"): shown in plans, parsed back by the caller
    bytes: int
    cost: float


@dataclass(frozen=True)
class Item:
    name: str
    choices: tuple[Choice, ...]
    weights: int = 0  # number of weights (for bits per weight)


@dataclass
class Allocation:
    picks: dict[str, int]  # item name -> index into its choices
    bytes: int
    cost: float
    lower_bound: float  # no allocation within the budget costs less
    exact: bool
    budget: int
    items: dict[str, Item] = field(default_factory=dict, repr=False)

    @property
    def gap(self) -> float:
        return max(0.0, self.cost - self.lower_bound)

    def choice(self, name: str) -> Choice:
        return self.items[name].choices[self.picks[name]]


def parse_size(text: str | int) -> int:
    """'80MB', '80 MiB', '1.5G', '123456' (bytes) -> bytes. MB = 10^6, MiB = 2^20."""
    if isinstance(text, int) and not isinstance(text, bool):
        n = text
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgG]?)(i?)([bB]?)\s*", str(text))
        if not m:
            raise LowbitError(f"bad size {text!r}: expected bytes or a number with kB/MB/GB/KiB/MiB/GiB, e.g. 80MB")
        num, unit, binary, _ = m.groups()
        power = {"": 0, "k": 1, "m": 2, "g": 3}[unit.lower()]
        n = int(float(num) * (1024 if binary else 1000) ** power)
    if n <= 0:
        raise LowbitError(f"size must be positive, got {text!r}")
    return n


def _frontier(choices: tuple[Choice, ...]) -> list[int]:
    """Indices of the undominated choices (no other is as small and as good), by bytes ascending."""
    order = sorted(range(len(choices)), key=lambda i: (choices[i].bytes, choices[i].cost))
    out, best = [], math.inf
    for i in order:
        if choices[i].cost < best:
            out.append(i)
            best = choices[i].cost
    return out


def _hull(choices: tuple[Choice, ...], front: list[int]) -> list[int]:
    """Lower convex hull of the frontier (bytes ascending, costs descending, savings per byte decreasing)."""
    h: list[int] = []
    for i in front:
        while len(h) >= 2:
            a, b = choices[h[-2]], choices[h[-1]]
            c = choices[i]
            # b lies on or above the segment a-c: drop it
            if (b.cost - a.cost) * (c.bytes - a.bytes) >= (c.cost - a.cost) * (b.bytes - a.bytes):
                h.pop()
            else:
                break
        h.append(i)
    return h


def _check(items: list[Item]) -> None:
    names = set()
    for it in items:
        if not it.choices:
            raise LowbitError(f"{it.name}: no candidate fits its format constraints")
        if it.name in names:
            raise LowbitError(f"{it.name}: listed twice")
        names.add(it.name)
        for c in it.choices:
            if c.bytes < 0 or not math.isfinite(c.cost):
                raise LowbitError(f"{it.name}: choice {c.label} has bytes {c.bytes} and cost {c.cost}")


def solve(items: list[Item], budget: int, max_states: int = 4_000_000, min_bytes: int = 0) -> Allocation:
    """One choice per item, bytes summed <= budget, least summed cost (see the module doc).

    min_bytes: spend at least this many bytes (to compare at an equal size). The optimum under the budget
    alone may leave bytes unused (no upgrade that fits lowers the cost); it is then filled by the changes that
    add bytes for the least cost added per byte, greedily, until min_bytes is reached. The lower bound stays the
    unconstrained one, so the gap also shows what the fill cost."""
    _check(items)
    byname = {it.name: it for it in items}
    fronts = {it.name: _frontier(it.choices) for it in items}
    picks = {it.name: fronts[it.name][0] for it in items}
    used = sum(byname[n].choices[i].bytes for n, i in picks.items())
    if used > budget:
        raise LowbitError(f"budget {budget:,} bytes is below the smallest allocation ({used:,} bytes)")
    # LP relaxation: hull upgrades by saving per byte
    ups = []
    for it in items:
        h = _hull(it.choices, fronts[it.name])
        for a, b in zip(h, h[1:]):
            ca, cb = it.choices[a], it.choices[b]
            ups.append(((ca.cost - cb.cost) / max(cb.bytes - ca.bytes, 1e-12), it.name, a, b))
    ups.sort(key=lambda u: -u[0])
    cost = sum(byname[n].choices[i].cost for n, i in picks.items())
    lower = None
    for eff, name, a, b in ups:
        ca, cb = byname[name].choices[a], byname[name].choices[b]
        if picks[name] != a:  # an earlier upgrade of this item did not fit: the hull walk stopped there
            continue
        if used + cb.bytes - ca.bytes <= budget:
            picks[name] = b
            used += cb.bytes - ca.bytes
            cost += cb.cost - ca.cost
        else:
            if lower is None:
                lower = cost - eff * (budget - used)
            break
    if lower is None:
        lower = cost  # every hull upgrade fitted: the LP optimum is integral
    # repair: any single-item change that lowers the cost and fits, best saving per byte first
    improved = True
    while improved:
        improved = False
        best = None
        for it in items:
            cur = it.choices[picks[it.name]]
            for j in fronts[it.name]:
                c = it.choices[j]
                if c.cost < cur.cost and used + c.bytes - cur.bytes <= budget:
                    score = (cur.cost - c.cost) / max(c.bytes - cur.bytes, 1)
                    if best is None or score > best[0]:
                        best = (score, it.name, j)
        if best is not None:
            _, name, j = best
            cur = byname[name].choices[picks[name]]
            c = byname[name].choices[j]
            used += c.bytes - cur.bytes
            cost += c.cost - cur.cost
            picks[name] = j
            improved = True
    alloc = Allocation(picks, used, cost, min(lower, cost), exact=cost - lower <= 1e-12 * max(1.0, abs(cost)),
                       budget=budget, items=byname)
    if not alloc.exact:
        dp = _solve_dp(items, fronts, budget, max_states)
        if dp is not None:
            dpicks, dcost = dp
            if dcost <= alloc.cost:
                alloc.picks = dpicks
                alloc.cost = dcost
                alloc.bytes = sum(byname[n].choices[i].bytes for n, i in dpicks.items())
            alloc.lower_bound = alloc.cost
            alloc.exact = True
    if alloc.bytes < min_bytes:
        _fill(alloc, items, min(min_bytes, budget))
    return alloc


def _fill(alloc: Allocation, items: list[Item], min_bytes: int) -> None:
    """Changes that add bytes within the budget, least cost added per byte first, until min_bytes are used."""
    while alloc.bytes < min_bytes:
        best = None
        for it in items:
            cur = it.choices[alloc.picks[it.name]]
            for j, c in enumerate(it.choices):
                d = c.bytes - cur.bytes
                if d > 0 and alloc.bytes + d <= alloc.budget:
                    key = ((c.cost - cur.cost) / d, -d)
                    if best is None or key < best[0]:
                        best = (key, it.name, j, d, c.cost - cur.cost)
        if best is None:
            break  # nothing that adds bytes fits any more
        _, name, j, d, dc = best
        alloc.picks[name] = j
        alloc.bytes += d
        alloc.cost += dc
    alloc.exact = alloc.cost - alloc.lower_bound <= 1e-12 * max(1.0, abs(alloc.cost))


def _solve_dp(items: list[Item], fronts: dict[str, list[int]], budget: int, max_states: int):
    """Exact DP over bytes / g (g: the common divisor of every choice's bytes), if that is small enough."""
    g = 0
    for it in items:
        for j in fronts[it.name]:
            g = math.gcd(g, it.choices[j].bytes)
    g = g or 1
    cap = budget // g
    if (cap + 1) * max(1, len(items)) > max_states * 8 or cap + 1 > max_states:
        return None
    import numpy as np

    INF = np.inf
    best = np.full(cap + 1, INF)
    best[0] = 0.0
    back = []
    for it in items:
        new = np.full(cap + 1, INF)
        arg = np.full(cap + 1, -1, dtype=np.int32)
        for j in fronts[it.name]:
            c = it.choices[j]
            w = c.bytes // g
            if w > cap:
                continue
            cand = np.full(cap + 1, INF)
            cand[w:] = best[:cap + 1 - w] + c.cost
            better = cand < new
            new[better] = cand[better]
            arg[better] = j
        best = new
        back.append(arg)
    k = int(np.argmin(best))
    if not np.isfinite(best[k]):
        return None
    total = float(best[k])
    picks = {}
    for it, arg in zip(reversed(items), reversed(back)):
        j = int(arg[k])
        picks[it.name] = j
        k -= it.choices[j].bytes // g
    return picks, total
