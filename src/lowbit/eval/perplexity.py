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

from ..errors import LowbitError
from .size import weight_stats
from .text import read_text


TOKENIZE_CHUNK = 1 << 15  # characters per tokenizer call


def _cut_points(text: str, chunk: int) -> list[int]:
    """Offsets, about `chunk` characters apart, just after a newline that a non-whitespace character follows:
    a boundary of every pre-tokenizer that splits on whitespace (GPT-2 and Llama-3 style byte-level BPE)."""
    cuts, i, n = [], chunk, len(text)
    while i < n:
        k = text.find("\n", i)
        while k != -1 and k + 1 < n and text[k + 1].isspace():
            k = text.find("\n", k + 1)
        if k == -1 or k + 1 >= n:
            break
        cuts.append(k + 1)
        i = k + 1 + chunk
    return cuts


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def tokenize(tokenizer, text: str, chunk: int = TOKENIZE_CHUNK) -> torch.Tensor:
    """The text's token ids ([n] int64), as one call on the whole text would give them.

    Tokenized `chunk` characters at a time: one call on a whole corpus holds every token's string, offsets
    and masks at once (+160 MB on WikiText-2 valid, most of which the process keeps). Each cut is checked:
    the tokens of the text around it must equal the tokens of its two sides; a tokenizer for which a cut
    changes the tokens (SentencePiece's dummy prefix) gets the text in one call."""
    if tokenizer is None:
        raise LowbitError("the model has no tokenizer: cannot evaluate on text")
    from transformers.utils import logging as hf_logging

    prev = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "sequence longer than max length" is expected here
    try:
        cuts = _cut_points(text, chunk)
        if any(_encode(tokenizer, text[max(0, c - 256): c + 256]) !=
               _encode(tokenizer, text[max(0, c - 256): c]) + _encode(tokenizer, text[c: c + 256]) for c in cuts):
            cuts = []
        bounds = [0, *cuts, len(text)]
        ids: list[int] = []
        for a, b in zip(bounds, bounds[1:]):
            ids.extend(_encode(tokenizer, text[a:b]))
    finally:
        hf_logging.set_verbosity(prev)
    return torch.tensor(ids, dtype=torch.long)


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
) -> dict:
    """ppl (+ kl, top1 vs `base`), bits per weight and bytes. Text default: WikiText-2 test."""
    label = "<text>"
    if text is None:
        text, label = read_text(text_path)
    wins = windows(tokenize(tokenizer, text), seqlen, limit_tokens)
    from ..formats.validate import check_token_ids

    check_token_ids(wins, model)
    nll, count, kl_sum, agree, base_nll = 0.0, 0, 0.0, 0, 0.0
    bar = tqdm(wins, desc="eval", unit="win", file=sys.stderr, disable=not progress, leave=False)
    for w in bar:
        x = w.unsqueeze(0)
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
                raise LowbitError(f"{getattr(m, 'lowbit_source', 'model')}: perplexity is {math.exp(value / count)}: "
                                  "the model's logits are not finite (NaN or Inf in its weights or scales)")
        bar.set_postfix(ppl=f"{math.exp(nll / count):.3f}")
    out = {
        "ppl": math.exp(nll / count),
        "tokens": int(wins.numel()),
        "predicted": count,
        "windows": int(wins.shape[0]),
        "seqlen": int(wins.shape[1]),
        "text": label,
        **weight_stats(model),
    }
    if base is not None:
        out.update(kl=kl_sum / count, top1=agree / count, base_ppl=math.exp(base_nll / count))
    return out
