"""Perplexity on a text, and agreement with a base model (KL, top-1).

Convention (GPTQ/AWQ papers): the text is tokenized once as-is (no BOS
added), cut into non-overlapping windows of `seqlen` tokens (the remainder is
dropped), and every next-token prediction inside a window is scored.

Runtime: each window's forward goes through the lean runtime (runtime/decoder.py: one prefill per window,
native kernels where they build) whenever the model allows it (LLaMA family: float models and lowbit
checkpoints), else through transformers' forward; `runtime=` forces one. The lean runtime's logits equal
transformers' within the decoder's named tolerances (tests/eval/test_eval_runtime.py). NLL, KL and top-1 are
accumulated window by window, in slices of rows (no [tokens, vocab] array of the whole text).
"""
from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..core.text import read_text
from ..core.tokens import tokenize
from ..core.state import state_of
from ..errors import LowbitError
from .size import weight_stats


def _exp(x: float) -> float:
    """exp, inf past float range (a model with huge or infinite logits has an infinite perplexity)."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def windows(ids: torch.Tensor, seqlen: int, limit_tokens: int | None = None) -> torch.Tensor:
    """[n_windows, seqlen] non-overlapping windows (a single shorter one if the text is short)."""
    if seqlen < 2:
        raise LowbitError(f"seqlen must be at least 2, got {seqlen}")
    if limit_tokens is not None:
        if limit_tokens < 2:
            raise LowbitError(f"--limit-tokens must be at least 2, got {limit_tokens}")
        ids = ids[:limit_tokens]
    if ids.numel() < 2:
        raise LowbitError("text has fewer than 2 tokens")
    n = ids.numel() // seqlen
    if n == 0:
        return ids.reshape(1, -1)
    return ids[: n * seqlen].reshape(n, seqlen)


SLICE_ROWS = 128  # rows of logits turned into log-probabilities at a time


def window_forward(model: nn.Module, seqlen: int, runtime: str = "auto", int8_activations: bool = False):
    """A function ids [T] (T <= seqlen) -> float32 logits [T, vocab] of one window on its own: the lean runtime's
    prefill (a decoder made once, reset per window) where `runtime` allows it, else transformers' forward.
    On the lean runtime, quantized weights are dequantized once and multiplied in float32 (transformers' numbers),
    or with int8_activations through the native int8 GEMM (what the lean runtime computes for a prompt)."""
    from ..runtime.generation import pick_runtime

    if pick_runtime(model, runtime) == "lean":
        from ..runtime.decoder import LeanDecoder

        dec = LeanDecoder(model, max_len=seqlen, prefill="native" if int8_activations else "float")

        def lean(w):
            dec.reset()
            return dec.forward(w, all_logits=True)
        lean.runtime = "lean"
        return lean

    def hf(w):
        return model(w.unsqueeze(0)).logits[0].float()
    hf.runtime = "transformers"
    return hf


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    tokenizer,
    text: str | None = None,
    text_path: str | None = None,
    seqlen: int = 512,
    limit_tokens: int | None = None,
    base: nn.Module | None = None,
    progress: bool = True,
    device: str = "cpu",
    runtime: str = "auto",
    int8_activations: bool = False,
) -> dict:
    """ppl (+ kl, top1 vs `base`), bits per weight and bytes. Text default: WikiText-2 test.
    device: where the models run ("cpu", "cuda"): moved there for the evaluation (they stay there).
    runtime: auto (lean where the model allows it), lean, or transformers (see the module docstring); auto
    means transformers on another device or for a model not held in float32;
    int8_activations: on the lean runtime, score the native int8-activation GEMM's logits (window_forward)."""
    label = "<text>"
    if text is None:
        text, label = read_text(text_path)
    wins = windows(tokenize(tokenizer, text, max_tokens=limit_tokens), seqlen, limit_tokens)
    from ..models.validate import check_token_ids

    check_token_ids(wins, model)
    nll, count, kl_sum, agree, base_nll = 0.0, 0, 0.0, 0, 0.0
    if runtime == "auto" and (device != "cpu" or any(p.is_floating_point() and p.dtype != torch.float32
                                                     for p in model.parameters())):
        runtime = "transformers"
    fwd = window_forward(model, wins.shape[1], runtime, int8_activations)
    base_fwd = window_forward(base, wins.shape[1], runtime, int8_activations) if base is not None else None
    bar = tqdm(wins, desc="eval", unit="win", file=sys.stderr, disable=not progress, leave=False)
    if device != "cpu":
        model.to(device)
        if base is not None:
            base.to(device)
    for w in bar:
        target = w[1:].to(device)
        logits = fwd(w.to(device))[:-1]
        base_logits = base_fwd(w.to(device))[:-1] if base_fwd is not None else None
        for a in range(0, target.numel(), SLICE_ROWS):  # streaming: log-softmax of a slice of rows at a time
            sl = slice(a, a + SLICE_ROWS)
            logp = F.log_softmax(logits[sl].float(), dim=-1)
            nll += float(F.nll_loss(logp, target[sl], reduction="sum"))
            if base_logits is not None:
                logq = F.log_softmax(base_logits[sl].float(), dim=-1)
                base_nll += float(F.nll_loss(logq, target[sl], reduction="sum"))
                kl_sum += float(F.kl_div(logp, logq, log_target=True, reduction="sum"))  # KL(base || model)
                agree += int((logp.argmax(-1) == logq.argmax(-1)).sum())
        count += target.numel()
        for m, value in ((model, nll), (base, base_nll)):
            if m is not None and not math.isfinite(value):  # NaN/Inf weights or scales: no number to report
                raise LowbitError(f"{state_of(m).source or 'model'}: perplexity is {_exp(value / count)}: "
                                  "the model's logits are not finite (NaN or Inf in its weights or scales)")
        bar.set_postfix(ppl=f"{_exp(nll / count):.3f}")
    out = {
        "ppl": _exp(nll / count),
        "tokens": int(wins.numel()),
        "predicted": count,
        "windows": int(wins.shape[0]),
        "seqlen": int(wins.shape[1]),
        "text": label,
        "runtime": fwd.runtime + ("-int8" if int8_activations and fwd.runtime == "lean" else ""),
        **weight_stats(model),
    }
    if base is not None:
        out.update(kl=kl_sum / count, top1=agree / count, base_ppl=_exp(base_nll / count))
    return out
