"""SmolLM2-135M: QAT against the PTQ it starts from (issue 7) -> JSON on stdout (+ markdown).

    python bench/qat_table.py --bits 2 --group-size 64 --asym --init CKPT|rtn [--distill] [--steps 100]
                              [--lr 1e-5] [--seqlen 256] [--batch 4] [--limit-tokens 32768] [--baselines]
                              [--block-epochs 4 --block-lr 3e-3 --block-scale-lr 3e-4 --block-samples 64]
                              [--out DIR] [--markdown FILE]

Trains with `lowbit.workflows.qat.run` on WikiText-2 valid (minus its last 10%, the held-out text),
converts to a packed checkpoint, and scores it on WikiText-2 test windows of 512 tokens; with
--baselines also the float model, RTN and the --init checkpoint on the same windows. Reports training
steps, tokens seen and wall time (2 threads here).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lowbit  # noqa: E402
from common import log, report  # noqa: E402
from lowbit.algorithms.qat import BlockConfig, TrainConfig  # noqa: E402
from lowbit.core.config import QuantConfig  # noqa: E402
from lowbit.core.scheme import Scheme  # noqa: E402
from lowbit.core.state import state_of  # noqa: E402
from lowbit.workflows.qat import run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, required=True)
    ap.add_argument("--group-size", type=int, required=True)
    ap.add_argument("--asym", action="store_true")
    ap.add_argument("--init", default="rtn", help="a PTQ checkpoint, or 'rtn'")
    ap.add_argument("--distill", action="store_true")
    ap.add_argument("--learn-scales", action="store_true")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--limit-tokens", type=int, default=32768)
    ap.add_argument("--baselines", action="store_true")
    ap.add_argument("--block-epochs", type=int, default=0, help="block-wise phase first (0: none)")
    ap.add_argument("--block-lr", type=float, default=1e-3)
    ap.add_argument("--block-scale-lr", type=float, default=None)
    ap.add_argument("--block-samples", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("bench_out/qat"))
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()
    scheme = Scheme.from_cli(args.bits, args.group_size, not args.asym)
    rows = []

    def score(name, model, tok, **extra):
        t0 = time.perf_counter()
        r = lowbit.evaluate(model, tok, limit_tokens=args.limit_tokens)
        row = {"variant": name, "scheme": scheme.describe(), "ppl": r["ppl"], "bpw": r["bpw"], **extra}
        log(f"{row} (eval {time.perf_counter() - t0:.0f} s)")
        rows.append(row)
        return row

    if args.baselines:
        fp, tok = lowbit.load("smollm2-135m")
        score("float32", fp, tok)
        m, _ = lowbit.load("smollm2-135m")
        lowbit.quantize(m, QuantConfig(method="rtn", scheme=scheme))
        score("RTN", m, tok)
        del m, fp
        if args.init != "rtn":
            m, tok = lowbit.load(args.init)
            score(f"PTQ init ({state_of(m).quant.config.method})", m, tok)
            del m

    name = (f"QAT{' block-wise' if args.block_epochs else ''} from {'RTN' if args.init == 'rtn' else 'PTQ'}"
            f"{' + distill' if args.distill else ''}")
    out = args.out / name.replace(" ", "_").replace("+", "")
    tcfg = TrainConfig(steps=args.steps, lr=args.lr, batch=args.batch, seqlen=args.seqlen, distill=args.distill)
    bcfg = BlockConfig(epochs=args.block_epochs, lr=args.block_lr, scale_lr=args.block_scale_lr,
                       nsamples=args.block_samples)
    res = run("smollm2-135m", out, QuantConfig(method="qat", scheme=scheme), tcfg,
              init=None if args.init == "rtn" else args.init, learn_scale=args.learn_scales, overwrite=True,
              block=bcfg)
    m, tok = lowbit.load(out)
    score(name, m, tok, steps=res["steps"], tokens_seen=res["tokens_seen"], train_seconds=res["train_seconds"],
          heldout_before=res["heldout_ppl_before"], heldout_after=res["heldout_ppl_after"], lr=args.lr)
    cols = [("variant", "model", "s"), ("scheme", "scheme", "s"), ("ppl", "test ppl", ".3f"),
            ("steps", "steps", "d"), ("tokens_seen", "tokens seen", ","), ("train_seconds", "train s", ".0f"),
            ("heldout_before", "held-out ppl before", ".2f"), ("heldout_after", "held-out ppl after", ".2f")]
    report(rows, cols, args.markdown, {"limit_tokens": args.limit_tokens, "seqlen": 512})


if __name__ == "__main__":
    main()
