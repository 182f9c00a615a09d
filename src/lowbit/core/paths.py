"""Where lowbit keeps what it builds or fetches once: $LOWBIT_CACHE, else $XDG_CACHE_HOME/lowbit (~/.cache/lowbit)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("LOWBIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lowbit")
    return Path(root)
