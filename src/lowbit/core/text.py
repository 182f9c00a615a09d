"""Evaluation and calibration text: the vendored WikiText-2 copy (see lowbit/data/README.md)."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import LowbitError

DATA = Path(__file__).resolve().parent.parent / "data"
TEST_TEXT = DATA / "wikitext-2-raw-test.txt"  # perplexity
CALIB_TEXT = DATA / "wikitext-2-valid-tokenized.txt"  # calibration (never the test text)


def read_text(path: str | os.PathLike | None = None) -> tuple[str, str]:
    """(text, label). Default: WikiText-2 raw test. Refuses missing, unreadable or empty files."""
    p = Path(path).expanduser() if path is not None else TEST_TEXT
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LowbitError(f"{p}: no such text file") from None
    except IsADirectoryError:
        raise LowbitError(f"{p}: is a folder, not a text file") from None
    except UnicodeDecodeError:
        raise LowbitError(f"{p}: not UTF-8 text") from None
    except OSError as e:
        raise LowbitError(f"{p}: cannot read ({e.strerror})") from None
    if not text.strip():
        raise LowbitError(f"{p}: text file is empty")
    return text, str(p)
