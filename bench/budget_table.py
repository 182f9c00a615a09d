"""Budgeted mixed precision on SmolLM2-135M (issue 23) -> JSON on stdout (+ markdown).

    python bench/budget_table.py lowbit [--method gptq] [--targets 2.5,3.0,3.5,4.0,4.5] [--uniform 2,3,4,5]
                                        [--bar] [--nsamples 16] [--budget-nsamples 32] [--limit-tokens 8192]
    python bench/budget_table.py gguf [--presets Q3_K_M,Q4_K_S,Q4_K_M,Q5_K_M] [--calibrated] [--gptq]
                                      [--nsamples 8] [--limit-tokens 8192] [--fill 0.99]

lowbit: the sensitivity costs are measured once (32 windows of WikiText-2 valid), then every target is
allocated from them (`--plan` reuse: nothing measured again) and quantized with the same method and
calibration as the uniform g128 asymmetric schemes around it; every model scored by lowbit on the same
WikiText-2 test windows. `--bar` adds the issue's targets: 0.95 x the bits per weight of uniform W3 and W4
g128 asym.
gguf: lowbit's F16 export; llama.cpp's own quantizer (llama_model_quantize) makes each preset from it; lowbit's
budgeted GGUF at the preset's file size (at least --fill of it, default 99%; uncalibrated encoders; with
--calibrated also lowbit's own calibrated preset and a calibrated budgeted file, same windows); all scored by
llama.cpp on the same token ids.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lowbit  # noqa: E402
from common import log, report  # noqa: E402
from lowbit import api  # noqa: E402
from lowbit.core.config import QuantConfig  # noqa: E402
from lowbit.core.scheme import Scheme  # noqa: E402
from lowbit.core.text import read_text  # noqa: E402
from lowbit.core.tokens import tokenize  # noqa: E402
from lowbit.eval.perplexity import windows  # noqa: E402
from lowbit.eval.size import weight_stats  # noqa: E402


def _load():
    return lowbit.load("smollm2-135m")


def run_lowbit(args) -> None:
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    opts = {"nsamples": args.nsamples}

    def score(m, tok):
        return api.evaluate(m, tok, limit_tokens=args.limit_tokens, progress=False)["ppl"]

    rows = []
    uniform = {}
    for b in [int(x) for x in args.uniform.split(",") if x]:
        m, tok = _load()
        t0 = time.perf_counter()
        api.quantize(m, QuantConfig(method=args.method, scheme=Scheme.from_cli(b, 128, False), options=dict(opts)),
                     tokenizer=tok)
        st = weight_stats(m)
        r = {"variant": f"uniform W{b} g128 asym", "bpw": st["bpw"], "ppl": score(m, tok),
             "seconds": round(time.perf_counter() - t0, 1)}
        uniform[b] = r
        rows.append(r)
        log(str(r))
    targets = [float(x) for x in args.targets.split(",") if x]
    if args.bar:
        targets += [round(0.95 * uniform[b]["bpw"], 4) for b in (3, 4) if b in uniform]
    m, tok = _load()
    t0 = time.perf_counter()
    base = api.plan_budget(m, tok, QuantConfig(method=args.method, options=dict(opts)), target_bpw=targets[0],
                           nsamples=args.budget_nsamples, validate=args.validate)
    plan_s = time.perf_counter() - t0
    (out / "plan.json").write_text(json.dumps(base))
    log(f"sensitivity measured in {plan_s:.0f} s: {base['sensitivity']['seconds']}")
    for t in targets:
        m, tok = _load()
        cfg = QuantConfig(method=args.method, options=dict(opts))
        plan = api.plan_budget(m, tok, cfg, target_bpw=t, reuse=base)
        api.apply_plan(m, cfg, plan)
        t0 = time.perf_counter()
        api.quantize(m, cfg, tokenizer=tok)
        st = weight_stats(m)
        r = {"variant": f"budget {t} bpw", "target_bpw": t, "bpw": st["bpw"], "ppl": score(m, tok),
             "seconds": round(time.perf_counter() - t0, 1), "exact": plan["exact"], "gap": plan["gap"]}
        for b, u in uniform.items():
            r[f"vs_W{b}_pct"] = round(100 * (r["ppl"] / u["ppl"] - 1), 2)
        rows.append(r)
        log(str(r))
    cols = [("variant", "run", "s"), ("bpw", "bits/weight", ".4f"), ("ppl", "ppl", ".4f"),
            ("seconds", "quantize s", ".1f")]
    report(rows, cols, args.markdown, {"method": args.method, "nsamples": args.nsamples,
                                        "budget_nsamples": args.budget_nsamples, "limit_tokens": args.limit_tokens,
                                        "plan_seconds": round(plan_s, 1), "loadavg": os.getloadavg(),
                                        "validation": (base["sensitivity"].get("validation") or {}).get("spearman")})


def run_gguf(args) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gguf_table import llama_quantize

    from lowbit.calibration.data import calibration_ids
    from lowbit.eval import llama_cpp as L
    from lowbit.formats.gguf.export import export_gguf
    from lowbit.formats.gguf.reader import gguf_table

    if not L.available():
        sys.exit("bench/budget_table.py gguf needs llama-cpp-python")
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    m, tok = _load()
    text, _ = read_text(None)
    wins = windows(tokenize(tok, text), 512, args.limit_tokens)
    f16 = str(out / "lowbit-F16.gguf")
    export_gguf(m, tok, f16, "F16", overwrite=True, progress=False)
    ids, _ = calibration_ids(tok, None, nsamples=args.nsamples, seqlen=512, seed=0)
    t0 = time.perf_counter()
    base, stats = api.plan_gguf(m, tok, ids, target_bpw=6.0, calibrated=False)
    plan_s = time.perf_counter() - t0
    cal_base = None
    if args.calibrated:
        t0 = time.perf_counter()
        cal_base, cal_stats = api.plan_gguf(m, tok, ids, target_bpw=6.0, calibrated=True)
        log(f"calibrated costs in {time.perf_counter() - t0:.0f} s")
    log(f"sensitivity + GGUF costs in {plan_s:.0f} s")
    rows = []

    def row(name, path, kind):
        _, total = gguf_table(path)
        r = {"variant": name, "kind": kind, "file_bytes": total["file_bytes"], "bpw": total["bpw"],
             "ppl": L.perplexity(path, wins, progress=False)["ppl"]}
        log(str(r))
        rows.append(r)
        return r

    for p in [x for x in args.presets.split(",") if x]:
        lp = str(out / f"llama.cpp-{p}.gguf")
        llama_quantize(f16, lp, p)
        ref = row(f"llama.cpp {p}", lp, "preset")
        size = ref["file_bytes"]
        plan, _ = api.plan_gguf(m, tok, None, target_size=size, reuse=base, fill=args.fill)
        bp = str(out / f"budget-{p}.gguf")
        api.export_gguf_planned(m, tok, bp, plan, overwrite=True)
        r = row(f"lowbit budget @ {p} size", bp, "budgeted")
        r["vs_preset_pct"] = round(100 * (r["ppl"] / ref["ppl"] - 1), 2)
        r["size_vs_preset_pct"] = round(100 * (r["file_bytes"] / size - 1), 3)
        if cal_base is not None:
            cp = str(out / f"lowbit-{p}-calib.gguf")
            from lowbit.api import _second_moments

            full = _second_moments(m, cal_stats)
            import torch

            imatrix = {k: torch.diagonal(h).clone() for k, h in full.items()}
            export_gguf(m, tok, cp, p, imatrix=imatrix, hessians=full if args.gptq else None, overwrite=True,
                        progress=False)
            cref = row(f"lowbit {p} calibrated{' + GPTQ' if args.gptq else ''}", cp, "preset")
            plan, _ = api.plan_gguf(m, tok, None, target_size=cref["file_bytes"], reuse=cal_base, calibrated=True,
                                    fill=args.fill)
            cb = str(out / f"budget-{p}-calib.gguf")
            api.export_gguf_planned(m, tok, cb, plan, ids, cal_stats, gptq=args.gptq, overwrite=True)
            r = row(f"lowbit budget calibrated @ {p} size", cb, "budgeted")
            r["vs_preset_pct"] = round(100 * (r["ppl"] / cref["ppl"] - 1), 2)
            r["size_vs_preset_pct"] = round(100 * (r["file_bytes"] / cref["file_bytes"] - 1), 3)
    cols = [("variant", "file", "s"), ("file_bytes", "bytes", ","), ("bpw", "bits/weight", ".3f"),
            ("ppl", "llama.cpp ppl", ".4f"), ("vs_preset_pct", "vs preset %", "+.2f"),
            ("size_vs_preset_pct", "size vs preset %", "+.3f")]
    report(rows, cols, args.markdown, {"windows": int(wins.shape[0]), "seqlen": 512, "nsamples": args.nsamples,
                                        "plan_seconds": round(plan_s, 1), "loadavg": os.getloadavg()})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("part", choices=["lowbit", "gguf"])
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--targets", default="2.5,3.0,3.5,4.0,4.5")
    ap.add_argument("--uniform", default="2,3,4,5")
    ap.add_argument("--bar", action="store_true")
    ap.add_argument("--validate", action="store_true")
    ap.add_argument("--presets", default="Q3_K_M,Q4_K_S,Q4_K_M,Q5_K_M")
    ap.add_argument("--calibrated", action="store_true")
    ap.add_argument("--fill", type=float, default=0.99,
                    help="gguf: budgeted files take at least this share of the preset's size (0: least cost)")
    ap.add_argument("--gptq", action="store_true")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--budget-nsamples", type=int, default=32)
    ap.add_argument("--limit-tokens", type=int, default=8192)
    ap.add_argument("--out-dir", type=Path, default=Path("bench_out/budget"))
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()
    (run_lowbit if args.part == "lowbit" else run_gguf)(args)


if __name__ == "__main__":
    main()
