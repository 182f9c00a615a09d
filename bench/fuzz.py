"""The long fuzz campaign: hostile inputs from the tiny test model through the real CLI (tests/fuzz/).

    python bench/fuzz.py --cases 2000 [--seed 1] [--jobs 2] [--timeout 60] [--big] [--work DIR] [--keep]

Prints one JSON object: cases by target, exit codes, crashes (signals), other exit codes, tracebacks, hangs,
over-cap peaks, leftovers, random-weight loads, error-line and OUT-rule violations, failures by area, and up
to 40 findings. --big adds 4-8 MB texts.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from tests.fuzz.campaign import CAP, Campaign, summarize  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=500)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--cap", type=int, default=CAP, help="peak RSS cap per case, bytes")
    ap.add_argument("--big", action="store_true", help="also 4-8 MB texts")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the work folder (cases, logs)")
    ap.add_argument("--results", type=Path, default=None, help="write every case's result here (JSON)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="lowbit-fuzz-"))
    t0 = time.time()
    c = Campaign(work, jobs=args.jobs, timeout=args.timeout, cap=args.cap, big=args.big).start()
    setup = time.time() - t0
    done = [0]

    def progress(r):
        done[0] += 1
        if done[0] % 100 == 0:
            print(f"fuzz: {done[0]}/{args.cases} ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)

    try:
        t1 = time.time()
        res = c.run(c.make_cases(args.cases, args.seed), progress=progress)
        summary = summarize(res, time.time() - t1)
    finally:
        c.close()
    summary.update(seed=args.seed, jobs=args.jobs, timeout_s=args.timeout, cap_bytes=args.cap,
                   setup_seconds=round(setup, 1), total_seconds=round(time.time() - t0, 1))
    if args.results:
        args.results.write_text(json.dumps(res, indent=1))
    if not args.keep and args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
