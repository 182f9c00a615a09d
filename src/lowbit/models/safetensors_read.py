"""Read chosen tensors of a .safetensors file with plain reads, into fresh tensors.

safetensors' own reader maps the file: every page a copy touches is then resident (as file pages) until
the mapping closes, so reading an embedding costs twice its size at its peak. Reading straight into the
destination costs the tensor only. The format: an 8-byte little-endian header length, a JSON header
{name: {"dtype", "shape", "data_offsets": [begin, end]}} (offsets from the end of the header), the data.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Iterable, Iterator

import torch

from ..errors import LowbitError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


def read_header(f, label: str) -> tuple[dict, int]:
    """(header without __metadata__, offset of the data)."""
    raw = f.read(8)
    if len(raw) != 8:
        raise LowbitError(f"{label}: not a safetensors file (shorter than its header length)")
    (n,) = struct.unpack("<Q", raw)
    try:
        header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError):
        raise LowbitError(f"{label}: not a safetensors file (unreadable header)") from None
    header.pop("__metadata__", None)
    return header, 8 + n


def read_tensors(path: str | os.PathLike, keys: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) for each key, in file order, each in its stored dtype and shape."""
    label = str(path)
    with open(path, "rb", buffering=0) as f:
        header, base = read_header(f, label)
        wanted = sorted(keys, key=lambda k: header[k]["data_offsets"][0] if k in header else -1)
        for k in wanted:
            if k not in header:
                raise LowbitError(f"{label}: no tensor {k}")
            e = header[k]
            if e["dtype"] not in DTYPES:
                raise LowbitError(f"{label}: {k}: unsupported dtype {e['dtype']}")
            begin, end = e["data_offsets"]
            t = torch.empty(e["shape"], dtype=DTYPES[e["dtype"]])
            if t.numel() * t.element_size() != end - begin:
                raise LowbitError(f"{label}: {k}: {end - begin} bytes stored for shape {e['shape']} {e['dtype']}")
            f.seek(base + begin)
            view = memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
            got = 0
            while got < len(view):
                n = f.readinto(view[got:])
                if not n:
                    raise LowbitError(f"{label}: {k}: file ends inside the tensor")
                got += n
            yield k, t
