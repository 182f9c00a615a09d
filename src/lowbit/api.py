"""The Python API; the CLI calls exactly these."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch import nn

from .algorithms.registry import CalibOptions, resolve
from .core.config import QuantConfig
from .core.state import QuantRecord, state_of, set_quant
from .errors import LowbitError
from .eval.perplexity import evaluate
from .formats.checkpoint import save_checkpoint
from .formats.load import load_model
from .runtime.generation import generate
from .runtime.lean import lean_skeleton


class QuantContext:
    """What a method may need beyond the model: the tokenizer and calibration windows.

    Calibration settings are the method's typed options (algorithms.registry.CalibOptions: calib, the text
    file, default WikiText-2 valid; nsamples; calib_seqlen); windows are drawn with config.seed, only if the
    method asks, and what was drawn is recorded in the options ("calibration").
    """

    def __init__(self, config: QuantConfig, tokenizer=None, calib_ids: torch.Tensor | None = None) -> None:
        self.config, self.tokenizer, self._ids = config, tokenizer, calib_ids

    def calib_ids(self) -> torch.Tensor:
        if self._ids is None:
            from dataclasses import replace

            from .calibration.data import calibration_ids

            o = self.config.options
            if not isinstance(o, CalibOptions):
                raise LowbitError(f"method {self.config.method!r} has no calibration options")
            if self.tokenizer is None:
                raise LowbitError(f"method {self.config.method!r} needs calibration text: pass the tokenizer")
            self._ids, info = calibration_ids(self.tokenizer, o.calib, nsamples=o.nsamples, seqlen=o.calib_seqlen,
                                              seed=self.config.seed)
            self.config.options = replace(o, calibration=info)
        return self._ids


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


def resolve_device(device: str | torch.device | None) -> str:
    """--device: "cpu", "cuda" (or "cuda:N"), or "auto" (cuda when torch sees a GPU, else cpu)."""
    name = str(device or "cpu")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise LowbitError(f"--device {name}: this torch sees no CUDA GPU (torch {torch.__version__})")
        return name
    raise LowbitError(f"--device {name!r}: choose from cpu, cuda, auto")


def quantize(model: nn.Module, config: QuantConfig, tokenizer=None, calib_ids: torch.Tensor | None = None,
             device: str = "cpu") -> nn.Module:
    """Quantize `model` in place with `config.method`; returns the model.

    The config is checked against its method's spec first, in place (algorithms.registry.resolve): the
    method's default scheme where none is set, the scheme accepted, config.options typed and validated.
    Calibrated methods (gptq, ...) draw windows of calibration text with the
    tokenizer, or take `calib_ids` [nsamples, seqlen] directly. The float weights
    of the quantized layers are released; what was done is recorded in
    `state_of(model).quant` (core/state.py) and written into checkpoints by `save`.
    device: where calibrated methods run their block forwards and math (the model stays on the CPU, each
    block visits the device while it is processed).
    """
    if state_of(model).quant is not None and state_of(model).quant.modules:
        raise LowbitError("model is already quantized")
    from .models.arch import get_module, select_modules, set_module

    spec = resolve(config, preflight=calib_ids is None)
    if spec.needs_calibration(config.options) and calib_ids is None and tokenizer is None:
        raise LowbitError(f"method {spec.name!r} needs calibration text: pass the tokenizer (or calib_ids)")
    torch.manual_seed(config.seed)
    selected = select_modules(model, config.include, config.exclude, tuple(config.overrides))
    lazy = state_of(model).lazy  # float weights still on disk (models/lazy.py)
    if lazy is not None:
        from .models.arch import find_blocks

        # block-sequential methods read each block when they reach it; the rest needs everything now
        skip = tuple(n + "." for n, _ in find_blocks(model)) if spec.streams_blocks else ()
        lazy.materialize(model, skip=skip)
    state_of(model).device = resolve_device(device)
    sink = state_of(model).sink  # a streamed run (quantize_to): finished blocks are on disk only
    with torch.no_grad():
        modules = spec.run(model, config, QuantContext(config, tokenizer, calib_ids))
        if lazy is not None:
            lazy.materialize(model, skip=sink.streamed() if sink is not None else ())  # released or never reached
            state_of(model).lazy = None
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
        from .models.arch import ARCHITECTURES, GENERIC

        arch = ARCHITECTURES.get(getattr(cfg, "model_type", ""), None)
        tied = set(arch.embeddings + arch.head) if arch else set(GENERIC.head)
        if tied & set(modules):
            cfg.tie_word_embeddings = False
            _share_tied_codes(model, [n for n in (arch.embeddings + arch.head if arch else ()) if n in modules])
    set_quant(model, QuantRecord(config, modules))
    return model


def load(source: str | os.PathLike, dtype: torch.dtype | str = torch.float32, lean: bool = False, lazy: bool = False):
    """Load any MODEL source -> (model, tokenizer). The model is in eval mode, without gradients.
    lean=True (lowbit checkpoints of the LLaMA family): transformers-free skeleton for the lean decoder, no
    tokenizer (runtime/lean.py). lazy=True (float models in safetensors: GGUF conversions, local folders):
    weights stay on disk until materialized part by part (models/lazy.py). Other sources ignore them.
    dtype: of the float weights: a torch dtype, "float32", "bfloat16", "float16", or "auto" (as stored)."""
    return load_model(source, dtype, lazy=lazy, skeleton=lean_skeleton if lean else None)


def quantize_to(model: nn.Module, config: QuantConfig, out: str | os.PathLike, tokenizer=None,
                calib_ids: torch.Tensor | None = None, overwrite: bool = False, resume: bool = False,
                device: str = "cpu", single_file_max: int | None = None) -> Path:
    """Quantize a block-streaming method's model (rtn, gptq, awq; best loaded with lazy=True) straight into
    the checkpoint folder `out`: each finished decoder block is written to disk and freed as it is done,
    with the next block's calibration inputs (formats/stream.py), so memory holds one block, not the model,
    and a run that was killed continues with resume=True from its last finished block, to the same bytes
    as an uninterrupted run. Ctrl-C stops it with a note on how to resume. single_file_max: the checkpoint is
    one model.safetensors up to this many bytes (default 1 GiB), else sharded."""
    from .algorithms.registry import resolve as resolve_spec
    from .core.io import check_output
    from .formats.stream import StreamSink, save_streamed

    spec = resolve_spec(config, preflight=calib_ids is None)
    if not spec.streams_output:
        raise LowbitError(f"method {spec.name} does not write block by block: use quantize() and save()")
    from .core import dist

    if dist.world_size() > 1:  # data-parallel calibration: only rank 0 writes
        if resume:
            raise LowbitError("--resume is not supported under torchrun: resume the run in one process")
        if not dist.is_main():
            quantize(model, config, tokenizer=tokenizer, calib_ids=calib_ids, device=device)
            dist.barrier()
            return Path(out)
    check_output(out, overwrite=overwrite)
    st = state_of(model)
    fingerprint = {"config": config.to_dict(), "source": st.source, "blocks": _block_names(model),
                   "dtype": str(next((p.dtype for p in model.parameters() if p.is_floating_point()), None)),
                   "calib_ids": _digest(calib_ids) if calib_ids is not None else None,
                   "lowbit": _version()}
    sink = StreamSink(out, fingerprint, resume=resume, overwrite=overwrite)
    st.sink = sink
    try:
        quantize(model, config, tokenizer=tokenizer, calib_ids=calib_ids, device=device)
        path = save_streamed(model, tokenizer, out, sink, overwrite=overwrite,
                             **({} if single_file_max is None else {"single_file_max": single_file_max}))
    except KeyboardInterrupt:
        print(f"\nlowbit: interrupted after {len(sink.blocks)} finished blocks; the state is in {sink.dir}: run the "
              f"same command with --resume to continue", file=sys.stderr)
        sink.close()
        raise
    except BaseException:
        sink.close()
        raise
    finally:
        st.sink = None
    sink.discard()
    if dist.world_size() > 1:
        dist.barrier()
    return path


def _block_names(model: nn.Module) -> list[str]:
    from .models.arch import find_blocks

    return [n for n, _ in find_blocks(model)]


def _digest(t: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def _version() -> str:
    from .core.version import __version__

    return __version__


def save(model: nn.Module, tokenizer, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a lowbit checkpoint folder atomically."""
    return save_checkpoint(model, tokenizer, out, overwrite=overwrite)


def export(model: nn.Module, tokenizer, out: str | os.PathLike, format: str, dtype: str | None = None,
           overwrite: bool = False, **gguf_options) -> dict:
    """Write `model` in an engine's format: compressed-tensors, gptq, awq or gguf (formats/export.py)."""
    from .formats.export import export_model

    return export_model(model, tokenizer, out, format, dtype=dtype, overwrite=overwrite, **gguf_options)


__all__ = ["QuantConfig", "evaluate", "export", "generate", "load", "quantize", "quantize_to", "resolve_device", "save"]
