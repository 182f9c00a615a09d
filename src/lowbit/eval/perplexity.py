"""Perplexity on a text, and agreement with a base model (KL, top-1).

Convention (GPTQ/AWQ papers): the text is tokenized once as-is (no BOS
added), cut into non-overlapping windows of `seqlen` tokens (the remainder is
dropped), and every next-token prediction inside a window is scored.
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
) -> dict:
    """ppl (+ kl, top1 vs `base`), bits per weight and bytes. Text default: WikiText-2 test.
    device: where the models run ("cpu", "cuda"): moved there for the evaluation, back to the CPU after."""
    label = "<text>"
    if text is None:
        text, label = read_text(text_path)
    wins = windows(tokenize(tokenizer, text, max_tokens=limit_tokens), seqlen, limit_tokens)
    from ..models.validate import check_token_ids

    check_token_ids(wins, model)
    nll, count, kl_sum, agree, base_nll = 0.0, 0, 0.0, 0, 0.0
    bar = tqdm(wins, desc="eval", unit="win", file=sys.stderr, disable=not progress, leave=False)
    if device != "cpu":
        model.to(device)
        if base is not None:
            base.to(device)
    for w in bar:
        x = w.unsqueeze(0).to(device)
        target = x[:, 1:].reshape(-1)
        logp = F.log_softmax(model(x).logits[:, :-1].float().flatten(0, 1), dim=-1)
        nll += float(F.nll_loss(logp, target, reduction="sum"))
        count += target.numel()
        if base is not None:
            logq = F.log_softmax(base(x).logits[:, :-1].float().flatten(0, 1), dim=-1)
            base_nll += float(F.nll_loss(logq, target, reduction="sum"))
            kl_sum += float(F.kl_div(logp, logq, log_target=True, reduction="sum"))  # KL(base || model)
            agree += int((logp.argmax(-1) == logq.argmax(-1)).sum())
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
        **weight_stats(model),
    }
    if base is not None:
        out.update(kl=kl_sum / count, top1=agree / count, base_ppl=_exp(base_nll / count))
    return out
