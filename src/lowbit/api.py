"""The Python API; the CLI calls exactly these."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch import nn

from .core.config import QuantConfig
from .errors import LowbitError
from .eval.perplexity import evaluate
from .formats.checkpoint import save_checkpoint
from .formats.load import load_model
from .runtime.generation import generate
from .runtime.lean import lean_skeleton


class QuantContext:
    """What a method may need beyond the model: the tokenizer and calibration windows.

    Calibration settings come from config.options: "calib" (text file; default
    WikiText-2 valid), "nsamples" (128), "calib_seqlen" (512); windows are drawn
    with config.seed. They are tokenized only if a method asks.
    """

    def __init__(self, config: QuantConfig, tokenizer=None, calib_ids: torch.Tensor | None = None) -> None:
        self.config, self.tokenizer, self._ids = config, tokenizer, calib_ids

    def calib_ids(self) -> torch.Tensor:
        if self._ids is None:
            from .calibration.data import calibration_ids

            if self.tokenizer is None:
                raise LowbitError(f"method {self.config.method!r} needs calibration text: pass the tokenizer")
            o = self.config.options
            self._ids, info = calibration_ids(self.tokenizer, o.get("calib"), nsamples=o.get("nsamples", 128),
                                              seqlen=o.get("calib_seqlen", 512), seed=self.config.seed)
            o["calibration"] = info
        return self._ids


# methods that read the decoder blocks' float weights as they reach them (calibration/sequential.layer_sequential
# one block at a time; rtn and the uncalibrated int8 methods one layer at a time): with a lazily loaded model
# the other blocks stay on disk meanwhile
STREAMS_BLOCKS = ("gptq", "awq", "awq+gptq", "rtn", "w8a8", "llm-int8")


def _share_tied_codes(model: nn.Module, names: list[str]) -> None:
    """A tied embedding and head quantized alike (same scheme, rows = vocabulary entries) have equal codes and
    scales: keep one copy, which the head's module then shares (memory; the checkpoint stores it once)."""
    from .models.arch import get_module
    from .nn.qlinear import QuantEmbedding, QuantLinear

    mods = [get_module(model, n) for n in names]
    embs = [m for m in mods if type(m) is QuantEmbedding]
    heads = [m for m in mods if type(m) is QuantLinear]
    for e in embs:
        for h in heads:
            if h.scheme != e.scheme or h.bias is not None:
                continue
            pairs = [(b, getattr(e, b), getattr(h, b)) for b in ("qweight", "scales", "qzeros")]
            if all((x is None and y is None) or (x is not None and y is not None and x.shape == y.shape
                                                  and torch.equal(x, y)) for _, x, y in pairs):
                for b, x, _ in pairs:
                    if x is not None:
                        setattr(h, b, x)


def quantize(model: nn.Module, config: QuantConfig, tokenizer=None, calib_ids: torch.Tensor | None = None) -> nn.Module:
    """Quantize `model` in place with `config.method`; returns the model.

    Calibrated methods (gptq, ...) draw windows of calibration text with the
    tokenizer, or take `calib_ids` [nsamples, seqlen] directly. The float weights
    of the quantized layers are released; what was done is recorded in
    `model.lowbit_quant` and written into checkpoints by `save`.
    """
    if getattr(model, "lowbit_quant", None) and model.lowbit_quant.get("modules"):
        raise LowbitError("model is already quantized")
    from .algorithms.registry import get_method
    from .models.arch import get_module, select_modules, set_module

    handler = get_method(config.method)
    torch.manual_seed(config.seed)
    selected = select_modules(model, config.include, config.exclude, tuple(config.overrides))
    lazy = getattr(model, "lowbit_lazy", None)  # float weights still on disk (models/lazy.py)
    if lazy is not None:
        from .models.arch import find_blocks

        # block-sequential methods read each block when they reach it; the rest needs everything now
        skip = tuple(n + "." for n, _ in find_blocks(model)) if config.method in STREAMS_BLOCKS else ()
        lazy.materialize(model, skip=skip)
    with torch.no_grad():
        modules = handler(model, config, QuantContext(config, tokenizer, calib_ids))
        if lazy is not None:
            lazy.materialize(model)  # what the method released or never reached
            del model.lowbit_lazy
        # Selected layers a calibrated method does not reach (outside the decoder blocks: lm_head,
        # embeddings) are rounded to nearest with their scheme, as GPTQ/AWQ implementations do.
        rest = [n for n in selected if n not in modules and isinstance(get_module(model, n), (nn.Linear, nn.Embedding))]
        if rest:
            from .algorithms.rtn import quantize_module

            for n in rest:
                modules[n] = config.scheme_for(n)
                set_module(model, n, quantize_module(get_module(model, n), modules[n]))
            print(f"lowbit: {config.method}: {', '.join(rest)} outside the decoder blocks: rounded to nearest (rtn)",
                  file=sys.stderr)
    if not modules:
        raise LowbitError("no layer matched: nothing was quantized (check --include/--exclude)")
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
        # A quantized head or embedding no longer shares its weight with the other.
        from .models.arch import ARCHITECTURES

        arch = ARCHITECTURES.get(getattr(cfg, "model_type", ""), None)
        tied = set(arch.embeddings + arch.head) if arch else {"lm_head"}
        if tied & set(modules):
            cfg.tie_word_embeddings = False
            _share_tied_codes(model, [n for n in (arch.embeddings + arch.head if arch else ()) if n in modules])
    model.lowbit_quant = {"config": config, "modules": modules}
    return model


def load(source: str | os.PathLike, dtype: torch.dtype = torch.float32, lean: bool = False, lazy: bool = False):
    """Load any MODEL source -> (model, tokenizer). The model is in eval mode, without gradients.
    lean=True (lowbit checkpoints of the LLaMA family): transformers-free skeleton for the lean decoder, no
    tokenizer (runtime/lean.py). lazy=True (float models in safetensors: GGUF conversions, local folders):
    weights stay on disk until materialized part by part (models/lazy.py). Other sources ignore them."""
    return load_model(source, dtype, lazy=lazy, skeleton=lean_skeleton if lean else None)


def save(model: nn.Module, tokenizer, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a lowbit checkpoint folder atomically."""
    return save_checkpoint(model, tokenizer, out, overwrite=overwrite)


def export(model: nn.Module, tokenizer, out: str | os.PathLike, format: str, dtype: str | None = None,
           overwrite: bool = False, **gguf_options) -> dict:
    """Write `model` in an engine's format: compressed-tensors, gptq, awq or gguf (formats/export.py)."""
    from .formats.export import export_model

    return export_model(model, tokenizer, out, format, dtype=dtype, overwrite=overwrite, **gguf_options)


__all__ = ["QuantConfig", "evaluate", "export", "generate", "load", "quantize", "save"]
