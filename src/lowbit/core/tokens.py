"""Text -> token ids, for calibration windows and perplexity alike."""
from __future__ import annotations

import torch

from ..errors import LowbitError


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
    and masks at once (most of which the process then keeps). Each cut is checked:
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
