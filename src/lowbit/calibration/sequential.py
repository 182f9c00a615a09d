"""Layer-sequential calibration: one decoder block at a time.

    inputs of block 0  <- captured once (the model runs up to block 0 and stops)
    for each block:
        process_block(block, inputs)   hooks its linears, gathers statistics, quantizes
        inputs <- block(inputs)         recomputed with the *quantized* weights
Memory: the model plus one block's activations (inputs and outputs of
nsamples x seqlen x hidden), nothing more; with a lazily loaded model
(models/lazy.py) only the parts outside the blocks plus the current block. Architecture-agnostic: blocks come
from models.arch (name patterns, with a fallback).
"""
from __future__ import annotations

import sys
import time
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.scheme import Scheme
from ..models.arch import find_blocks
from ..nn.qlinear import dequantized_weights


class _Stop(Exception):
    pass


@torch.no_grad()
def capture_block_inputs(model: nn.Module, first_block: nn.Module, ids: torch.Tensor) -> tuple[list[torch.Tensor], dict]:
    """Hidden states entering the first block, one tensor per sample, and the block's other kwargs."""
    inputs: list[torch.Tensor] = []
    kw: dict = {}

    def pre(mod, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        inputs.append(h.detach())
        if not kw:
            kw.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Stop

    handle = first_block.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        for i in range(ids.shape[0]):
            try:
                model(ids[i: i + 1], use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    kw.pop("past_key_values", None)
    kw.pop("past_key_value", None)
    kw["use_cache"] = False
    return inputs, kw


BATCH = 8  # samples per block call: bigger matmuls run ~1.5x faster per token on CPU than one at a time


def _batches(inputs: list[torch.Tensor], batch: int):
    """The samples ([1, seqlen, hidden] each) joined `batch` at a time: one block call each."""
    for i in range(0, len(inputs), batch):
        yield torch.cat(inputs[i: i + batch])


@torch.no_grad()
def run_block(block: nn.Module, inputs: list[torch.Tensor], kw: dict, batch: int = BATCH) -> list[torch.Tensor]:
    """The block on every sample ([1, seqlen, hidden] each), `batch` samples per call (the kwargs broadcast)."""
    outs = []
    for x in _batches(inputs, batch):
        o = block(x, **kw)
        o = o[0] if isinstance(o, (tuple, list)) else o
        outs.extend(o.split(1))
    return outs


@torch.no_grad()
def observe_inputs(block: nn.Module, modules: dict[str, nn.Module], inputs: list[torch.Tensor], kw: dict,
                   observe: Callable[[str, torch.Tensor], None], batch: int = BATCH) -> None:
    """Run the block over every sample, calling observe(name, x) with each listed module's input.

    Only the inputs are wanted, so each call stops as soon as it has made as many observations as the
    first (whole) call made: GPTQ's statistics pass then skips down_proj's matmul and the residual add."""
    per_call = [0, None]  # observations so far in this call; how many a whole call makes (after the first)

    def pre(mod, args, n):
        observe(n, args[0])  # no_grad: the tensor itself (linears that share it are recognised by identity)
        per_call[0] += 1
        if per_call[0] == per_call[1]:
            raise _Stop

    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: pre(mod, args, n)) for n, m in modules.items()]
    try:
        for x in _batches(inputs, batch):
            per_call[0] = 0
            try:
                block(x, **kw)
            except _Stop:
                pass
            per_call[1] = per_call[1] or per_call[0]
    finally:
        for h in handles:
            h.remove()


BlockFn = Callable[[str, nn.Module, list[torch.Tensor], dict], dict[str, Scheme]]


def layer_sequential(model: nn.Module, ids: torch.Tensor, process_block: BlockFn, desc: str = "calibrate") -> dict[str, Scheme]:
    """Drive `process_block` over the decoder blocks in order; returns everything it quantized."""
    blocks = find_blocks(model)
    lazy = getattr(model, "lowbit_lazy", None)  # a lazily loaded model: read each float block when reached
    t0 = time.time()
    inputs, kw = capture_block_inputs(model, blocks[0][1], ids)
    if lazy is not None:  # embeddings and head are not needed again until the end: back to disk
        lazy.release(model, skip=tuple(n + "." for n, _ in blocks))
    done: dict[str, Scheme] = {}
    bar = tqdm(blocks, desc=desc, unit="block", file=sys.stderr, leave=False)
    for name, block in bar:
        if lazy is not None:
            lazy.materialize(model, name + ".")
        done.update(process_block(name, block, inputs, kw))
        with dequantized_weights(block):  # the quantized block's outputs: dequantize its weights once, not per batch
            inputs = run_block(block, inputs, kw)
    print(f"lowbit: {desc}: {len(blocks)} blocks in {time.time() - t0:.1f}s", file=sys.stderr)
    return done
