"""Process memory policy for the long jobs (glibc and torch's CPU allocator; no-ops elsewhere).

Calibrated quantization allocates and frees block-sized buffers (activations, xᵀx, GPTQ's work arrays)
thousands of times. Two things keep that both fast and small here:

- torch's CPU allocator asks for transparent huge pages on buffers of 2 MB and more
  (THP_MEM_ALLOC_ENABLE, read by torch at its first large allocation): one page fault per 2 MB instead of
  512 when a fresh buffer is touched.
- glibc serves allocations of 1 MiB and more with mmap, so that freeing them returns the memory: its
  default threshold adapts upwards to the buffers a program frees, after which block-sized temporaries come
  from the heap and stay there (a higher peak for GPTQ on SmolLM2). What the heap still holds goes back
  after every decoder block (malloc_trim).
"""
from __future__ import annotations

import ctypes
import os
import sys

_libc = None


def _glibc():
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else False
            _libc.malloc_trim  # noqa: B018 -- musl has none
        except (OSError, AttributeError):
            _libc = False
    return _libc


MMAP_THRESHOLD = 1 << 20


def configure_process() -> None:
    """For the command line, before any large allocation: huge pages for torch's large buffers, and glibc's
    mmap threshold fixed at 1 MiB (which also stops its adapting)."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    libc = _glibc()
    if libc:
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD
        libc.mallopt(-8, 1)  # M_ARENA_MAX: one heap for every thread (the staged pass's workers take turns)


def release_free_memory() -> None:
    """Give the heap's free memory back to the system (between decoder blocks)."""
    libc = _glibc()
    if libc:
        libc.malloc_trim(0)
