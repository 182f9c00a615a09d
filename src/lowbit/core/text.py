"""Evaluation and calibration text: the vendored WikiText-2 copy (see lowbit/data/README.md)."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import LowbitError

DATA = Path(__file__).resolve().parent.parent / "data"
TEST_TEXT = DATA / "wikitext-2-raw-test.txt"  # perplexity
CALIB_TEXT = DATA / "wikitext-2-valid-tokenized.txt"  # calibration (never the test text)


def read_text(path: str | os.PathLike | None = None) -> tuple[str, str]:
    """(text, label). Default: WikiText-2 raw test. Refuses missing, unreadable or empty files, and anything
    that is not a regular file (FIFOs, devices, folders) or is larger than TEXT_LIMIT, before reading it."""
    from .inputs import TEXT_LIMIT, read_regular

    p = Path(path).expanduser() if path is not None else TEST_TEXT
    data = read_regular(p, TEXT_LIMIT, what="text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LowbitError(f"{p}: not UTF-8 text (invalid byte at offset {e.start})") from None
    del data
    if not text or text.isspace():  # (no stripped copy of a large text)
        raise LowbitError(f"{p}: text file is empty")
    return text, str(p)
