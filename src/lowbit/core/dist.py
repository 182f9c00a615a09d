"""Data-parallel calibration over torch.distributed (`torchrun --nproc-per-node N -m lowbit quantize ...`).

Every rank holds the whole (lazily loaded) model and runs the same blocks in the same order; the calibration
windows are split between the ranks (contiguous shares of whole calibration batches), each rank gathers
statistics over its share, and the statistics are combined across the ranks before any decision is made from
them, so every rank takes the same decisions from the same numbers. GPTQ's Hessians are combined exactly as
one process adds them: every batch's xᵀx is replayed into the running mean in the global batch order
(core/gptq.Hessian.replay), so the result has the bits of a one-process run when there are at least as many
calibration batches as ranks and every process runs with the same number of threads (torch's CPU matmuls
split their sums by thread); AWQ's mean |x| sums are all-reduced (float64). Only rank 0 writes.
gloo on the CPU, NCCL on CUDA. Nothing here does anything in a single process.
"""
from __future__ import annotations

import os

import torch


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def world_size() -> int:
    d = _dist()
    return d.get_world_size() if d else 1


def rank() -> int:
    d = _dist()
    return d.get_rank() if d else 0


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """Started by torchrun (or another launcher setting WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(device: str) -> None:
    """Join the process group torchrun describes (env://): NCCL for CUDA, gloo otherwise. Each rank of a CUDA run
    takes the GPU of its LOCAL_RANK."""
    import torch.distributed as dist

    if not launched() or dist.is_initialized():
        return
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)


def shard(n: int, unit: int = 1) -> slice:
    """This rank's contiguous share of n calibration samples, in whole units of `unit` samples (the calibration
    batch) when there are at least as many units as ranks: every rank then runs the very batches one process
    would (the last rank takes the remainder), so statistics gathered per batch are the same bits. Otherwise
    (or unit 1) the first n % world ranks take one sample more, and the batches differ from one process's."""
    w, r = world_size(), rank()
    if unit > 1 and -(-n // unit) >= w:
        units = -(-n // unit)
        base, extra = divmod(units, w)
        start = (r * base + min(r, extra)) * unit
        return slice(min(start, n), min(start + (base + (1 if r < extra else 0)) * unit, n))
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return slice(start, start + base + (1 if r < extra else 0))


def gather_int(n: int, device=None) -> list[int]:
    """n of every rank, in rank order ([n] in one process)."""
    d = _dist()
    if d is None or d.get_world_size() == 1:
        return [n]
    t = torch.tensor([n], dtype=torch.int64, device=device)
    out = [torch.zeros_like(t) for _ in range(d.get_world_size())]
    d.all_gather(out, t)
    return [int(x.item()) for x in out]


def broadcast_(t: torch.Tensor, src: int) -> torch.Tensor:
    """t of rank `src`, into t on every rank (in place; no-op in one process)."""
    d = _dist()
    if d is not None and d.get_world_size() > 1:
        d.broadcast(t, src=src)
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """t summed over the ranks, in place (no-op in one process)."""
    d = _dist()
    if d is not None and d.get_world_size() > 1:
        d.all_reduce(t, op=d.ReduceOp.SUM)
    return t


def all_reduce_count(n: int, device=None) -> int:
    d = _dist()
    if d is None or d.get_world_size() == 1:
        return n
    t = torch.tensor([n], dtype=torch.float64, device=device)
    d.all_reduce(t, op=d.ReduceOp.SUM)
    return int(t.item())


def barrier() -> None:
    d = _dist()
    if d is not None and d.get_world_size() > 1:
        d.barrier()
