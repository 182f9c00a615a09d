"""--dtype on SmolLM2: resident float weights and perplexity for auto, float32, bfloat16 (one process each).

    nice -n 10 python bench/dtype_load.py [--limit-tokens 4096]

One JSON line per dtype: bytes of the float parameters, peak RSS after loading, perplexity on the first
--limit-tokens tokens of WikiText-2 test (auto and float32 must agree to the last bit: the cache is float32).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, os, sys, torch
from lowbit import api
from lowbit.eval.speed import peak_rss_bytes
dt, limit = sys.argv[1], int(sys.argv[2])
m, tok = api.load("smollm2-135m", dtype=dt)
pbytes = sum(p.numel() * p.element_size() for p in m.parameters())
dtypes = sorted({str(p.dtype) for p in m.parameters()})
rss = peak_rss_bytes()
ppl = api.evaluate(m, tok, limit_tokens=limit, progress=False)["ppl"]
print(json.dumps({"dtype": dt, "param_bytes": pbytes, "param_dtypes": dtypes, "peak_rss_after_load": rss,
                  "ppl": ppl, "ppl_hex": float(ppl).hex(), "limit_tokens": limit, "loadavg_1m": os.getloadavg()[0]}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit-tokens", type=int, default=4096)
    a = ap.parse_args()
    for dt in ("auto", "float32", "bfloat16"):
        r = subprocess.run([sys.executable, "-c", CHILD, dt, str(a.limit_tokens)], capture_output=True, text=True,
                           check=True)
        print(r.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
