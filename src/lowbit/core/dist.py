"""Data-parallel calibration over torch.distributed (`torchrun --nproc-per-node N -m lowbit quantize ...`).

Every rank holds the whole (lazily loaded) model and runs the same blocks in the same order; the calibration
windows are split between the ranks (contiguous shares), each rank gathers statistics (Hessians, AWQ's mean
|x|) over its share, and the statistics are summed across the ranks (all_reduce) before any decision is made
from them, so every rank takes the same decisions from the same numbers. Only rank 0 writes.
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


def shard(n: int) -> slice:
    """This rank's contiguous share of n calibration samples (the first n % world ranks take one more)."""
    w, r = world_size(), rank()
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return slice(start, start + base + (1 if r < extra else 0))


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
