"""Record the golden checkpoints: ``python -m tests.golden.record`` (from the repository root).

Runs every case of tests/golden/cases.py through the command line and writes the tensor hashes, the
inputs' fingerprints and the environment to tests/golden/golden.json, which tests/golden/test_golden.py
compares against. Re-record only on purpose (a deliberate change of results), and say why in the commit.

    python -m tests.golden.record                  # write tests/golden/golden.json
    python -m tests.golden.record --output X.json  # write elsewhere (e.g. to compare two runs)
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from tests.golden import cases as G


def record(workdir: Path, progress=None) -> dict:
    """The whole golden record: environment, inputs, and every case's tensor hashes."""
    inputs = G.build_inputs(workdir / "inputs")
    rec = {"format": G.FORMAT, "environment": G.environment(), "inputs": G.input_hashes(inputs), "cases": {}}
    for case in G.cases():
        t0 = time.time()
        tensors = G.run_case(case, inputs, workdir / "out")
        rec["cases"][case.name] = G.golden_case_entry(case, tensors)
        if progress:
            progress(f"{case.name:<40} {time.time() - t0:6.2f} s  {len(tensors)} tensors")
    return rec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.golden.record", description=__doc__.splitlines()[0])
    ap.add_argument("--output", type=Path, default=G.GOLDEN, help=f"where to write (default {G.GOLDEN})")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lowbit-golden-") as tmp:
        rec = record(Path(tmp), progress=lambda s: print(s, file=sys.stderr, flush=True))
    args.output.write_text(json.dumps(rec, indent=1, sort_keys=True) + "\n")
    print(f"{len(rec['cases'])} cases -> {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
