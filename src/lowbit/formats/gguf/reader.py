"""What a GGUF file holds: per-tensor types, sizes and bits per weight (read with gguf-py)."""
from __future__ import annotations

import os
from pathlib import Path

from ...errors import LowbitError


def gguf_table(path: str | os.PathLike) -> tuple[list[dict], dict]:
    import gguf

    from .check import read_header

    path = Path(path)
    read_header(path)  # every count, length and offset bounded before gguf-py trusts them
    try:
        r = gguf.GGUFReader(str(path))
    except Exception as e:
        raise LowbitError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    rows = []
    types: dict[str, int] = {}
    n = nbytes = 0
    for t in r.tensors:
        shape = [int(s) for s in reversed(t.shape.tolist())]  # torch order: rows first
        count = int(t.n_elements)
        rows.append({"name": t.name, "type": t.tensor_type.name, "shape": shape, "bytes": int(t.n_bytes),
                     "bpw": 8 * int(t.n_bytes) / max(count, 1)})
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        n += count
        nbytes += int(t.n_bytes)
    ft = r.fields.get("general.file_type")
    ftype = None
    if ft is not None:
        v = int(ft.contents())
        try:
            ftype = gguf.LlamaFileType(v).name.replace("MOSTLY_", "")
        except ValueError:
            ftype = str(v)
    total = {"tensors": len(rows), "types": types, "weights": n, "tensor_bytes": nbytes,
             "bpw": 8 * nbytes / max(n, 1), "file_bytes": path.stat().st_size, "file_type": ftype}
    return rows, total
