"""SmolLM2-135M: float vs RTN at the issue-2 settings -> JSON lines on stdout (+ a markdown table).

    python bench/rtn_table.py [--limit-tokens N] [--markdown FILE]

Each row: WikiText-2 raw test perplexity (non-overlapping windows of 512,
no BOS, every prediction scored), bits per weight of the quantized layers,
their bytes, the checkpoint folder's bytes, and the quantization wall time.
All rows are measured in one process on the same token windows.
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lowbit  # noqa: E402
from common import Timer, emit, folder_bytes, log, report  # noqa: E402
from lowbit import QuantConfig, Scheme  # noqa: E402

SETTINGS = [
    ("FP32", None),
    ("RTN W8 per-channel sym", Scheme.from_cli(8, -1, True)),
    ("RTN W4 g128 sym", Scheme.from_cli(4, 128, True)),
    ("RTN W4 g128 asym", Scheme.from_cli(4, 128, False)),
    ("RTN W3 g128 asym", Scheme.from_cli(3, 128, False)),
    ("RTN W2 g64 asym", Scheme.from_cli(2, 64, False)),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--limit-tokens", type=int, default=None, help="score only the first N test tokens")
    ap.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    args = ap.parse_args()

    model, tok = lowbit.load(args.model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, scheme in SETTINGS:
            log(f"== {name}")
            m = model
            qtime = None
            if scheme is not None:
                m = copy.deepcopy(model)
                with Timer() as t:
                    lowbit.quantize(m, QuantConfig(method="rtn", scheme=scheme))
                qtime = t.seconds
            out = Path(tmp) / name.replace(" ", "_")
            if scheme is None:
                model.save_pretrained(out)
            else:
                lowbit.save(m, tok, out)
            res = lowbit.evaluate(m, tok, seqlen=args.seqlen, limit_tokens=args.limit_tokens)
            row = {"setting": name, "ppl": res["ppl"], "delta_ppl_pct": None, "bpw": res["bpw"],
                   "quantized_bytes": res["quantized_bytes"], "checkpoint_bytes": folder_bytes(out),
                   "quantize_s": qtime, "tokens": res["tokens"], "seqlen": res["seqlen"]}
            if rows:
                row["delta_ppl_pct"] = 100 * (row["ppl"] / rows[0]["ppl"] - 1)
            rows.append(row)
            emit(row)
            del m
    report(rows, [("setting", "setting", ""), ("ppl", "ppl", ".3f"), ("delta_ppl_pct", "Δppl %", "+.2f"),
                  ("bpw", "bits/weight", ".3f"), ("quantized_bytes", "quantized bytes", ","),
                  ("checkpoint_bytes", "checkpoint bytes", ","), ("quantize_s", "quantize s", ".1f")],
           args.markdown, {"model": args.model, "limit_tokens": args.limit_tokens, "seqlen": args.seqlen})


if __name__ == "__main__":
    main()
