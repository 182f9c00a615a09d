"""SmolLM2-135M on this CPU (issue 6): prefill and decode speed, memory, and the bandwidth bound.

    python bench/speed_table.py [--work DIR] [--new-tokens 128] [--runs 3] [--gptq] [--markdown FILE]

Models (quantized into --work by the lowbit CLI when missing): float32, bf16 (the float model cast),
W8 weight-only (per-channel RTN), W8A8 (dynamic, 7-bit activations), W4 g128 sym RTN (decoder
linears), the same with lm_head and the embedding table at W8 ("+head"), optionally W4 GPTQ
(+head), and llama.cpp (llama-cpp-python) on lowbit's Q4_0 and Q4_K_M exports of the float model.

Speed: one process; every model in turn, `--runs` rounds after a warm-up, median per model;
prefill = one 512-token prompt of WikiText-2 test, decode = `--new-tokens` greedy tokens (batch 1).
lowbit models run on the lean runtime (runtime/decoder.py); the float32 model also on transformers'
forward, for reference. Ratios are to the float32 (lean) row of the same run.
Bandwidth bound: bytes one decoded token reads (weights as the decode path stores them + K/V cache
at the mean context) against this machine's read bandwidth (sum over a 256 MiB tensor).
Prompt lengths (issue 25): with --prompt-lengths (default 128 512 2048) the lean models and llama.cpp's Q4_0 also
prefill each of those lengths, interleaved, median of --runs ("prefill_LEN" columns). Evaluation: --eval-tokens
(default 4096; 0 skips) WikiText-2 test tokens in 512-token windows through lowbit.evaluate (lean runtime) for
float32 and W4+head, and through llama.cpp (all logits) on its Q4_0 export, the same windows: tokens/s of each
("eval tok/s"). The JSON records the CPU flags and the native kernels' instruction set.
Peak RSS: one fresh process per model that loads it and runs the same prompt + decode; lean rows load
with lowbit.load(..., lean=True) (runtime/lean.py: no transformers import), the float32 model from a lowbit
float checkpoint of the same weights (--work/fp32-ckpt), fp32-transformers through transformers.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import log, report  # noqa: E402

HEAD8 = ["--override", "lm_head|embed_tokens=8/-1"]
QUANTIZED = {
    # name: lowbit quantize arguments
    "w8": ["--bits", "8", "--group-size", "-1", "--sym"],
    "w8a8-a7": ["--method", "w8a8", "--act-bits", "7", "--no-rotate"],  # as measured in the README
    "w4": ["--bits", "4", "--group-size", "128", "--sym"],
    "w4+head": ["--bits", "4", "--group-size", "128", "--sym", *HEAD8],
    "w4-gptq+head": ["--method", "gptq", "--bits", "4", "--group-size", "128", "--sym", *HEAD8],
}
GGUF = ("Q4_0", "Q4_K_M")


def lowbit_cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "lowbit", *args], check=True)


def prepare(work: Path, model: str, names: list[str]) -> dict[str, str]:
    work.mkdir(parents=True, exist_ok=True)
    paths = {"fp32-ckpt": str(work / "fp32-ckpt")}
    if not (work / "fp32-ckpt").exists():  # the float model as a lowbit checkpoint (lean loading for the RSS row)
        import lowbit

        m, tok = lowbit.load(model)
        lowbit.save(m, tok, work / "fp32-ckpt")
    for n in names:
        p = work / n
        if not p.exists():
            log(f"quantizing {n}")
            lowbit_cli("quantize", model, str(p), *QUANTIZED[n])
        paths[n] = str(p)
    return paths


def load(name: str, model: str, paths: dict[str, str]):
    import lowbit

    if name in ("fp32", "fp32-transformers"):
        return lowbit.load(model)[0]
    if name == "bf16":
        return lowbit.load(model)[0].to(torch.bfloat16)
    return lowbit.load(paths[name])[0]


def read_bandwidth() -> float:
    """Bytes/s of a sum over a 256 MiB float32 tensor (median of 7), with torch's threads."""
    x = torch.ones(64 * 1024 * 1024)
    x.sum()
    ts = []
    for _ in range(7):
        t0 = time.perf_counter()
        x.sum()
        ts.append(time.perf_counter() - t0)
    return x.numel() * 4 / statistics.median(ts)


def rss_child(name: str, model: str, paths: dict[str, str], prompt: int, new: int) -> None:
    """In a fresh process: load one model, prefill + decode once, print the peak RSS."""
    from lowbit.eval import speed
    from lowbit.runtime.decoder import LeanDecoder

    import lowbit

    if name == "fp32-transformers":
        m = load(name, model, paths)
    else:
        m = lowbit.load(paths["fp32-ckpt"] if name in ("fp32", "bf16") else paths[name], lean=True)[0]
        m = m.to(torch.bfloat16) if name == "bf16" else m
    ids = torch.tensor(json.loads(os.environ["LOWBIT_BENCH_IDS"])).unsqueeze(0)
    dec = None if name == "fp32-transformers" else LeanDecoder(m, max_len=prompt + new + 1)
    speed.run_once(m, ids, new, dec)
    print(json.dumps({"peak_rss_bytes": speed.peak_rss_bytes()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--work", type=Path, default=Path("bench_out/speed"))
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--gptq", action="store_true", help="add W4 GPTQ (+head): ~7 min of quantization")
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--no-rss", action="store_true")
    ap.add_argument("--markdown", type=Path, default=None)
    ap.add_argument("--prompt-lengths", type=int, nargs="*", default=[128, 512, 2048])
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--rss-of", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    names = ["w8", "w8a8-a7", "w4", "w4+head"] + (["w4-gptq+head"] if args.gptq else [])
    if args.rss_of:
        paths = {n: str(args.work / n) for n in [*names, "fp32-ckpt"]}
        rss_child(args.rss_of, args.model, paths, args.prompt_tokens, args.new_tokens)
        return

    import lowbit
    from lowbit.eval import speed
    from lowbit.runtime.decoder import LeanDecoder

    paths = prepare(args.work, args.model, names)
    _, tok = lowbit.load(args.model)
    ids = speed.prompt_ids(tok, args.prompt_tokens)
    order = ["fp32", "fp32-transformers", "bf16", *names]
    models = {n: load(n, args.model, paths) for n in order}
    runtimes = {n: ("transformers" if n == "fp32-transformers" else "lean") for n in order}
    log(f"timing {len(models)} models, {args.runs} runs each")
    rows = speed.compare(models, ids, new_tokens=args.new_tokens, runs=args.runs, runtimes=runtimes)
    bw = read_bandwidth()
    ctx = args.prompt_tokens + args.new_tokens // 2
    for r in rows:
        if r["runtime"] == "lean":
            dec = LeanDecoder(models[r["model"]], max_len=ctx + 1)
            r["decode_bytes_per_token"] = dec.decode_bytes(ctx)
            r["decode_bound_tok_s"] = bw / r["decode_bytes_per_token"]
            r["decode_share_of_bound"] = r["decode_tok_s"] / r["decode_bound_tok_s"]
    if not args.no_llama_cpp:
        from lowbit.eval.llama_cpp import available

        if available():
            for t in GGUF:
                f = args.work / f"lowbit-{t}.gguf"
                if not f.exists():
                    lowbit_cli("export-gguf", args.model, str(f), "--type", t)
                row = speed.llama_cpp_speed(str(f), ids, new_tokens=args.new_tokens, runs=args.runs,
                                            threads=torch.get_num_threads())
                base = rows[0]
                row["prefill_vs_first"] = row["prefill_tok_s"] / base["prefill_tok_s"]
                row["decode_vs_first"] = row["decode_tok_s"] / base["decode_tok_s"]
                rows.append(row)
        else:
            log("llama-cpp-python is not installed: no llama.cpp rows")
    prompt_lengths(args, rows, models, tok)
    eval_speed(args, rows, models, tok)
    del models
    if not args.no_rss:
        env = dict(os.environ, LOWBIT_BENCH_IDS=json.dumps(ids[0].tolist()))
        for r in rows:
            if r["model"].startswith("llama.cpp:"):
                continue
            cmd = [sys.executable, __file__, "--rss-of", r["model"], "--model", args.model, "--work", str(args.work),
                   "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]
            cmd += ["--gptq"] if args.gptq else []
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
            r["peak_rss_bytes"] = json.loads(out.strip().splitlines()[-1])["peak_rss_bytes"]
        base_rss = next(r["peak_rss_bytes"] for r in rows if r["model"] == "fp32")
        for r in rows:
            if "peak_rss_bytes" in r:
                r["rss_vs_fp32"] = r["peak_rss_bytes"] / base_rss
    cols = [("model", "model", "s"), ("runtime", "runtime", "s"), ("prefill_tok_s", "prefill tok/s", ".1f"),
            ("prefill_vs_first", "× fp32", ".2f"), ("decode_tok_s", "decode tok/s", ".1f"),
            ("decode_vs_first", "× fp32", ".2f"), ("decode_bytes_per_token", "bytes read / token", ",d"),
            ("decode_bound_tok_s", "bandwidth bound tok/s", ".0f"), ("decode_share_of_bound", "share of bound", ".2f"),
            ("model_bytes", "model bytes", ",d"), ("peak_rss_bytes", "peak RSS", ",d"), ("rss_vs_fp32", "RSS × fp32", ".2f")]
    cols += [(f"prefill_{n}_tok_s", f"prefill {n} tok/s", ".1f") for n in args.prompt_lengths]
    cols += [("eval_tok_s", "eval tok/s", ".1f"), ("eval_ppl", "eval ppl", ".3f")]
    from lowbit.kernels.native import describe

    report(rows, cols, args.markdown, {"read_bandwidth_bytes_s": bw, "threads": torch.get_num_threads(),
                                       "native_kernels": describe(),
                                       "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                                       "runs": args.runs})

def prompt_lengths(args, rows, models, tok) -> None:
    """prefill_LEN_tok_s for every lean row and llama.cpp's Q4_0 row: each length, models interleaved, median."""
    from lowbit.eval import speed
    from lowbit.runtime.decoder import LeanDecoder

    if not args.prompt_lengths:
        return
    top = max(args.prompt_lengths)
    lean = {r["model"]: LeanDecoder(models[r["model"]], max_len=top + 1) for r in rows if r.get("runtime") == "lean"}
    llm = None
    q4 = args.work / "lowbit-Q4_0.gguf"
    if not args.no_llama_cpp and q4.exists():
        from lowbit.eval.llama_cpp import open_model

        llm = open_model(q4, n_ctx=top + 8, threads=torch.get_num_threads())
    for n in args.prompt_lengths:
        ids = speed.prompt_ids(tok, n)[0]
        times: dict[str, list[float]] = {}
        for r in range(args.runs + 1):
            for name, dec in lean.items():
                dec.reset()
                t0 = time.perf_counter()
                dec.forward(ids, all_logits=False)
                if r:
                    times.setdefault(name, []).append(time.perf_counter() - t0)
            if llm is not None:
                llm.reset()
                t0 = time.perf_counter()
                llm.eval(ids.tolist())
                if r:
                    times.setdefault(f"llama.cpp:{q4.name}", []).append(time.perf_counter() - t0)
        for row in rows:
            if row["model"] in times:
                row[f"prefill_{n}_tok_s"] = n / statistics.median(times[row["model"]])
        log(f"prefill {n}: " + ", ".join(f"{k} {n / statistics.median(v):.1f} tok/s" for k, v in times.items()))


def eval_speed(args, rows, models, tok) -> None:
    """eval_tok_s: lowbit.evaluate (lean) of fp32 and w4+head, llama.cpp's Q4_0 on the same windows."""
    if not args.eval_tokens:
        return
    import lowbit
    from lowbit.core.text import read_text
    from lowbit.core.tokens import tokenize
    from lowbit.eval.perplexity import windows

    text = read_text(None)[0]
    for name in ("fp32", "w4+head"):
        t0 = time.perf_counter()
        res = lowbit.evaluate(models[name], tok, text=text, limit_tokens=args.eval_tokens, progress=False,
                              runtime="lean")
        dt = time.perf_counter() - t0
        row = next(r for r in rows if r["model"] == name)
        row["eval_tok_s"], row["eval_ppl"] = res["tokens"] / dt, res["ppl"]
    q4 = args.work / "lowbit-Q4_0.gguf"
    if not args.no_llama_cpp and q4.exists():
        from lowbit.eval.llama_cpp import perplexity

        wins = windows(tokenize(tok, text, max_tokens=args.eval_tokens), 512, args.eval_tokens)
        t0 = time.perf_counter()
        res = perplexity(q4, wins, threads=torch.get_num_threads(), progress=False)
        dt = time.perf_counter() - t0
        row = next((r for r in rows if r["model"] == f"llama.cpp:{q4.name}"), None)
        if row is not None:
            row["eval_tok_s"], row["eval_ppl"] = wins.numel() / dt, res["ppl"]


if __name__ == "__main__":
    main()
