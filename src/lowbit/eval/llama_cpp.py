"""llama.cpp as the real client (through llama-cpp-python, optional): perplexity and text of a GGUF file.

Scored on token ids given by the caller, so llama.cpp and lowbit see the same tokens (llama.cpp's own
tokenizer merges "\\n\\n" into one token where transformers' GGUF tokenizer makes two).
"""
from __future__ import annotations

import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import LowbitError


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def open_model(path: str | os.PathLike, n_ctx: int = 512, logits_all: bool = False, threads: int | None = None):
    try:
        from llama_cpp import Llama
    except ImportError:
        raise LowbitError("llama.cpp is not installed: pip install llama-cpp-python") from None
    try:
        return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=logits_all, verbose=False,
                     n_threads=threads or torch.get_num_threads())
    except Exception as e:
        raise LowbitError(f"{path}: llama.cpp cannot load it ({type(e).__name__}: {e})") from None


def perplexity(path: str | os.PathLike, wins: torch.Tensor, threads: int | None = None, progress: bool = True) -> dict:
    """llama.cpp's perplexity of ``wins`` ([n, seqlen] token ids), each window scored on its own (as lowbit.evaluate)."""
    from tqdm.auto import tqdm

    seqlen = wins.shape[1]
    llm = open_model(path, n_ctx=seqlen, logits_all=True, threads=threads)
    nll, count = 0.0, 0
    try:
        for w in tqdm(wins, desc=f"llama.cpp {os.path.basename(str(path))}", unit="win", file=sys.stderr,
                      disable=not progress, leave=False):
            toks = w.tolist()
            llm.reset()
            llm.eval(toks)
            logits = torch.from_numpy(np.array(llm.scores[: len(toks) - 1], dtype=np.float32))
            target = w[1:]
            nll += float(F.cross_entropy(logits, target, reduction="sum"))
            count += target.numel()
    finally:
        if hasattr(llm, "close"):
            llm.close()
    return {"ppl": math.exp(nll / count), "predicted": count, "windows": int(wins.shape[0]), "seqlen": seqlen}


def generate(path: str | os.PathLike, prompt_ids: list[int], max_new_tokens: int = 16) -> list[int]:
    """Greedy continuation of ``prompt_ids`` by llama.cpp."""
    llm = open_model(path, n_ctx=max(64, len(prompt_ids) + max_new_tokens + 8))
    out = []
    llm.eval(prompt_ids)
    for _ in range(max_new_tokens):
        t = int(llm.sample(top_k=1))
        out.append(t)
        if t == llm.token_eos():
            break
        llm.eval([t])
    return out
