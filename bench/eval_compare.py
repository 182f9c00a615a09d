"""`lowbit eval` against llama.cpp scoring the same tokens (issue 25): whole processes timed, interleaved.

    python bench/eval_compare.py --model CKPT --gguf FILE.gguf [--limit-tokens 32768] [--seqlen 512] [--rounds 1]
                                 [--int8-activations]

Each round runs, one after the other, (1) `python -m lowbit eval CKPT --limit-tokens N --json` and (2) a process
that loads the GGUF with llama-cpp-python (all logits) and scores the same token windows (lowbit's tokenizer,
eval.perplexity.windows; eval.llama_cpp.perplexity); wall time of each whole process, tokens/s = N / seconds, the
best of the rounds. Prints JSON with both perplexities, the ratio, the load average and the CPU flags.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

LLAMA_CHILD = r'''
import json, sys, torch
from lowbit.eval.llama_cpp import perplexity
wins = torch.tensor(json.load(open(sys.argv[1])))
print(json.dumps(perplexity(sys.argv[2], wins, threads=torch.get_num_threads(), progress=False)))
'''


def cpu_flags() -> list[str]:
    from lowbit.kernels.native import cpu_features

    return [k for k, v in cpu_features().items() if v]


def timed(cmd: list[str]) -> tuple[float, dict]:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return time.perf_counter() - t0, json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="lowbit model (checkpoint folder or smollm2-135m)")
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--limit-tokens", type=int, default=32768)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--int8-activations", action="store_true")
    args = ap.parse_args()
    load0 = open("/proc/loadavg").read().split()[:3]
    lb_cmd = [sys.executable, "-m", "lowbit", "eval", args.model, "--limit-tokens", str(args.limit_tokens),
              "--seqlen", str(args.seqlen), "--json"] + (["--int8-activations"] if args.int8_activations else [])
    # the same windows for llama.cpp, tokenized here (lowbit's tokenizer) and handed over as ids: its process
    # loads the GGUF and scores, nothing else
    import tempfile

    import lowbit
    from lowbit.core.text import read_text
    from lowbit.core.tokens import tokenize
    from lowbit.eval.perplexity import windows

    tok = lowbit.load(args.model)[1]
    wins = windows(tokenize(tok, read_text(None)[0], max_tokens=args.limit_tokens), args.seqlen, args.limit_tokens)
    ids_file = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
    json.dump(wins.tolist(), ids_file)
    ids_file.close()
    ll_cmd = [sys.executable, "-c", LLAMA_CHILD, ids_file.name, args.gguf]
    lb, ll = [], []
    for _ in range(args.rounds):
        lb.append(timed(lb_cmd))
        ll.append(timed(ll_cmd))
    os.unlink(ids_file.name)
    (t_lb, r_lb), (t_ll, r_ll) = min(lb, key=lambda x: x[0]), min(ll, key=lambda x: x[0])
    n = r_lb["tokens"]
    res = {"tokens": n, "lowbit_s": t_lb, "llama_cpp_s": t_ll, "lowbit_tok_s": n / t_lb,
           "llama_cpp_tok_s": n / t_ll, "lowbit_vs_llama_cpp": t_ll / t_lb, "lowbit_ppl": r_lb["ppl"],
           "lowbit_runtime": r_lb.get("runtime"), "llama_cpp_ppl": r_ll["ppl"], "rounds": args.rounds,
           "all_lowbit_s": [t for t, _ in lb], "all_llama_cpp_s": [t for t, _ in ll],
           "cpu_flags": cpu_flags(), "loadavg_before": load0, "loadavg_after": open("/proc/loadavg").read().split()[:3],
           "threads": os.cpu_count()}
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
