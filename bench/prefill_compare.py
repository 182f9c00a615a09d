"""Prefill side by side (issue 25): lowbit lean W4 (+W8 head) vs lowbit float32 (lean) vs llama.cpp on lowbit's
Q4_0 export, one process, interleaved rounds, median per row.

    python bench/prefill_compare.py --w4 CKPT --gguf FILE.gguf [--lengths 128 512 2048] [--runs 5] [--threads N]

Prints JSON: per prompt length, prefill tokens/s of each and the ratios; the load average before and after,
the CPU flags that matter, the native kernels' instruction set.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def cpu_flags() -> list[str]:
    want = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile",
            "amx_int8")
    try:
        line = next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags"))
    except (OSError, StopIteration):
        return []
    have = set(line.split(":", 1)[1].split())
    return [f for f in want if f in have]


def loadavg() -> str:
    try:
        return open("/proc/loadavg").read().split(" ", 3)[:3].__str__()
    except OSError:
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--w4", required=True)
    ap.add_argument("--gguf", default=None)
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import lowbit
    from lowbit.eval import speed
    from lowbit.kernels import native
    from lowbit.runtime.decoder import LeanDecoder

    fp, tok = lowbit.load(args.model)
    w4 = lowbit.load(args.w4)[0]
    load0 = loadavg()
    top = max(args.lengths)
    decs = {"lowbit-w4": LeanDecoder(w4, max_len=top + 1), "lowbit-fp32": LeanDecoder(fp, max_len=top + 1)}
    llm = None
    if args.gguf:
        from lowbit.eval.llama_cpp import open_model

        llm = open_model(args.gguf, n_ctx=top + 8, threads=torch.get_num_threads())
    out = {"cpu_flags": cpu_flags(), "threads": torch.get_num_threads(),
           "native_isa": native.isa(native.lib()) if native.lib() is not None else None, "rows": []}
    for n in args.lengths:
        ids = speed.prompt_ids(tok, n)[0]
        times: dict[str, list[float]] = {k: [] for k in [*decs, *(["llama.cpp-q4_0"] if llm else [])]}
        for r in range(args.runs + 1):
            for name, dec in decs.items():
                dec.reset()
                t0 = time.perf_counter()
                dec.forward(ids, all_logits=False)
                if r:
                    times[name].append(time.perf_counter() - t0)
            if llm is not None:
                llm.reset()
                t0 = time.perf_counter()
                llm.eval(ids.tolist())
                if r:
                    times["llama.cpp-q4_0"].append(time.perf_counter() - t0)
        row = {"prompt_tokens": n}
        for k, ts in times.items():
            row[f"{k}_tok_s"] = n / statistics.median(ts)
        if llm is not None:
            row["w4_vs_llama_cpp"] = row["lowbit-w4_tok_s"] / row["llama.cpp-q4_0_tok_s"]
        row["w4_vs_fp32"] = row["lowbit-w4_tok_s"] / row["lowbit-fp32_tok_s"]
        out["rows"].append(row)
    out["loadavg_before"], out["loadavg_after"] = load0, loadavg()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
