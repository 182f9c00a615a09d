"""Budget-driven mixed precision for lowbit checkpoints: one scheme per layer, the least summed sensitivity
cost (calibration/sensitivity.py) under a bits-per-weight or byte budget (core/budget.py's solver).

`plan_schemes` measures, for every targeted layer and every candidate scheme, the bytes the layer would
store (codes + fp16 scales + packed zero points: exactly what QuantLinear keeps) and the proxy cost of its
error: round-to-nearest's (`error="nearest"`), or GPTQ's on the same rows with the layer's own H (`error="gptq"`:
what a GPTQ run leaves in that layer when its inputs are the float model's, the error the proxy then weighs); optionally (`kl=True`) the whole model's KL on held-out windows for every layer at
one reference scheme, which validates the proxy (Spearman's rank correlation) and rescales each layer's
costs to it. The plan is a JSON-able dict; `plan_overrides` turns it into exact-name scheme overrides, which
every method (rtn, gptq, awq, awq+gptq) honours through `QuantConfig.scheme_for`.
"""
from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import torch
from torch import nn

from ..calibration.sensitivity import LayerStats, float_logprobs, kl_cost, layer_statistics, proxy_cost, spearman
from ..core.budget import PLAN_FORMAT, Allocation, Choice, Item, solve
from ..core.packing import packed_row_bytes, zero_points_nbytes
from ..core.quant import dequantize, quantize, search_qparams
from ..core.scheme import Scheme
from ..errors import LowbitError

DEFAULT_BITS = (2, 3, 4, 5, 6, 8)
DEFAULT_GROUPS = (32, 64, 128)


def scheme_label(s: Scheme) -> str:
    """'4/128/asym' (Scheme.parse reads it back)."""
    g = s.group_size if s.granularity == "group" else -1
    if s.granularity == "tensor":
        raise LowbitError("per-tensor schemes are not budget candidates")
    return f"{s.bits}/{g}/{'sym' if s.symmetric else 'asym'}"


def scheme_nbytes(s: Scheme, rows: int, cols: int) -> int:
    """Bytes QuantLinear stores for a [rows, cols] weight: packed codes, scales, packed zero points."""
    groups = 1 if s.granularity == "tensor" else s.n_groups(cols)
    r = 1 if s.granularity == "tensor" else rows
    n = rows * packed_row_bytes(cols, s.bits) + r * groups * torch.finfo(s.torch_scale_dtype).bits // 8
    if not s.symmetric:
        n += zero_points_nbytes(r, groups, s.bits)
    return n


def candidate_schemes(bits=DEFAULT_BITS, groups=DEFAULT_GROUPS, symmetric=(False,)) -> list[Scheme]:
    return [Scheme.from_cli(b, g, s) for b in bits for g in groups for s in symmetric]


def parse_candidates(text: str) -> list[Scheme]:
    """'BITS,.../GROUPS,.../sym|asym|both' -> schemes, e.g. '2,3,4,5,6,8/32,64,128/asym'."""
    parts = text.split("/")
    try:
        bits = [int(b) for b in parts[0].split(",")]
        groups = [int(g) for g in parts[1].split(",")] if len(parts) > 1 else list(DEFAULT_GROUPS)
    except ValueError:
        raise LowbitError(f"--budget-schemes {text!r}: expected BITS,.../GROUPS,.../sym|asym|both") from None
    sym = parts[2] if len(parts) > 2 else "asym"
    if sym not in ("sym", "asym", "both") or len(parts) > 3:
        raise LowbitError(f"--budget-schemes {text!r}: expected BITS,.../GROUPS,.../sym|asym|both")
    syms = {"sym": (True,), "asym": (False,), "both": (True, False)}[sym]
    return candidate_schemes(bits, groups, syms)


MAX_ROWS = 256  # rows per tensor the proxy is computed on (evenly strided; scaled up): rows quantize alone


def row_sample(rows: int, max_rows: int = MAX_ROWS) -> tuple[slice, float]:
    """An evenly strided sample of at most ~max_rows rows and the factor that scales its sum up to all rows."""
    step = -(-rows // max_rows)
    n = len(range(0, rows, step))
    return slice(0, rows, step), rows / n


ERRORS = ("nearest", "gptq")
ERROR_CHOICES = ("auto", *ERRORS)  # auto: the method's own (api.plan_budget resolves it)


def _layer_costs(W: torch.Tensor, st: LayerStats, cands: list[Scheme], max_rows: int = MAX_ROWS,
                 error: str = "nearest", gptq: dict | None = None) -> list[float]:
    """The proxy cost of each candidate's error on an evenly strided sample of W's rows, scaled to all rows.
    error "gptq": the codes GPTQ gives those rows with the layer's H (`gptq`: the method's percdamp/act_order/
    clip_grid); "nearest": round-to-nearest's, after the method's clip search when `gptq` has clip_grid > 1."""
    sl, k = row_sample(W.shape[0], max_rows)
    Ws = W[sl]
    sub = LayerStats(st.H, st.f[sl])
    clip_grid = int((gptq or {}).get("clip_grid", 0))
    out = []
    for s in cands:
        if s.granularity == "tensor":
            raise LowbitError("per-tensor schemes are not budget candidates")
        if error == "gptq":
            from ..core.gptq import gptq_rows
            from ..kernels.native import gptq_cols_kernel

            qt, _ = gptq_rows(Ws, st.H, s, cols_kernel=gptq_cols_kernel() if Ws.device.type == "cpu" else None,
                              **(gptq or {}))
        elif clip_grid > 1:  # the method's own clip search (rtn --clip-grid): its error, not min/max's
            qt = quantize(Ws, s, *search_qparams(Ws, s, clip_grid))
        else:
            qt = quantize(Ws, s)
        D = dequantize(qt) - Ws
        out.append(k * proxy_cost(D, sub))
    return out


def plan_schemes(model: nn.Module, names: list[str], candidates: list[Scheme], budget_bytes: int,
                 calib_ids: torch.Tensor, heldout_ids: torch.Tensor | None = None, kl: bool = False,
                 kl_ref: Scheme | None = None, target: dict | None = None, progress: bool = True,
                 kl_layers: int | None = None, error: str = "nearest", gptq: dict | None = None) -> dict:
    """The plan (a dict, see module doc) for the float linears `names` of `model` under `budget_bytes`
    (bytes of the quantized layers). `kl_layers`: validate on that many evenly spaced layers only (without
    `kl`: the rescaling needs every layer). `error`: whose error the proxy weighs (ERRORS)."""
    if error not in ERRORS:
        raise LowbitError(f"budget error {error!r}: one of {', '.join(ERRORS)}")
    t0 = time.time()
    mods = {n: model.get_submodule(n) for n in names}
    for n, m in mods.items():
        if not isinstance(m, nn.Linear):
            raise LowbitError(f"budget: {n} is {type(m).__name__}; budgets plan Linear layers")
    stats = layer_statistics(model, calib_ids, names, progress=progress)
    t_stats = time.time() - t0
    costs, nbytes = {}, {}
    for n, m in mods.items():
        W = m.weight.detach().float()
        costs[n] = _layer_costs(W, stats[n], candidates, error=error, gptq=gptq)
        nbytes[n] = [scheme_nbytes(s, *W.shape) for s in candidates]
    t_proxy = time.time() - t0 - t_stats
    validation = None
    if heldout_ids is not None and (kl or kl_ref is not None):
        ref = kl_ref or Scheme.from_cli(3, 128, False)
        ref_i = candidates.index(ref) if ref in candidates else None
        base = float_logprobs(model, heldout_ids)
        kls, proxies = {}, {}
        from tqdm.auto import tqdm

        measured = names
        if kl_layers is not None and not kl and kl_layers < len(names):
            step = len(names) / kl_layers
            measured = [names[int(i * step)] for i in range(kl_layers)]
        for n in tqdm(measured, desc="KL per layer", unit="layer", file=sys.stderr, disable=not progress):
            W = mods[n].weight.detach().float()
            kls[n] = kl_cost(model, heldout_ids, base, {n + ".weight": dequantize(quantize(W, ref))})
            proxies[n] = (costs[n][ref_i] if ref_i is not None
                          else _layer_costs(W, stats[n], [ref], error=error, gptq=gptq)[0])
        rho = spearman([proxies[n] for n in measured], [kls[n] for n in measured])
        validation = {"reference": scheme_label(ref), "spearman": round(rho, 4), "tokens": heldout_ids.numel(),
                      "layers": len(measured), "kl": kls, "proxy": proxies,
                      "used": bool(kl)}
        if kl:  # the real measure sets each layer's scale; the proxy the shape across its candidates
            for n in names:
                r = kls[n] / proxies[n] if proxies[n] > 0 else 1.0
                costs[n] = [c * r for c in costs[n]]
    t_kl = time.time() - t0 - t_stats - t_proxy
    items = [Item(n, tuple(Choice(scheme_label(s), b, c) for s, b, c in zip(candidates, nbytes[n], costs[n])),
                  mods[n].weight.numel()) for n in names]
    alloc = solve(items, budget_bytes)
    return plan_dict(alloc, items, "lowbit", target, {
        "candidates": [scheme_label(s) for s in candidates], "costs": {n: costs[n] for n in names},
        "shapes": {n: list(mods[n].weight.shape) for n in names},
        "measure": "kl-rescaled proxy" if kl else "proxy", "error": error, "validation": validation,
        "calibration_tokens": calib_ids.numel(),
        "seconds": {"statistics": round(t_stats, 1), "proxy": round(t_proxy, 1), "kl": round(t_kl, 1),
                    "total": round(time.time() - t0, 1)}})


def replan(plan: dict, budget_bytes: int, target: dict | None = None) -> dict:
    """The same measured costs, another budget: a new allocation without measuring anything again."""
    sens = plan.get("sensitivity") or {}
    cands, costs, shapes = sens.get("candidates"), sens.get("costs"), sens.get("shapes")
    if not (cands and costs and shapes):
        raise LowbitError("this plan records no candidate costs: plan again (without --plan)")
    schemes = [Scheme.parse(c) for c in cands]
    items = []
    for n, cs in costs.items():
        rows, cols = shapes[n]
        items.append(Item(n, tuple(Choice(cands[i], scheme_nbytes(schemes[i], rows, cols), float(cs[i]))
                                   for i in range(len(cands))), rows * cols))
    alloc = solve(items, budget_bytes)
    out = plan_dict(alloc, items, "lowbit", target, sens)
    out["method"] = plan.get("method")
    return out


def plan_dict(alloc: Allocation, items: list[Item], kind: str, target: dict | None, sensitivity: dict) -> dict:
    weights = sum(it.weights for it in items)
    layers = []
    for it in items:
        c = alloc.choice(it.name)
        layers.append({"name": it.name, "choice": c.label, "bytes": c.bytes, "weights": it.weights,
                       "bpw": round(8 * c.bytes / it.weights, 4) if it.weights else None, "cost": c.cost})
    return {"format": PLAN_FORMAT, "kind": kind, "target": target or {}, "budget_bytes": alloc.budget,
            "bytes": alloc.bytes, "weights": weights, "bpw": round(8 * alloc.bytes / weights, 4) if weights else None,
            "cost": alloc.cost, "lower_bound": alloc.lower_bound, "gap": alloc.gap, "exact": alloc.exact,
            "layers": layers, "sensitivity": sensitivity}


def read_plan(path: str | Path, kind: str) -> dict:
    try:
        plan = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LowbitError(f"--plan {path}: cannot read a plan ({e.__class__.__name__})") from None
    if isinstance(plan, dict) and "budget" in plan and "format" not in plan:  # a checkpoint's quantization_config
        plan = plan["budget"]
    if not isinstance(plan, dict) or plan.get("format") != PLAN_FORMAT or not isinstance(plan.get("layers"), list):
        raise LowbitError(f"--plan {path}: not a lowbit budget plan ({PLAN_FORMAT})")
    if plan.get("kind") != kind:
        raise LowbitError(f"--plan {path}: a plan for {plan.get('kind')!r}, not {kind!r}")
    for row in plan["layers"]:
        if not isinstance(row, dict) or not isinstance(row.get("name"), str) or not isinstance(row.get("choice"), str):
            raise LowbitError(f"--plan {path}: every layer needs a name and a choice")
        for key, types in (("bytes", (int,)), ("weights", (int,)), ("bpw", (int, float)), ("cost", (int, float))):
            v = row.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, types) or v != v or v < 0):
                raise LowbitError(f"--plan {path}: layer {row['name']!r}: {key} {v!r} is not a non-negative number")
    return plan


def complete_plan(plan: dict, shapes: dict[str, tuple[int, int]]) -> dict:
    """The plan with every layer's bytes and bits per weight (and the totals) computed from its scheme and the
    layer's [rows, cols]: a hand-written plan (names and choices only) gets them, a recorded one cannot misstate
    them. Costs stay as recorded (None where there are none)."""
    layers, total, weights = [], 0, 0
    for row in plan["layers"]:
        rows, cols = shapes[row["name"]]
        n = scheme_nbytes(Scheme.parse(row["choice"]), rows, cols)
        cost = row.get("cost")
        layers.append({**row, "bytes": n, "weights": rows * cols, "bpw": round(8 * n / (rows * cols), 4),
                       "cost": float(cost) if isinstance(cost, (int, float)) else None})
        total += n
        weights += rows * cols
    costs = [r["cost"] for r in layers]
    out = {**plan, "layers": layers, "bytes": total, "weights": weights,
           "bpw": round(8 * total / weights, 4) if weights else None}
    out.setdefault("budget_bytes", total)
    if None in costs:
        out.update(cost=None, lower_bound=None, gap=None, exact=False)
    return out


def plan_overrides(plan: dict, names: list[str] | None = None) -> dict[str, Scheme]:
    """{'^exact\\.name$': Scheme} from a lowbit plan; with `names`, every planned layer must be one of them."""
    out = {}
    for row in plan["layers"]:
        if names is not None and row["name"] not in names:
            raise LowbitError(f"plan layer {row['name']!r} is not a quantizable layer of this model")
        out["^" + re.escape(row["name"]) + "$"] = Scheme.parse(row["choice"])
    return out


def plan_table(plan: dict, limit: int | None = None) -> str:
    """The plan as a text table (one row per layer) and its totals."""
    rows = plan["layers"]
    w = max([len(r["name"]) for r in rows] + [5])
    lines = [f"{'layer':<{w}} {'choice':>12} {'bytes':>10} {'bpw':>7} {'cost':>11}"]
    for r in rows[:limit]:
        cost = f"{r['cost']:>11.4g}" if r.get("cost") is not None else f"{'-':>11}"
        lines.append(f"{r['name']:<{w}} {r['choice']:>12} {r.get('bytes') or 0:>10,} {r.get('bpw') or 0:>7.3f} {cost}")
    if limit is not None and len(rows) > limit:
        lines.append(f"... {len(rows) - limit} more")
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["choice"]] = counts.get(r["choice"], 0) + 1
    mix = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    lines.append(f"{len(rows)} layers: {mix}")
    if plan.get("cost") is None:  # a hand-written plan: no measured costs
        lines.append(f"planned {plan.get('bytes') or 0:,} B = {plan.get('bpw')} bits/weight (no recorded costs)")
    else:
        gap = "exact" if plan.get("exact") else f"within {plan.get('gap') or 0:.3g} of the optimum (LP bound)"
        lines.append(f"budget {plan.get('budget_bytes') or 0:,} B; planned {plan.get('bytes') or 0:,} B = "
                     f"{plan.get('bpw')} bits/weight; cost {plan['cost']:.5g} ({gap})")
    v = plan.get("sensitivity", {}).get("validation")
    if v:
        lines.append(f"proxy vs KL (one layer quantized at {v['reference']}): Spearman {v['spearman']:.3f}"
                     f"{'; costs rescaled to the KL' if v['used'] else ''}")
    return "\n".join(lines)
