"""Speed of a model on this CPU: prefill, time to first token, decode with a KV cache.

    prefill    one forward over a prompt of `prompt_tokens` tokens (cache on)   -> tokens/s
    ttft       prefill + choosing the first token                              -> seconds
    decode     `new_tokens` greedy steps of one token each, reusing the cache  -> tokens/s
Every figure is the median over `runs` runs after one warm-up run (kernel
packing, allocator). `compare` measures several models alternately in one
process, so they share the machine's state, and reports ratios to the first.
"""
from __future__ import annotations

import resource
import statistics
import sys
import time

import torch
from torch import nn

from .size import weight_stats


def peak_rss_bytes() -> int:
    """This process's peak resident memory. Linux: VmHWM, which an exec resets (getrusage's ru_maxrss
    keeps the peak of the process that forked it, so a child started from a big parent reports the parent's)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def prompt_ids(tokenizer, n: int, text: str | None = None) -> torch.Tensor:
    """[1, n] ids of a real text (WikiText-2 test by default), repeated if it is short."""
    from ..core.text import read_text
    from ..core.tokens import tokenize

    if text is None:
        text = read_text(None)[0][: 40 * n]
    ids = tokenize(tokenizer, text)
    while ids.numel() < n:
        ids = torch.cat([ids, ids])
    return ids[:n].unsqueeze(0)


@torch.inference_mode()
def run_once(model: nn.Module, ids: torch.Tensor, new_tokens: int, decoder=None) -> dict:
    """One prefill + greedy decode; seconds of each phase. With `decoder` (a LeanDecoder of the
    model) on the lean runtime, else through transformers' forward and cache."""
    if decoder is not None:
        decoder.reset()
        t0 = time.perf_counter()
        logits = decoder.forward(ids[0], all_logits=False)
        t_prefill = time.perf_counter() - t0
        nxt = logits[-1].argmax().reshape(1)
        t_first = time.perf_counter() - t0
        t1 = time.perf_counter()
        for _ in range(new_tokens):
            nxt = decoder.forward(nxt)[-1].argmax().reshape(1)
        return {"prefill_s": t_prefill, "ttft_s": t_first, "decode_s": time.perf_counter() - t1}
    from transformers import DynamicCache

    cache = DynamicCache()
    t0 = time.perf_counter()
    out = model(ids, past_key_values=cache, use_cache=True)
    t_prefill = time.perf_counter() - t0
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    t_first = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        out = model(nxt, past_key_values=out.past_key_values, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    t_decode = time.perf_counter() - t1
    return {"prefill_s": t_prefill, "ttft_s": t_first, "decode_s": t_decode}


def compare(models: dict[str, nn.Module], ids: torch.Tensor, new_tokens: int = 128, runs: int = 3,
            progress: bool = True, runtime: str = "auto", runtimes: dict[str, str] | None = None) -> list[dict]:
    """Measure every model `runs` times (after a warm-up), alternating between them; `runtimes`
    overrides `runtime` for the models it names."""
    from ..runtime.decoder import LeanDecoder
    from ..runtime.generation import pick_runtime

    used = {n: pick_runtime(m, (runtimes or {}).get(n, runtime)) for n, m in models.items()}
    decoders = {n: LeanDecoder(m, max_len=ids.shape[1] + new_tokens + 1) if used[n] == "lean" else None
                for n, m in models.items()}
    times: dict[str, list[dict]] = {n: [] for n in models}
    for r in range(runs + 1):
        for name, m in models.items():
            res = run_once(m, ids, new_tokens, decoders[name])
            if r:
                times[name].append(res)
            if progress:
                print(f"lowbit: bench {name} ({used[name]}): run {r}/{runs}{' (warm-up)' if r == 0 else ''} "
                      f"prefill {res['prefill_s']:.3f}s decode {res['decode_s']:.2f}s", file=sys.stderr)
    rows = []
    n_prompt = ids.shape[1]
    for name, m in models.items():
        med = {k: statistics.median(t[k] for t in times[name]) for k in ("prefill_s", "ttft_s", "decode_s")}
        st = weight_stats(m)
        rows.append({
            "model": name,
            "runtime": used[name],
            "prefill_tok_s": n_prompt / med["prefill_s"],
            "ttft_s": med["ttft_s"],
            "decode_tok_s": new_tokens / med["decode_s"] if new_tokens else None,
            "model_bytes": st["model_bytes"],
            "bpw": st["bpw"],
            "prompt_tokens": n_prompt,
            "new_tokens": new_tokens,
            "runs": runs,
        })
    base = rows[0]
    for r in rows[1:]:
        r["prefill_vs_first"] = r["prefill_tok_s"] / base["prefill_tok_s"]
        if r["decode_tok_s"] and base["decode_tok_s"]:
            r["decode_vs_first"] = r["decode_tok_s"] / base["decode_tok_s"]
    return rows


def llama_cpp_speed(gguf: str, ids: torch.Tensor, new_tokens: int = 128, runs: int = 3, threads: int | None = None) -> dict:
    """The same prompt (token ids) through llama-cpp-python: prefill and decode tokens/s."""
    from .llama_cpp import open_model

    llm = open_model(gguf, n_ctx=max(1024, ids.shape[1] + new_tokens + 8), threads=threads)
    toks = ids[0].tolist()
    res = []
    for r in range(runs + 1):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(toks)
        t_prefill = time.perf_counter() - t0
        t1 = time.perf_counter()
        for _ in range(new_tokens):
            nxt = int(llm.sample(top_k=1))
            llm.eval([nxt])
        t_decode = time.perf_counter() - t1
        if r:
            res.append((t_prefill, t_decode))
    p = statistics.median(t for t, _ in res)
    d = statistics.median(t for _, t in res)
    import os

    return {"model": f"llama.cpp:{os.path.basename(str(gguf))}", "prefill_tok_s": ids.shape[1] / p,
            "decode_tok_s": new_tokens / d if new_tokens else None, "model_bytes": os.path.getsize(gguf),
            "prompt_tokens": ids.shape[1], "new_tokens": new_tokens, "runs": runs}
