"""MODEL sources: everything `lowbit.load` accepts (the dispatch over them: formats/load.py).

  - an alias of the embedded zoo (`smollm2-135m`)
  - a `.gguf` file (transformers' GGUF loader, dequantized to float; the result
    is cached as safetensors so later loads skip the slow conversion)
  - a lowbit checkpoint folder (config.json with quant_method "lowbit")
  - a local Hugging Face folder (config.json + weights)
  - a Hugging Face hub id (`org/name`), when the hub is reachable
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LowbitError
from .zoo import ZOO, fetch_gguf

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class Source:
    kind: str  # "gguf" | "lowbit" | "hf" | "hub"
    location: str  # path or hub id
    name: str  # what the user typed


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError as e:
        raise LowbitError(f"{path}: cannot read: {e.strerror}") from None


def resolve(source: str | os.PathLike) -> Source:
    name = str(source)
    if name in ZOO:
        return Source("gguf", str(fetch_gguf(name)), name)
    path = Path(name).expanduser()
    if path.is_dir():
        cfg = path / "config.json"
        if not cfg.is_file():
            raise LowbitError(f"{path}: not a model folder (no config.json)")
        from .validate import read_json

        meta = read_json(cfg)  # bounded size, a JSON object, or one line naming the file
        qc = meta.get("quantization_config") or {}
        if isinstance(qc, dict) and qc.get("quant_method") == "lowbit":
            return Source("lowbit", str(path), name)
        return Source("hf", str(path), name)
    if path.exists():
        if not path.is_file():
            raise LowbitError(f"{path}: not a model (not a file or folder)")
        if not _is_gguf(path):
            raise LowbitError(f"{path}: not a model (expected a .gguf file, a model folder, a hub id or one of: {', '.join(ZOO)})")
        return Source("gguf", str(path), name)
    if _HUB_ID.match(name) and not name.startswith("."):
        return Source("hub", name, name)
    raise LowbitError(f"{name}: no such file or folder (and not a hub id or one of: {', '.join(ZOO)})")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)


def parse_dtype(dtype) -> torch.dtype | None:
    """--dtype: "auto" (None: the dtype the weights are stored in), "float32", "bfloat16", "float16", or a
    torch float dtype itself."""
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise LowbitError(f"dtype {dtype} is not one of: {', '.join(DTYPE_CHOICES)}")
        return dtype
    if dtype not in DTYPES:
        raise LowbitError(f"--dtype {dtype!r}: choose from {', '.join(DTYPE_CHOICES)}")
    return DTYPES[dtype]


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def load_hf(location: str, dtype: torch.dtype | None, label: str):
    """A Hugging Face folder or hub id through transformers: a local folder is checked first
    (models/validate.preflight: no custom code, config sizes against its safetensors' tensor table, every
    weight file inside it); no custom code is ever run, no pickle read, and a weight that the files do not
    hold (or hold in another shape) is an error, not a random init."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .validate import check_loading_info, preflight

    if Path(location).is_dir():
        preflight(Path(location), label)
    from transformers.utils import logging as hf_logging

    prev = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report of missing weights: the error below says it in one line
    try:
        model, info = AutoModelForCausalLM.from_pretrained(location, dtype=dtype or "auto", trust_remote_code=False,
                                                           use_safetensors=True, output_loading_info=True)
    except Exception as e:  # transformers raises many types; the user gets one line
        raise LowbitError(f"{label}: cannot load model ({one_line(e)})") from None
    finally:
        hf_logging.set_verbosity(prev)
    check_loading_info(info, label)
    try:
        tok = AutoTokenizer.from_pretrained(location, trust_remote_code=False)
    except Exception:
        tok = None
    return model, tok
