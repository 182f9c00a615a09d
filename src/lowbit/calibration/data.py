"""Calibration samples: random windows (fixed seed) of a calibration text.

Default text: WikiText-2 *valid* (vendored). The test text is refused: choosing
anything on the text that reports the final numbers would make them optimistic.
"""
from __future__ import annotations

import hashlib
import os

import torch

from ..core.text import CALIB_TEXT, TEST_TEXT, read_text
from ..core.tokens import tokenize
from ..errors import LowbitError

_TEST_SHA256 = "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c"


def calibration_ids(tokenizer, path: str | os.PathLike | None = None, nsamples: int = 128, seqlen: int = 512,
                    seed: int = 0) -> tuple[torch.Tensor, dict]:
    """[nsamples, seqlen] token windows and a description of them (for the checkpoint)."""
    if nsamples < 1 or seqlen < 2:
        raise LowbitError(f"need nsamples >= 1 and calib seqlen >= 2, got {nsamples} and {seqlen}")
    text, label = read_text(path if path is not None else CALIB_TEXT)
    if hashlib.sha256(text.encode("utf-8")).hexdigest() == _TEST_SHA256 or (
            path is not None and os.path.realpath(path) == os.path.realpath(TEST_TEXT)):
        raise LowbitError(f"{label}: this is the WikiText-2 test text; calibrate on other text (default: WikiText-2 valid)")
    ids = tokenize(tokenizer, text)
    if ids.numel() <= seqlen:
        raise LowbitError(f"{label}: {ids.numel()} tokens, too short for calibration windows of {seqlen}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=g)
    batch = torch.stack([ids[s: s + seqlen] for s in starts.tolist()])
    info = {"text": os.path.basename(label), "nsamples": nsamples, "seqlen": seqlen, "seed": seed,
            "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}
    return batch, info
