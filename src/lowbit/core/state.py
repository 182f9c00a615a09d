"""What lowbit knows about a model, kept beside the model instead of as attributes patched onto it.

    state_of(model).quant    QuantRecord: the config and the per-module schemes of what quantize did (set by
                             api.quantize, QAT's convert and checkpoint loading; read by checkpoint saving,
                             the CLI, a second quantize)
    state_of(model).lazy     the reader of weights still on disk (models/lazy.LazyWeights), while there are some
    state_of(model).sink     where finished decoder blocks go while a streamed quantization runs
    state_of(model).device   where calibration forwards and the methods' math run
    state_of(model).source   the MODEL source it was loaded from (models/loading.resolve reads it again:
                             the GGUF exporter copies a source .gguf's tokenizer)

The states live in a weak-keyed table: one per model object, gone with the model. A copy of a model
(copy.deepcopy) is another object and starts with an empty state.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Protocol

from .config import QuantConfig
from .scheme import Scheme


@dataclass
class QuantRecord:
    """What quantize did: the config (None for a checkpoint saved without quantization) and the scheme of
    every module it replaced, by full module name."""

    config: QuantConfig | None
    modules: dict[str, Scheme] = field(default_factory=dict)


class LazyWeights(Protocol):
    """Float weights read from disk part by part (models/lazy.py)."""

    def materialize(self, model, prefix: str = "", skip: tuple[str, ...] = ()) -> None: ...

    def release(self, model, skip: tuple[str, ...] = ()) -> None: ...


class BlockSink(Protocol):
    """Where a block-streaming quantization puts each finished decoder block (formats/stream.py): its packed
    tensors on disk, the next block's inputs with them (resume), the block's memory freed."""

    def resume_point(self) -> tuple[int, dict[str, Scheme], list | None]:
        """(blocks already finished, their modules' schemes, the saved inputs of the next block or None)."""
        ...

    def finish_block(self, index: int, name: str, block, schemes: dict[str, Scheme], next_inputs) -> None: ...

    def streamed(self) -> tuple[str, ...]:
        """Prefixes ("model.layers.3.") of the blocks now on disk only."""
        ...


@dataclass
class ModelState:
    quant: QuantRecord | None = None
    lazy: LazyWeights | None = None
    source: str | None = None
    sink: BlockSink | None = None  # set while a streamed quantization runs (api.quantize_to)
    device: str = "cpu"  # where calibrated methods compute (api.quantize(device=...))


_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _refuse_save_pretrained(*args, **kwargs):
    from ..errors import LowbitError

    raise LowbitError("this model holds lowbit's packed layers, which save_pretrained would write as a folder "
                      "transformers loads with random weights: save it with lowbit.save(model, tokenizer, OUT), "
                      "or export it for an engine with lowbit.api.export / `lowbit export`")


def set_quant(model, record: QuantRecord) -> None:
    """Record what quantize did (or what a checkpoint holds) and make the model's transformers
    `save_pretrained` refuse it with one line: its quantized layers must not silently become random weights."""
    state_of(model).quant = record
    if callable(getattr(model, "save_pretrained", None)):
        model.save_pretrained = _refuse_save_pretrained


def state_of(model) -> ModelState:
    """The model's state (an empty one on first use)."""
    st = _STATES.get(model)
    if st is None:
        st = _STATES[model] = ModelState()
    return st
