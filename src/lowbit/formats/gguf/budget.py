"""Budget-driven GGUF: one llama.cpp tensor type per tensor, the least summed sensitivity cost under a file
size (every byte: header, metadata, tensor infos, alignment padding, every tensor).

Candidates per 2-D tensor: the K-quants and legacy types whose block divides its rows (576-wide rows take
no 256-weight K-quant), plus F16; 1-D tensors stay F32 as in every llama.cpp file. The cost of a type is the
sensitivity proxy (calibration/sensitivity.py) of the error of lowbit's own encoder for it (importance
weighted when the export is calibrated) on an evenly strided sample of rows; the tied token embedding pays
both as embedding and as output matrix. The plan becomes exact-name `--tensor-type` overrides of the
export and is recorded in the file under `lowbit.budget` (JSON).
"""
from __future__ import annotations

import math

import json
import os
import re
import tempfile
import time

import torch
from torch import nn

from ...calibration.sensitivity import LayerStats, proxy_cost
from ...core.budget import PLAN_FORMAT, Choice, Item, solve
from ...errors import LowbitError
from .blocks import TYPES, dequantize

CANDIDATES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16")
ALIGN = 32
PLAN_KEY = "lowbit.budget"
MAX_ROWS = 256


def _pad(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def tensor_nbytes(t: str, shape: tuple[int, ...]) -> int:
    rows = 1
    for s in shape[:-1]:
        rows *= s
    return _pad(rows * TYPES[t].row_bytes(shape[-1]))


def candidates_for(cols: int, allowed=CANDIDATES) -> list[str]:
    return [t for t in allowed if TYPES[t].fits(cols)]


def _row_sample(rows: int, max_rows: int = MAX_ROWS):
    step = -(-rows // max_rows)
    return slice(0, rows, step), rows / len(range(0, rows, step))


def type_costs(W: torch.Tensor, types: list[str], stats: list[tuple[LayerStats, bool]], qw: torch.Tensor | None,
               max_rows: int = MAX_ROWS) -> list[float]:
    """The proxy cost of each type's error on W [rows, cols] (summed over `stats`: (LayerStats, embedding?))."""
    sl, k = _row_sample(W.shape[0], max_rows)
    Ws = W[sl].float().contiguous()
    out = []
    for t in types:
        T = TYPES[t]
        data = T.quantize(Ws, qw)
        D = torch.from_numpy(dequantize(data, T.qtype).reshape(Ws.shape).astype("float32")) - Ws
        c = 0.0
        for st, emb in stats:
            if emb:
                sub = LayerStats(None, st.f, st.p[sl], st.tokens)
            else:
                sub = LayerStats(st.H, st.f[sl], None, st.tokens)
            c += proxy_cost(D, sub, embedding=emb)
        out.append(k * c)
    return out


def header_bytes(build_writer, infos: dict[str, tuple[int, ...]]) -> int:
    """Bytes before the tensor data of a GGUF with these tensors (their types do not change it): written
    for real by `build_writer(path)` (a GGUFWriter with the file's metadata) with tensor infos only."""
    import numpy as np

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "h.gguf")
        w = build_writer(path)
        for name, shape in infos.items():  # a tensor info's size depends on its name and rank only
            n = 1
            for s in shape:
                n *= s
            w.add_tensor_info(name, shape, np.dtype(np.float32), 4 * n)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        w.close()
        return _pad(os.path.getsize(path))


def plan_types(tensors: dict[str, torch.Tensor], names: dict[str, str], stats: dict[str, LayerStats],
               target_size: int, fixed_bytes: int, tied_head: str | None, embedding: str | None,
               imatrix: dict[str, torch.Tensor] | None = None, allowed=CANDIDATES, target: dict | None = None,
               progress: bool = True) -> dict:
    """The plan for the 2-D `tensors` (HF parameter name -> float tensor; `names` their GGUF names) when
    everything else takes `fixed_bytes` of the file."""
    t0 = time.time()
    items, costs = [], {}
    todo = [(hf, t) for hf, t in tensors.items() if t.dim() == 2]
    bar = None
    if progress:
        import sys

        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="GGUF type costs", unit="tensor", file=sys.stderr)
    for hf, W in todo:
        mod = hf.rsplit(".", 1)[0]
        cols = W.shape[-1]
        types = candidates_for(cols, allowed)
        uses = []
        if mod == embedding:
            if mod in stats:
                uses.append((stats[mod], True))
            if tied_head is not None and tied_head in stats:
                uses.append((stats[tied_head], False))
        elif mod in stats:
            uses.append((stats[mod], False))
        if not uses:
            raise LowbitError(f"budget: no sensitivity statistics for {hf}")
        qw = imatrix.get(tied_head if mod == embedding and tied_head else mod) if imatrix is not None else None
        c = type_costs(W, [t for t in types if t != "F16"], uses, qw)
        c = c + [0.0] if "F16" in types else c  # F16: the float model's own values to fp16 precision (≈ 0)
        g = names[hf]
        costs[g] = dict(zip([t for t in types if t != "F16"] + (["F16"] if "F16" in types else []), c))
        items.append(Item(g, tuple(Choice(t, tensor_nbytes(t, tuple(W.shape)), costs[g][t]) for t in costs[g]),
                          W.numel()))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    t_cost = time.time() - t0
    shapes = {names[hf]: list(W.shape) for hf, W in todo}
    sens = {"measure": "proxy", "candidates": list(allowed), "costs": costs, "shapes": shapes,
            "calibrated_encoders": imatrix is not None,
            "seconds": {"costs": round(t_cost, 1), "total": round(time.time() - t0, 1)}}
    return allocate(items, target_size, fixed_bytes, target, sens)


def replan_types(plan: dict, target_size: int, fixed_bytes: int, target: dict | None = None) -> dict:
    """A GGUF plan's recorded costs under another file size (nothing measured again)."""
    sens = plan.get("sensitivity") or {}
    costs, shapes = sens.get("costs"), sens.get("shapes")
    if not (costs and shapes):
        raise LowbitError("this plan records no candidate costs: plan again (without --plan)")
    items = [Item(g, tuple(Choice(t, tensor_nbytes(t, tuple(shapes[g])), float(c)) for t, c in cs.items()),
                  int(torch.tensor(shapes[g]).prod())) for g, cs in costs.items()]
    return allocate(items, target_size, fixed_bytes, target, sens)


def allocate(items: list[Item], target_size: int, fixed_bytes: int, target: dict | None, sens: dict) -> dict:
    budget = target_size - fixed_bytes
    if budget <= 0:
        raise LowbitError(f"--target-size {target_size:,} B: the header, metadata and F32 tensors alone take "
                          f"{fixed_bytes:,} B")
    fill = float((target or {}).get("fill", 0.0))  # spend at least this fraction of the file size
    alloc = solve(items, budget, min_bytes=math.ceil(fill * target_size) - fixed_bytes if fill > 0 else 0)
    weights = sum(it.weights for it in items)
    layers = [{"name": it.name, "choice": alloc.choice(it.name).label, "bytes": alloc.choice(it.name).bytes,
               "weights": it.weights, "bpw": round(8 * alloc.choice(it.name).bytes / it.weights, 4),
               "cost": alloc.choice(it.name).cost} for it in items]
    return {"format": PLAN_FORMAT, "kind": "gguf", "target": target or {"size": target_size},
            "budget_bytes": budget, "bytes": alloc.bytes, "fixed_bytes": fixed_bytes,
            "file_bytes": fixed_bytes + alloc.bytes, "weights": weights,
            "bpw": round(8 * alloc.bytes / weights, 4), "cost": alloc.cost, "lower_bound": alloc.lower_bound,
            "gap": alloc.gap, "exact": alloc.exact, "layers": layers, "sensitivity": sens}


def plan_tensor_types(plan: dict) -> list[tuple[str, str]]:
    """Exact-name (regex, type) overrides for the export."""
    out = []
    for row in plan["layers"]:
        if row["choice"] not in TYPES:
            raise LowbitError(f"plan: unknown GGUF type {row['choice']!r} for {row['name']}")
        out.append(("^" + re.escape(row["name"]) + "$", row["choice"]))
    return out


def compact_plan(plan: dict) -> str:
    """What the GGUF file records: the plan without its candidate costs."""
    keys = ("format", "kind", "target", "budget_bytes", "bytes", "fixed_bytes", "file_bytes", "weights", "bpw", "cost",
            "lower_bound", "gap", "exact")
    keep = {k: plan[k] for k in keys if k in plan}
    sens = plan.get("sensitivity", {})
    keep["sensitivity"] = {k: sens[k] for k in ("measure", "candidates", "calibrated_encoders", "seconds") if k in sens}
    keep["layers"] = [{"name": r["name"], "choice": r["choice"]} for r in plan["layers"]]
    return json.dumps(keep, separators=(",", ":"))
