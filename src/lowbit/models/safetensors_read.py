"""Read chosen tensors of a .safetensors file with plain reads, into fresh tensors.

safetensors' own reader maps the file: every page a copy touches is then resident (as file pages) until
the mapping closes, so reading an embedding costs twice its size at its peak. Reading straight into the
destination costs the tensor only. The format: an 8-byte little-endian header length, a JSON header
{name: {"dtype", "shape", "data_offsets": [begin, end]}} (offsets from the end of the header), the data.
"""
from __future__ import annotations

import json
import math
import os
import struct
from typing import Iterable, Iterator

import torch

from ..errors import LowbitError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
# every dtype the format defines (a header may name ones this reader does not read: checked all the same)
ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
              "U64": 8, "U32": 4, "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "C64": 8}
MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own limit


def read_header(f, label: str) -> tuple[dict, int]:
    """(header without __metadata__, offset of the data). Every entry is checked against the file before
    anything is allocated: a known dtype, a shape of non-negative integers, data offsets inside the file whose
    length is the dtype's size times the shape's element count."""
    raw = f.read(8)
    if len(raw) != 8:
        raise LowbitError(f"{label}: not a safetensors file (shorter than its header length)")
    (n,) = struct.unpack("<Q", raw)
    size = os.fstat(f.fileno()).st_size
    if n > min(MAX_HEADER_BYTES, size - 8):
        raise LowbitError(f"{label}: not a safetensors file (header of {n} bytes in a file of {size})")
    try:
        header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise LowbitError(f"{label}: not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise LowbitError(f"{label}: not a safetensors file (header is not a JSON object)")
    header.pop("__metadata__", None)
    data = size - 8 - n
    for k, e in header.items():
        _check_entry(label, k, e, data)
    return header, 8 + n


def _check_entry(label: str, k: str, e, data: int) -> None:
    if not isinstance(e, dict):
        raise LowbitError(f"{label}: {k}: not a tensor entry")
    dtype, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
    if dtype not in ITEM_BYTES:
        raise LowbitError(f"{label}: {k}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or len(shape) > 8 or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 48 for d in shape):
        raise LowbitError(f"{label}: {k}: bad shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(
            isinstance(o, int) and not isinstance(o, bool) for o in offsets) and 0 <= offsets[0] <= offsets[1]):
        raise LowbitError(f"{label}: {k}: bad data offsets {offsets!r}")
    if offsets[1] > data:
        raise LowbitError(f"{label}: {k}: file ends inside the tensor (its data offsets {offsets} pass the "
                          f"file's {data} data bytes)")
    numel = math.prod(shape)
    if numel * ITEM_BYTES[dtype] != offsets[1] - offsets[0]:
        raise LowbitError(f"{label}: {k}: {offsets[1] - offsets[0]} bytes stored for shape {shape} {dtype}")


def read_tensors(path: str | os.PathLike, keys: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) for each key, in file order, each in its stored dtype and shape."""
    label = str(path)
    with open(path, "rb", buffering=0) as f:
        header, base = read_header(f, label)
        wanted = sorted(keys, key=lambda k: header[k]["data_offsets"][0] if k in header else -1)
        for k in wanted:
            if k not in header:
                raise LowbitError(f"{label}: no tensor {k}")
            e = header[k]  # checked by read_header: offsets inside the file, bytes = dtype size x shape
            if e["dtype"] not in DTYPES:
                raise LowbitError(f"{label}: {k}: unsupported dtype {e['dtype']}")
            begin, end = e["data_offsets"]
            t = torch.empty(e["shape"], dtype=DTYPES[e["dtype"]])
            f.seek(base + begin)
            view = memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
            got = 0
            while got < len(view):
                n = f.readinto(view[got:])
                if not n:
                    raise LowbitError(f"{label}: {k}: file ends inside the tensor")
                got += n
            yield k, t
