"""Data-parallel calibration against one process: `torchrun --nproc-per-node 2 -m lowbit quantize` (gloo) and
`lowbit quantize` on the same model and flags; codes compared, perplexity of both.

    nice -n 10 python bench/dp_check.py [--model smollm2-135m] [--method gptq] [--nsamples 16] [--ranks 2]
        [--limit-tokens 8192] [--workdir /work/runs/dp]

Every process (the one-process run and each rank) runs with the same number of threads. Prints one JSON
line: wall times, how many codes differ (and of how many), the largest |scale| difference,
perplexity of each on the first --limit-tokens tokens of WikiText-2 test.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import emit


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--limit-tokens", type=int, default=8192)
    ap.add_argument("--workdir", type=Path, default=Path("/work/runs/dp"))
    ap.add_argument("--threads", type=int, default=None, help="threads of every process (default: cores / ranks)")
    a = ap.parse_args()
    shutil.rmtree(a.workdir, ignore_errors=True)
    a.workdir.mkdir(parents=True)
    one, many = a.workdir / "one", a.workdir / "dp"
    flags = ["--method", a.method, "--bits", "4", "--group-size", "128", "--sym", "--nsamples", str(a.nsamples)]
    # every process gets the same number of threads (the CPU's cores / ranks): torch's CPU matmuls split their
    # sums by thread, so a one-process run with more threads differs in its last bits (and GPTQ then in codes)
    threads = a.threads or max(1, (os.cpu_count() or 2) // a.ranks)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "lowbit", "quantize", a.model, str(one), *flags], check=True,
                   stderr=subprocess.DEVNULL, env=env)
    t_one = time.time() - t0
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(a.ranks),
                    "-m", "lowbit", "quantize", a.model, str(many), *flags], check=True, env=env,
                   stderr=subprocess.DEVNULL)
    t_many = time.time() - t0
    from safetensors.torch import load_file

    from lowbit.core.packing import unpack

    x, y = load_file(str(one / "lowbit.safetensors")), load_file(str(many / "lowbit.safetensors"))
    diff = total = 0
    scale_diff = 0.0
    for k in x:
        if k.endswith("qweight"):
            cx, cy = unpack(x[k], 4, x[k].shape[1] * 2), unpack(y[k], 4, y[k].shape[1] * 2)
            diff += int((cx != cy).sum())
            total += cx.numel()
        elif k.endswith("scales"):
            scale_diff = max(scale_diff, float((x[k].float() - y[k].float()).abs().max()))
    ppl = {}
    for name, path in (("one", one), ("dp", many)):
        r = subprocess.run([sys.executable, "-m", "lowbit", "eval", str(path), "--limit-tokens", str(a.limit_tokens),
                            "--json"], check=True, capture_output=True, text=True)
        ppl[name] = json.loads(r.stdout.strip().splitlines()[-1])["ppl"]
    emit({"model": a.model, "method": a.method, "nsamples": a.nsamples, "ranks": a.ranks, "threads_per_process": threads, "one_process_s": round(t_one, 1),
          "data_parallel_s": round(t_many, 1), "codes_differing": diff, "codes": total,
          "files_identical": (one / "lowbit.safetensors").read_bytes() == (many / "lowbit.safetensors").read_bytes(),
          "max_scale_diff": scale_diff, "ppl_one": ppl["one"], "ppl_dp": ppl["dp"],
          "ppl_rel_diff": abs(ppl["dp"] - ppl["one"]) / ppl["one"], "limit_tokens": a.limit_tokens,
          "loadavg_1m": os.getloadavg()[0]})
    shutil.rmtree(a.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
