"""A quantization killed with SIGKILL halfway, then resumed, against an uninterrupted run: same bytes?

    nice -n 10 python bench/resume_check.py [--model smollm2-135m] [--method gptq] [--nsamples 16] \
        [--kill-after 15] [--workdir /work/runs/resume] [-- extra quantize flags]

Runs `lowbit quantize MODEL A` to the end; then `lowbit quantize MODEL B`, kills it (SIGKILL) as soon as its
resume state records --kill-after finished blocks, and runs it again with --resume. Prints one JSON line:
the times, the blocks done at the kill, and whether every file of B equals A's.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from common import emit


def lowbit(*args: str) -> list[str]:
    return [sys.executable, "-m", "lowbit", "quantize", *args]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--kill-after", type=int, default=15)
    ap.add_argument("--workdir", default="/work/runs/resume")
    ap.add_argument("extra", nargs="*")
    a = ap.parse_args()
    work = Path(a.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    flags = ["--method", a.method, "--bits", "4", "--group-size", "128", "--sym", *a.extra]
    if a.method != "rtn":
        flags += ["--nsamples", str(a.nsamples)]
    A, B = work / "A", work / "B"
    t0 = time.time()
    subprocess.run(lowbit(a.model, str(A), *flags), check=True, stderr=subprocess.DEVNULL)
    t_full = time.time() - t0
    state = work / ".B.lowbit-resume" / "state.json"
    t0 = time.time()
    p = subprocess.Popen(lowbit(a.model, str(B), *flags), stderr=subprocess.DEVNULL)
    done = 0
    while p.poll() is None:
        try:
            done = len(json.loads(state.read_text())["blocks"])
        except (OSError, ValueError, KeyError):
            done = 0
        if done >= a.kill_after:
            os.kill(p.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    p.wait()
    t_killed = time.time() - t0
    killed = p.returncode == -signal.SIGKILL
    t0 = time.time()
    subprocess.run(lowbit(a.model, str(B), *flags, "--resume"), check=True, stderr=subprocess.DEVNULL)
    t_resume = time.time() - t0
    fa = {q.name: q.read_bytes() for q in sorted(A.iterdir())}
    fb = {q.name: q.read_bytes() for q in sorted(B.iterdir())}
    emit({"model": a.model, "method": a.method, "nsamples": a.nsamples, "killed_with_sigkill": killed,
          "blocks_done_at_kill": done, "uninterrupted_s": round(t_full, 1), "killed_run_s": round(t_killed, 1),
          "resumed_run_s": round(t_resume, 1), "files": sorted(fa), "identical": fa == fb,
          "differing_files": sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k)),
          "state_left": (work / ".B.lowbit-resume").exists(), "loadavg_1m": os.getloadavg()[0]})
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
