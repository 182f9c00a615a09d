"""SmolLM2-135M: RTN vs GPTQ vs AWQ (issue 3) -> JSON lines on stdout (+ a markdown table).

    python bench/ptq_table.py [--limit-tokens N] [--nsamples 128] [--calib-seqlen 512] [--markdown FILE]
                              [--settings w4g128sym,w3g128] [--methods rtn,gptq,...]
                              [--rows w3g128:awq,w4g128sym:awq+gptq,...]   (instead of settings x methods)

Every quantization runs in its own process (`lowbit quantize`, the CLI users
run) so its wall time and peak RSS are its own; the checkpoints are then scored
here, one after the other, on the same WikiText-2 test windows (seqlen 512).
Calibration: WikiText-2 valid, the same seeded windows for every method.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lowbit  # noqa: E402
from common import emit, report  # noqa: E402

SETTINGS = {
    "w4g128sym": ["--bits", "4", "--group-size", "128", "--sym"],
    "w4g128asym": ["--bits", "4", "--group-size", "128", "--asym"],
    "w3g128": ["--bits", "3", "--group-size", "128", "--asym"],
    "w2g64": ["--bits", "2", "--group-size", "64", "--asym"],
}
METHODS = {
    "rtn": ["--method", "rtn"],
    "gptq-natural": ["--method", "gptq", "--no-act-order"],
    "gptq-act-order": ["--method", "gptq", "--act-order"],  # lowbit's default
    "awq": ["--method", "awq"],
    "awq+gptq-natural": ["--method", "awq+gptq", "--no-act-order"],
    "awq+gptq": ["--method", "awq+gptq", "--act-order"],
}


def quantize_child(model: str, out: Path, args: list[str]) -> dict:
    """Run `lowbit quantize` in a child process; its wall time and its own peak RSS."""
    cmd = [sys.executable, "-c", _CHILD, "quantize", model, str(out), *args]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"quantize failed: {' '.join(cmd[3:])}\n{r.stderr[-2000:]}")
    peak = [l for l in r.stderr.splitlines() if l.startswith("PEAK_RSS_KIB ")]
    return {"wall_s": wall, "peak_rss_bytes": int(peak[-1].split()[1]) * 1024 if peak else None}


# The CLI, reporting its own peak RSS (Linux: KiB) when it exits.
_CHILD = ("import atexit, sys; atexit.register(lambda: print('PEAK_RSS_KIB', next(int(l.split()[1]) for l in "
          "open('/proc/self/status') if l.startswith('VmHWM:')), file=sys.stderr)); "
          "sys.argv = ['lowbit', *sys.argv[1:]]; from lowbit.cli import main; main()")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--limit-tokens", type=int, default=None)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--rows", default=None, help="setting:method pairs, instead of --settings x --methods")
    ap.add_argument("--markdown", type=Path, default=None)
    args = ap.parse_args()
    if args.rows:
        pairs = [tuple(r.split(":", 1)) for r in args.rows.split(",")]
    else:
        pairs = [(s, m) for s in args.settings.split(",") for m in args.methods.split(",")]
    for setting, method in pairs:
        if setting not in SETTINGS or method not in METHODS:
            ap.error(f"unknown row {setting}:{method} (settings: {', '.join(SETTINGS)}; methods: {', '.join(METHODS)})")

    model, tok = lowbit.load(args.model)  # also fills the cache before any timing
    fp = lowbit.evaluate(model, tok, limit_tokens=args.limit_tokens)
    float_bytes = fp["model_bytes"]
    rows = [{"setting": "FP32", "method": "—", "ppl": fp["ppl"], "bpw": 32.0}]
    emit(rows[0])
    del model
    calib = ["--nsamples", str(args.nsamples), "--calib-seqlen", str(args.calib_seqlen), "--seed", "0"]
    with tempfile.TemporaryDirectory() as tmp:
        for setting, method in pairs:
            out = Path(tmp) / f"{setting}-{method}"
            extra = calib if method != "rtn" else []
            q = quantize_child(args.model, out, [*METHODS[method], *SETTINGS[setting], *extra])
            m, _ = lowbit.load(out)
            res = lowbit.evaluate(m, tok, limit_tokens=args.limit_tokens)
            row = {"setting": setting, "method": method, "ppl": res["ppl"], "bpw": res["bpw"],
                   "delta_ppl_pct": 100 * (res["ppl"] / fp["ppl"] - 1), **q,
                   "peak_rss_vs_fp32_model": q["peak_rss_bytes"] / float_bytes if q["peak_rss_bytes"] else None}
            rows.append(row)
            emit(row)
            del m
    report(rows, [("setting", "setting", ""), ("method", "method", ""), ("ppl", "ppl", ".3f"),
                  ("delta_ppl_pct", "Δppl %", "+.1f"), ("bpw", "bits/weight", ".3f"),
                  ("wall_s", "quantize wall s", ".0f"), ("peak_rss_bytes", "peak RSS bytes", ","),
                  ("peak_rss_vs_fp32_model", "RSS / fp32 model", ".2f")],
           args.markdown, {"limit_tokens": args.limit_tokens, "nsamples": args.nsamples, "calib_seqlen": args.calib_seqlen})


if __name__ == "__main__":
    main()
