"""The dispatch behind `lowbit.load`: any MODEL source (models/loading.resolve) -> (model, tokenizer).

It sits in formats, above models, because a lowbit checkpoint loads through formats/checkpoint.py.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..core.state import state_of
from ..models.loading import load_hf, parse_dtype, resolve
from .gguf.convert import gguf_to_cache
from ..errors import LowbitError
from .checkpoint import WEIGHTS, load_checkpoint
from .export import foreign_source, load_foreign


def load_model(source: str | os.PathLike, dtype: torch.dtype | str | None = torch.float32, lazy: bool = False,
               skeleton=None):
    """Load any MODEL source -> (model, tokenizer). The model is in eval mode, without gradients.
    skeleton (lowbit checkpoints): the empty model to load into instead of transformers' class, and no
    tokenizer (formats/checkpoint.load_checkpoint). lazy=True (float models in safetensors: GGUF conversions,
    local folders): weights stay on disk until materialized part by part (models/lazy.py). Other sources
    ignore them. dtype: of the float weights; "auto" or None keeps the stored one (models/loading.parse_dtype);
    a lowbit checkpoint keeps its stored tensors whatever it says."""
    from ..models.lazy import can_load_lazily, load_lazy

    dtype = parse_dtype(dtype)
    src = resolve(source)
    foreign = foreign_source(src)
    if foreign:  # a compressed-tensors, GPTQ or AWQ folder: its codes go into lowbit's modules as they are
        model, tok = load_foreign(src.location, foreign, dtype, skeleton=skeleton)
    elif src.kind == "lowbit":
        model, tok = load_checkpoint(src.location, skeleton=skeleton)
    elif src.kind == "hf" and (Path(src.location) / WEIGHTS).is_file():
        raise LowbitError(f"{src.location}: holds {WEIGHTS} (a lowbit checkpoint's weights), but config.json has no "
                          "lowbit quantization_config: the config was changed or replaced")
    elif src.kind == "gguf":
        folder = gguf_to_cache(Path(src.location))
        model, tok = load_lazy(folder, dtype, src.name) if lazy else load_hf(str(folder), dtype, src.name)
    elif lazy and src.kind == "hf" and can_load_lazily(Path(src.location)):
        model, tok = load_lazy(Path(src.location), dtype, src.name)
    else:
        model, tok = load_hf(src.location, dtype, src.name)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    state_of(model).source = src.name
    return model, tok
