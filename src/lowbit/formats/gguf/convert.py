"""A .gguf MODEL as a float model: dequantized through transformers once, cached as safetensors by content."""
from __future__ import annotations

import hashlib
import os
import re
import sys
from pathlib import Path

import torch

from ...core.inputs import open_regular
from ...core.paths import cache_dir
from ...errors import LowbitError
from ...models.loading import one_line as _one_line
from ...core.io import install_new, locked_temp_dir, sweep_stale
from .check import read_model



def _file_sha256(path: Path) -> tuple[str, tuple]:
    """sha256 of the file's content, and (device, inode, size, mtime) of what was hashed."""
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


def gguf_to_cache(path: Path) -> Path:
    """Dequantize a GGUF with transformers once; keep the float model as safetensors.

    The file's header is checked first (formats/gguf/check.py: bounded counts and lengths, tensors that match
    the metadata), and the loaded model must have every weight from the file (no randomly initialized
    tensor). The cache is keyed by the content's sha256 and written atomically (a locked temporary folder,
    renamed into place; what killed conversions left behind is swept); a refused or failed conversion is
    never cached."""

    sha, ident = _file_sha256(path)
    folder = gguf_cache_folder(path, sha)
    sweep_stale(folder.parent, cache=True)
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder

    read_model(path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"lowbit: converting {path.name} to float (once; cached in {folder})", file=sys.stderr)
    from transformers.utils import logging as hf_logging

    prev = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report: missing weights are refused below, in one line
    try:
        model, info = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32, output_loading_info=True,
                                                           trust_remote_code=False)
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
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
    bad = next((n for n, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if bad is not None:  # e.g. a block type changed in the header: its bytes decode to NaN/Inf scales
        raise LowbitError(f"{path}: GGUF model refused ({bad} holds NaN or Inf after dequantization)")
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
