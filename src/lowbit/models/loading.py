"""MODEL sources: everything `lowbit.load` accepts.

  - an alias of the embedded zoo (`smollm2-135m`)
  - a `.gguf` file (transformers' GGUF loader, dequantized to float; the result
    is cached as safetensors so later loads take a second, not ~30-50 s)
  - a lowbit checkpoint folder (config.json with quant_method "lowbit")
  - a local Hugging Face folder (config.json + weights)
  - a Hugging Face hub id (`org/name`), when the hub is reachable
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LowbitError
from .zoo import ZOO, cache_dir, fetch_gguf

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
        try:
            meta = json.loads(cfg.read_text())
        except (OSError, ValueError) as e:
            raise LowbitError(f"{cfg}: unreadable config.json ({e})") from None
        if not isinstance(meta, dict):
            raise LowbitError(f"{cfg}: config.json is not a JSON object")
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


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def _load_hf(location: str, dtype: torch.dtype, label: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype)
    except Exception as e:  # transformers raises many types; the user gets one line
        raise LowbitError(f"{label}: cannot load model ({_one_line(e)})") from None
    try:
        tok = AutoTokenizer.from_pretrained(location)
    except Exception:
        tok = None
    return model, tok


def _file_sha256(path: Path) -> tuple[str, tuple]:
    """sha256 of the file's content, and (device, inode, size, mtime) of what was hashed."""
    from ..formats.inputs import open_regular

    fd, st = open_regular(path, "GGUF file")
    h = hashlib.sha256()
    with os.fdopen(fd, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest(), (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def gguf_cache_folder(path: Path, sha256: str | None = None) -> Path:
    """The conversion's cache folder: keyed by the file's content (a file replaced in place, whatever its
    size and mtime, is a new key), named after the file for people browsing the cache."""
    sha256 = sha256 or _file_sha256(path)[0]
    stem = re.sub(r"[^\w.+-]", "_", path.stem)[:64].lstrip(".") or "model"
    return cache_dir() / "gguf" / f"{stem}-{sha256[:32]}"


def _gguf_to_cache(path: Path) -> Path:
    """Dequantize a GGUF with transformers once; keep the float model as safetensors.

    The file's header is checked first (formats/gguf/check.py: bounded counts and lengths, tensors that match
    the metadata), and the loaded model must have every weight from the file (no randomly initialized
    tensor). The cache is keyed by the content's sha256 and written atomically (a locked temporary folder,
    renamed into place; what killed conversions left behind is swept); a refused or failed conversion is
    never cached."""
    from ..formats.io import install_new, locked_temp_dir, sweep_stale

    sha, ident = _file_sha256(path)
    folder = gguf_cache_folder(path, sha)
    sweep_stale(folder.parent, cache=True)
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    from ..formats.gguf.check import read_model

    read_model(path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"lowbit: converting {path.name} to float (once; cached in {folder})", file=sys.stderr)
    from transformers.utils import logging as hf_logging

    prev = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report: missing weights are refused below, in one line
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32, output_loading_info=True)
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        raise LowbitError(f"{path}: cannot load GGUF ({_one_line(e)})") from None
    finally:
        hf_logging.set_verbosity(prev)
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(info.get("mismatched_keys") or [])
    if missing or mismatched:
        what = f"no weights in the file for {', '.join(missing[:3])}" if missing else \
            f"weights of the wrong shape for {', '.join(str(m) for m in mismatched[:3])}"
        raise LowbitError(f"{path}: GGUF model refused ({what}{' ...' if len(missing or mismatched) > 3 else ''}: "
                          "those would be random)")
    # The weights are plain floats now: drop the GGUF quantizer so the model saves as a normal one.
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    with locked_temp_dir(folder) as tmp:
        try:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        except OSError as e:
            raise LowbitError(f"{folder}: cannot write the conversion ({e.strerror})") from None
        st = os.stat(path)
        if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != ident:
            raise LowbitError(f"{path}: changed while being converted; run again")
        install_new(tmp, folder)  # False: another process cached the same content meanwhile (same result)
    return folder


def load(source: str | os.PathLike, dtype: torch.dtype = torch.float32, lean: bool = False, lazy: bool = False):
    """Load any MODEL source -> (model, tokenizer). The model is in eval mode, without gradients.
    lean=True (lowbit checkpoints of the LLaMA family): transformers-free skeleton for the lean decoder, no
    tokenizer (models/lean.py). lazy=True (float models in safetensors: GGUF conversions, local folders):
    weights stay on disk until materialized part by part (models/lazy.py). Other sources ignore them."""
    from .lazy import can_load_lazily, load_lazy

    src = resolve(source)
    if src.kind == "lowbit":
        from ..formats.checkpoint import load_checkpoint

        model, tok = load_checkpoint(src.location, lean=lean)
    elif src.kind == "gguf":
        folder = _gguf_to_cache(Path(src.location))
        model, tok = load_lazy(folder, dtype, src.name) if lazy else _load_hf(str(folder), dtype, src.name)
    elif lazy and src.kind == "hf" and can_load_lazily(Path(src.location)):
        model, tok = load_lazy(Path(src.location), dtype, src.name)
    else:
        model, tok = _load_hf(src.location, dtype, src.name)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model.lowbit_source = src.name
    return model, tok
