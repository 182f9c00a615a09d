"""SmolLM2-135M: W8A8 / SmoothQuant / LLM.int8() (issue 4) -> JSON on stdout (+ a markdown table).

    python bench/int8_table.py [--limit-tokens N] [--nsamples 32] [--variants fp32,w8a8-dyn,...]
                               [--prefill-reps 7] [--markdown FILE]

Every variant is quantized here from the same float model (the same calibration
windows of WikiText-2 valid for the calibrated ones) and scored on the same
WikiText-2 test windows (seqlen 512). Prefill speed: one 512-token prompt,
every model in turn, `--prefill-reps` rounds after a warm-up round, median per
model; ratios are against the float32 model of the same run.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lowbit  # noqa: E402
from common import log, report  # noqa: E402
from lowbit.algorithms.registry import CalibOptions, get_spec  # noqa: E402
from lowbit.core.text import read_text  # noqa: E402
from lowbit.core.tokens import tokenize  # noqa: E402
from lowbit.nn.int8 import W8_CHANNEL, W8_TENSOR  # noqa: E402

HEAD = (r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj$", r"^lm_head$")
VARIANTS = {
    # name: (method, weight scheme, options, include patterns (() = the decoder blocks' linears))
    "fp32": (None, None, {}, ()),
    "w8-only": ("rtn", W8_CHANNEL, {}, ()),  # int8 per-channel weights, float activations: the weights' share
    "naive-pt": ("w8a8", W8_TENSOR, {"act": "tensor"}, ()),
    "w8a8-dyn": ("w8a8", W8_CHANNEL, {"act": "dynamic"}, ()),  # the default: symmetric per token, rotated
    "w8a8-dyn-norot": ("w8a8", W8_CHANNEL, {"act": "dynamic", "rotate": False}, ()),
    "w8a8-dyn-nopair": ("w8a8", W8_CHANNEL, {"act": "dynamic", "pair_bound": False}, ()),
    "w8a8-dyn-norot-nopair": ("w8a8", W8_CHANNEL, {"act": "dynamic", "rotate": False, "pair_bound": False}, ()),
    "w8a8-dyn-asym": ("w8a8", W8_CHANNEL, {"act": "dynamic", "act_symmetric": False}, ()),
    "w8a8-dyn-asym-norot": ("w8a8", W8_CHANNEL, {"act": "dynamic", "act_symmetric": False, "rotate": False}, ()),
    "w8a8-dyn-a7": ("w8a8", W8_CHANNEL, {"act": "dynamic", "act_bits": 7}, ()),
    "w8a8-dyn-a7-norot": ("w8a8", W8_CHANNEL, {"act": "dynamic", "act_bits": 7, "rotate": False}, ()),
    "w8a8-dyn-a7-asym": ("w8a8", W8_CHANNEL, {"act": "dynamic", "act_bits": 7, "act_symmetric": False}, ()),
    "w8a8-dyn-a7+head": ("w8a8", W8_CHANNEL, {"act": "dynamic", "act_bits": 7}, HEAD),
    "w8a8-static": ("w8a8", W8_CHANNEL, {"act": "static"}, ()),
    "w8a8-static-sq": ("w8a8", W8_CHANNEL, {"act": "static", "smooth": 0.5}, ()),
    "w8a8-dyn-sq": ("w8a8", W8_CHANNEL, {"act": "dynamic", "smooth": 0.5}, ()),
    "w8a8-dyn-sq-norot": ("w8a8", W8_CHANNEL, {"act": "dynamic", "smooth": 0.5, "rotate": False}, ()),
    "w8a8-dyn-sq-a7": ("w8a8", W8_CHANNEL, {"act": "dynamic", "smooth": 0.5, "act_bits": 7}, ()),
    "llm-int8": ("llm-int8", W8_CHANNEL, {"threshold": 6.0}, ()),  # zeropoint (the default)
    "llm-int8-absmax": ("llm-int8", W8_CHANNEL, {"threshold": 6.0, "act_symmetric": True}, ()),
    "llm-int8-t3": ("llm-int8", W8_CHANNEL, {"threshold": 3.0}, ()),
    "llm-int8-a7": ("llm-int8", W8_CHANNEL, {"threshold": 6.0, "act_bits": 7}, ()),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--limit-tokens", type=int, default=None)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--prefill-reps", type=int, default=7)
    ap.add_argument("--markdown", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.variants.split(",")
    for n in names:
        if n not in VARIANTS:
            ap.error(f"unknown variant {n!r} (choose from {', '.join(VARIANTS)})")

    base, tok = lowbit.load(args.model)
    models, rows = {}, []
    for name in names:
        method, scheme, options, include = VARIANTS[name]
        m = copy.deepcopy(base)
        t0 = time.perf_counter()
        if method is not None:
            calibrated = issubclass(get_spec(method).options, CalibOptions)  # unknown option keys are refused
            opts = dict(options, nsamples=args.nsamples, calib_seqlen=args.calib_seqlen) if calibrated else options
            lowbit.quantize(m, lowbit.QuantConfig(method=method, scheme=scheme, options=opts,
                                                          include=include), tokenizer=tok)
        t_q = time.perf_counter() - t0
        log(f"{name}: scoring")
        r = lowbit.evaluate(m, tok, limit_tokens=args.limit_tokens)
        rows.append({"variant": name, "ppl": r["ppl"], "quantize_s": round(t_q, 1),
                     "linear_bytes": r["quantized_bytes"], "windows": r["windows"]})
        log(f"{name}: ppl {r['ppl']:.4f} ({r['windows']} windows), quantized in {t_q:.1f}s")
        models[name] = m

    # prefill: every model in turn on the same 512-token prompt
    ids = tokenize(tok, read_text(None)[0][:20000])[:512].unsqueeze(0)
    times = {n: [] for n in names}
    with torch.inference_mode():
        for rep in range(args.prefill_reps + 1):
            for n in names:
                t0 = time.perf_counter()
                models[n](ids, use_cache=False)
                if rep:  # round 0 is the warm-up (kernel packing, caches)
                    times[n].append(time.perf_counter() - t0)
    fp = ppl_fp = None
    for r in rows:
        med = statistics.median(times[r["variant"]])
        r["prefill_tok_s"] = round(512 / med, 1)
        if r["variant"] == "fp32":
            fp, ppl_fp = r["prefill_tok_s"], r["ppl"]
    for r in rows:
        r["prefill_vs_fp32"] = round(r["prefill_tok_s"] / fp, 3) if fp else None
        r["dppl_pct"] = round(100 * (r["ppl"] / ppl_fp - 1), 2) if ppl_fp else None
    cols = [("variant", "variant", ""), ("ppl", "ppl", ".4f"), ("dppl_pct", "Δppl %", "+.2f"),
            ("prefill_tok_s", "prefill tok/s (512)", ".1f"), ("prefill_vs_fp32", "× fp32", ".2f"),
            ("linear_bytes", "linear weight bytes", ","), ("quantize_s", "quantize s", ".1f")]
    report(rows, cols, args.markdown, {"limit_tokens": args.limit_tokens, "nsamples": args.nsamples,
                                       "threads": torch.get_num_threads(), "prefill_reps": args.prefill_reps})


if __name__ == "__main__":
    main()
