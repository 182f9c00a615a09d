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

import contextlib
import ctypes
import sys
import tempfile
import threading
import time
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core import dist
from ..core.memory import release_free_memory
from ..core.scheme import Scheme
from ..core.state import state_of
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
    if len(inputs) > 1:  # one buffer, viewed per sample: later batches of them are views, not copies
        joined = torch.cat(inputs)
        inputs.clear()
        inputs.extend(joined.split(1))
    kw.pop("past_key_values", None)
    kw.pop("past_key_value", None)
    kw["use_cache"] = False
    return inputs, kw


_FORWARD = {"dtype": "float32"}  # the layer_sequential pass under way: its block forwards' matmul dtype


def _forward(x: torch.Tensor):
    """A block forward of the pass: float32 as the model is, or under bf16 autocast (per thread: every thread that
    runs a block enters it)."""
    if _FORWARD["dtype"] == "bfloat16":
        return torch.autocast(x.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _exact(x: torch.Tensor):
    """No autocast (for the statistics and the quantization a hook runs inside a forward: a caller's autocast
    region would otherwise put xᵀx in bf16, and H would not be positive-definite)."""
    return torch.autocast(x.device.type, enabled=False)


BATCH = 8  # samples per block call: bigger matmuls run faster per token on CPU than one sample at a time


def _joined(part: list[torch.Tensor]) -> torch.Tensor:
    """Samples ([1, ...] each) as one [n, ...] tensor: a view when they lie back to back in one buffer (the
    outputs of one block call, split), else a copy."""
    x0 = part[0]
    n = x0.numel()
    if all(x.is_contiguous() and x.shape == x0.shape and x.untyped_storage().data_ptr() == x0.untyped_storage().data_ptr()
           and x.storage_offset() == x0.storage_offset() + k * n for k, x in enumerate(part)):
        return x0.as_strided((len(part), *x0.shape[1:]), (n, *x0.stride()[1:]), x0.storage_offset())
    return torch.cat(part)


def _batches(inputs: list[torch.Tensor], batch: int):
    """The samples ([1, seqlen, hidden] each) joined `batch` at a time: one block call each."""
    for i in range(0, len(inputs), batch):
        yield _joined(inputs[i: i + batch])


@torch.no_grad()
def run_block(block: nn.Module, inputs: list[torch.Tensor], kw: dict, batch: int | None = None) -> list[torch.Tensor]:
    """The block on every sample ([1, seqlen, hidden] each), `batch` samples per call (the kwargs broadcast)."""
    outs = []
    for x in _batches(inputs, batch or BATCH):
        with _forward(x):
            o = block(x, **kw)
        o = o[0] if isinstance(o, (tuple, list)) else o
        outs.extend(o.float().split(1))
    return outs


@torch.no_grad()
def observe_inputs(block: nn.Module, modules: dict[str, nn.Module], inputs: list[torch.Tensor], kw: dict,
                   observe: Callable[[str, torch.Tensor], None], batch: int | None = None) -> None:
    """Run the block over every sample, calling observe(name, x) with each listed module's input.

    Only the inputs are wanted, so each call stops as soon as it has made as many observations as the
    first (whole) call made: GPTQ's statistics pass then skips down_proj's matmul and the residual add."""
    per_call = [0, None]  # observations so far in this call; how many a whole call makes (after the first)

    def pre(mod, args, n):
        with _exact(args[0]):  # statistics in float32 even inside an autocast forward
            observe(n, args[0])  # no_grad: the tensor itself (linears that share it are recognised by identity)
        per_call[0] += 1
        if per_call[0] == per_call[1]:
            raise _Stop

    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: pre(mod, args, n)) for n, m in modules.items()]
    try:
        for x in _batches(inputs, batch or BATCH):
            per_call[0] = 0
            try:
                with _forward(x):
                    block(x, **kw)
            except _Stop:
                pass
            per_call[1] = per_call[1] or per_call[0]
    finally:
        for h in handles:
            h.remove()


PARK_MIN = 1 << 20  # bytes: smaller waiting inputs stay in memory
PARK_BUDGET = 128 << 20  # bytes: waiting inputs that all together take less stay in memory (writing and reading
# them back is pure cost for a small model; parking is for the big ones: 8 x 512 x 14,336 floats at 8B's MLP)


_spill: list = []  # one temporary file per worker, reused by every staged pass: the same pages rewritten


def _spill_file(i: int):
    while len(_spill) <= i:
        _spill.append(tempfile.TemporaryFile(prefix="lowbit-park-"))
    return _spill[i]


def close_spill_files() -> None:
    while _spill:
        _spill.pop().close()


def _bytes_of(st) -> memoryview:
    """A CPU storage's bytes, writable, without marking it shared (numpy() would make it unresizable)."""
    return memoryview((ctypes.c_char * st.nbytes()).from_address(st.data_ptr())).cast("B")


class Irregular(Exception):
    """A block did not call its linears the way the probe saw (data-dependent routing, a mixture of experts):
    it cannot be run staged."""


@torch.no_grad()
def probe_groups(block: nn.Module, modules: dict[str, nn.Module], sample: torch.Tensor, kw: dict
                 ) -> list[list[str]] | None:
    """The listed modules in the order the block calls them on one sample, consecutive ones that read the very
    same tensor grouped ([[q, k, v], [o], [gate, up], [down]] in a LLaMA block); None unless each is called
    exactly once."""
    seen: list[tuple[str, torch.Tensor]] = []
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: seen.append((n, args[0])))
               for n, m in modules.items()]
    try:
        block(sample, **kw)
    finally:
        for h in handles:
            h.remove()
    if sorted(n for n, _ in seen) != sorted(modules):
        return None
    groups: list[tuple[list[str], torch.Tensor]] = []
    for n, x in seen:
        if groups and groups[-1][1] is x:
            groups[-1][0].append(n)
        else:
            groups.append(([n], x))
    return [g for g, _ in groups]


@torch.no_grad()
def run_block_staged(block: nn.Module, modules: dict[str, nn.Module], groups: list[list[str]],
                     inputs: list[torch.Tensor], kw: dict, observe: Callable[[str, torch.Tensor], None],
                     on_group: Callable[[list[str]], None], batch: int | None = None,
                     park_inputs: bool = True,
                     observe_group: Callable[[list[str], torch.Tensor], None] | None = None) -> list[torch.Tensor]:
    """The block's outputs over every sample in one pass that quantizes its linears group by group on the way
    (true-sequential order: each group's statistics come from inputs computed with the groups before it
    already quantized).

    Each batch of samples runs in its own worker thread; the workers take turns in batch order, so one runs
    at a time and the order of every floating-point sum is fixed. At the first module of a group, a worker
    passes the group's input to observe(name, x) for every module of the group (or to observe_group(names, x)
    once, when given), then hands the turn on; the
    last worker then calls on_group(names), which must make those modules compute with their quantized
    weights, and the turn goes back to the first. The same result as a statistics pass per group followed by
    an output pass, for one forward per sample. Raises Irregular (nothing half-done by this function) when a
    batch calls the groups in another order than `groups`."""
    xs = list(_batches(inputs, batch or BATCH))
    nb = len(xs)
    heads = {g[0]: g for g in groups}
    order = [g[0] for g in groups]
    cv = threading.Condition()
    state: dict = {"turn": 0, "error": None}
    pos = [0] * nb
    outs: list[torch.Tensor | None] = [None] * nb
    local = threading.local()

    def wait_turn(i: int) -> None:  # with cv held
        while state["turn"] != i and state["error"] is None:
            cv.wait()
        if state["error"] is not None:
            raise _Stop  # another worker failed: unwind this one

    def hand_on(i: int) -> None:
        with cv:
            state["turn"] = (i + 1) % nb
            cv.notify_all()

    def pre(mod, args, name):
        i = local.i
        if state["error"] is not None:  # another worker failed, or Ctrl-C: stop here
            raise _Stop
        if pos[i] >= len(order) or order[pos[i]] != name:
            raise Irregular(f"{name} called out of order")
        pos[i] += 1
        x = args[0]
        with _exact(x):  # statistics and the quantization in float32 even inside an autocast forward
            if observe_group is not None:
                observe_group(heads[name], x)
            else:
                for n in heads[name]:
                    observe(n, x)
            if i == nb - 1:
                on_group(heads[name])
        parked = park(i, x) if i != nb - 1 else None  # the last worker goes on at once
        hand_on(i)
        with cv:
            wait_turn(i)
        if parked is not None:
            unpark(i, x, parked)

    def park(i: int, x: torch.Tensor):
        """Move a waiting worker's input to its temporary file and free its memory (the storage stays, empty,
        as FSDP frees parameters). Only a tensor that is its storage's only user: the worker's own activation,
        not a batch view of the shared inputs."""
        st = x.untyped_storage()
        if not park_inputs or x.device.type != "cpu" or st.nbytes() != x.numel() * x.element_size() \
                or st.nbytes() < PARK_MIN or st.nbytes() * (nb - 1) < PARK_BUDGET:
            return None
        f = _spill_file(i)
        f.seek(0)
        f.write(_bytes_of(st))
        n = st.nbytes()
        st.resize_(0)
        return n

    def unpark(i: int, x: torch.Tensor, n: int) -> None:
        st = x.untyped_storage()
        st.resize_(n)
        f = _spill_file(i)
        f.seek(0)
        view, got = _bytes_of(st), 0
        while got < n:
            got += f.readinto(view[got:])

    def work(i: int) -> None:
        local.i = i
        try:
            with torch.no_grad():  # grad mode is per thread
                with cv:
                    wait_turn(i)
                with _forward(xs[i]):
                    o = block(xs[i], **kw)
                o = o[0] if isinstance(o, (tuple, list)) else o
                o = o.float()  # (bf16 autocast: the residual stream is float32 already; a no-op then)
                if pos[i] != len(order):
                    raise Irregular("a batch skipped a group")
                outs[i] = o
            hand_on(i)
        except BaseException as e:  # noqa: BLE001 -- handed to the caller's thread
            with cv:
                if state["error"] is None:
                    state["error"] = e
                cv.notify_all()

    handles = [modules[h].register_forward_pre_hook(lambda mod, args, n=h: pre(mod, args, n)) for h in order]
    threads = [threading.Thread(target=work, args=(i,), daemon=True, name=f"lowbit-batch-{i}") for i in range(nb)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.2)
    except BaseException as e:  # Ctrl-C: stop the workers at their next module
        with cv:
            state["error"] = state["error"] or e
            cv.notify_all()
        for t in threads:
            t.join()
        raise
    finally:
        for h in handles:
            h.remove()
    if state["error"] is not None:
        raise state["error"]
    return [s for o in outs for s in o.split(1)]


# process_block(name, block, inputs, kw) -> {linear: scheme}, or ({linear: scheme}, the block's outputs)
BlockFn = Callable[[str, nn.Module, list[torch.Tensor], dict], "dict[str, Scheme] | tuple[dict, list]"]


def layer_sequential(model: nn.Module, ids: torch.Tensor, process_block: BlockFn, desc: str = "calibrate",
                     forward_dtype: str = "float32") -> dict[str, Scheme]:
    """Drive `process_block` over the decoder blocks in order; returns everything it quantized.

    state_of(model).device: where the blocks and their inputs compute (each block moved there when reached,
    back to the CPU when done). state_of(model).sink (a streamed run, formats/stream.py): each finished block
    and the next block's inputs go to disk; a resumed run skips the blocks the sink has and starts from the
    inputs it saved. forward_dtype "bfloat16": the block forwards' matmuls under bf16 autocast (the statistics
    and the quantization in the hooks stay float32)."""
    blocks = find_blocks(model)
    st = state_of(model)
    lazy, sink, dev = st.lazy, st.sink, torch.device(st.device)
    t0 = time.time()
    start, done, saved = sink.resume_point() if sink is not None else (0, {}, None)
    ids = ids[dist.shard(ids.shape[0], BATCH)]  # data-parallel (torchrun): this rank's share, in whole batches
    done = dict(done)
    if start >= len(blocks):
        inputs, kw = [], {}
    else:
        inputs, kw = capture_block_inputs(model, blocks[0][1], ids[:1] if saved is not None else ids)
        if saved is not None:  # resumed: the next block's inputs as the killed run saved them
            inputs = saved
        kw = {k: _to(v, dev) for k, v in kw.items()}
        inputs = [x.to(dev, COMPUTE_DTYPE) for x in inputs]
    if lazy is not None:  # embeddings and head are not needed again until the end: back to disk
        lazy.release(model, skip=tuple(n + "." for n, _ in blocks))
    bar = tqdm(blocks[start:], desc=desc, unit="block", file=sys.stderr, leave=False, initial=0)
    if forward_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"forward_dtype {forward_dtype!r}")
    before, _FORWARD["dtype"] = _FORWARD["dtype"], forward_dtype  # (one pass at a time per process)
    try:
        for i, (name, block) in enumerate(bar, start=start):
            if lazy is not None:
                lazy.materialize(model, name + ".")
            stored = _upcast(block, dev)
            r = process_block(name, block, inputs, kw)
            quantized, outputs = r if isinstance(r, tuple) else (r, None)  # a staged block computed its outputs
            done.update(quantized)
            last = i == len(blocks) - 1
            if outputs is None and not last:
                with dequantized_weights(block):  # the quantized block's outputs: its weights dequantized once
                    outputs = run_block(block, inputs, kw)
            inputs = outputs
            _restore(block, stored)
            if sink is not None:
                sink.finish_block(i, name, block, quantized, None if last else inputs)
            release_free_memory()
    finally:
        _FORWARD["dtype"] = before
        close_spill_files()
    print(f"lowbit: {desc}: {len(blocks) - start} blocks in {time.time() - t0:.1f}s", file=sys.stderr)
    return done


# Calibration forwards run in float32 whatever the stored dtype (bench/dtype_compute.py: on an AVX2 CPU a
# bf16 block forward is ~6x slower than float32, and its outputs differ by ~2e-3 relative).
COMPUTE_DTYPE = torch.float32


def _upcast(block: nn.Module, dev: torch.device) -> dict[str, tuple[torch.dtype, torch.device]]:
    """The block's float tensors to COMPUTE_DTYPE on `dev`, in place; returns what they were, by name."""
    stored = {}
    for mname, mod in block.named_modules():
        for table in (mod._parameters, mod._buffers):
            for k, t in table.items():
                if t is None or t.is_meta or (t.device == dev and (t.dtype == COMPUTE_DTYPE or not t.is_floating_point())):
                    continue
                stored[f"{mname}.{k}"] = (t.dtype, t.device)
                new = t.to(dev, COMPUTE_DTYPE if t.is_floating_point() else t.dtype)
                table[k] = nn.Parameter(new, requires_grad=False) if isinstance(t, nn.Parameter) else new
    return stored


def _restore(block: nn.Module, stored: dict) -> None:
    """Tensors _upcast changed that are still there (norms: not the replaced linears) back to their dtype and
    device; the quantized modules' new tensors go to the CPU as they are."""
    for mname, mod in block.named_modules():
        for table in (mod._parameters, mod._buffers):
            for k, t in table.items():
                if t is None or t.is_meta:
                    continue
                dt, dv = stored.get(f"{mname}.{k}", (t.dtype, torch.device("cpu")))
                if (t.dtype, t.device) != (dt, dv):
                    new = t.to(dv, dt)
                    table[k] = nn.Parameter(new, requires_grad=False) if isinstance(t, nn.Parameter) else new


def _to(v, dev: torch.device):
    if isinstance(v, torch.Tensor):
        return v.to(dev, COMPUTE_DTYPE) if v.is_floating_point() else v.to(dev)
    if isinstance(v, tuple):
        return tuple(_to(x, dev) for x in v)
    return v
