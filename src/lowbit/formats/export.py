"""One export entry point for every format lowbit writes besides its own checkpoint.

    compressed-tensors   formats/compressed_tensors.py   (vLLM, SGLang, transformers + compressed-tensors)
    gptq                 formats/gptq_format.py          (GPTQModel, transformers, vLLM, SGLang, TGI)
    awq                  formats/gptq_format.py          (AWQ's GEMM layout; asymmetric 4-bit)
    gguf                 formats/gguf/export.py          (llama.cpp, ollama, LM Studio; options: its own)
Every writer copies lowbit's integer codes as they are (the GGUF writer re-rounds to its block types), refuses
with one line what its format cannot hold, and builds its output in a temporary sibling renamed into place.
"""
from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from ..errors import LowbitError

FORMATS = ("compressed-tensors", "gptq", "awq", "gguf")


def export_model(model: nn.Module, tokenizer, out: str | os.PathLike, fmt: str, dtype: str | None = None,
                 overwrite: bool = False, **gguf_options) -> dict:
    """Write `model` to `out` in format `fmt`. gguf_options go to formats/gguf/export.export_gguf (ftype, ...)."""
    if fmt == "compressed-tensors":
        from .compressed_tensors import export_compressed_tensors

        return export_compressed_tensors(model, tokenizer, out, dtype=dtype, overwrite=overwrite)
    if fmt in ("gptq", "awq"):
        from .gptq_format import export_gptq

        return export_gptq(model, tokenizer, out, dtype=dtype, overwrite=overwrite, awq=fmt == "awq")
    if fmt == "gguf":
        from .gguf.export import export_gguf

        ftype = gguf_options.pop("ftype")
        return export_gguf(model, tokenizer, out, ftype, overwrite=overwrite, **gguf_options)
    raise LowbitError(f"unknown export format {fmt!r} (choose from: {', '.join(FORMATS)})")


def foreign_format(qc: object) -> str | None:
    """The reader for a folder's quantization_config: "compressed-tensors", "gptq", "awq" or None."""
    if not isinstance(qc, dict):
        return None
    m = str(qc.get("quant_method", "")).lower()
    return m if m in ("compressed-tensors", "gptq", "awq") else None


def foreign_source(src) -> str | None:
    """The format of a local model folder (models/loading.Source) written by an engine's tool, else None."""
    if src.kind != "hf":
        return None
    from ..models.validate import read_json

    try:
        conf = read_json(Path(src.location) / "config.json")  # bounded; a bad config is refused by the loaders
        return foreign_format(conf.get("quantization_config"))
    except (LowbitError, AttributeError):
        return None


def load_foreign(folder: str | os.PathLike, fmt: str, dtype, skeleton=None):
    if fmt == "compressed-tensors":
        from .compressed_tensors import load_compressed_tensors

        return load_compressed_tensors(folder, dtype, skeleton=skeleton)
    from .gptq_format import load_gptq

    return load_gptq(folder, dtype, skeleton=skeleton)
