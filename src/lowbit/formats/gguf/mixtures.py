"""Per-tensor types of llama.cpp's file types ("mixtures" such as Q4_K_M), as its quantizer picks them.

Follows llama-quant.cpp (llama_tensor_get_type_impl and tensor_type_fallback) for the LLaMA family:
a base type per file type; attn_v / ffn_down / attn_output raised in some mixtures, in the layers that
``use_more_bits`` picks (the first and last eighth, and every third layer in between); the output
matrix (or the token embedding when it is tied to the output) to Q6_K, or Q8_0 when its rows do not
split into 256-weight super-blocks; and a fallback type for rows that a 256-weight type cannot hold
(Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0; F16 when even that does not fit).
1-D tensors (norms) stay F32.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gguf import LlamaFileType as FT

from .blocks import TYPES, get_type

# file type name -> (base tensor type, general.file_type value)
FILE_TYPES: dict[str, tuple[str, int]] = {
    "F32": ("F32", FT.ALL_F32), "F16": ("F16", FT.MOSTLY_F16), "BF16": ("BF16", FT.MOSTLY_BF16),
    "Q8_0": ("Q8_0", FT.MOSTLY_Q8_0), "Q4_0": ("Q4_0", FT.MOSTLY_Q4_0), "Q4_1": ("Q4_1", FT.MOSTLY_Q4_1),
    "Q5_0": ("Q5_0", FT.MOSTLY_Q5_0), "Q5_1": ("Q5_1", FT.MOSTLY_Q5_1),
    "Q2_K": ("Q2_K", FT.MOSTLY_Q2_K),
    "Q3_K_S": ("Q3_K", FT.MOSTLY_Q3_K_S), "Q3_K_M": ("Q3_K", FT.MOSTLY_Q3_K_M), "Q3_K_L": ("Q3_K", FT.MOSTLY_Q3_K_L),
    "Q4_K_S": ("Q4_K", FT.MOSTLY_Q4_K_S), "Q4_K_M": ("Q4_K", FT.MOSTLY_Q4_K_M),
    "Q5_K_S": ("Q5_K", FT.MOSTLY_Q5_K_S), "Q5_K_M": ("Q5_K", FT.MOSTLY_Q5_K_M),
    "Q6_K": ("Q6_K", FT.MOSTLY_Q6_K),
}
# a bare K type names its default mixture, as llama-quantize's "Q4_K" means Q4_K_M
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
FLOAT = {"F32", "F16", "BF16"}


def file_type(name: str) -> str:
    key = ALIASES.get(name.upper(), name.upper())
    if key not in FILE_TYPES:
        raise ValueError(f"unknown GGUF type {name!r} (known: {', '.join([*FILE_TYPES, *ALIASES])})")
    return key


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


@dataclass
class TensorInfo:
    name: str  # GGUF name, e.g. blk.3.attn_v.weight
    shape: tuple[int, ...]  # torch order: (rows, cols); cols = ggml's ne[0]


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    m = re.match(r"blk\.\d+\.(\w+)\.weight$", name)
    return m.group(1) if m else "other"


def _layer(name: str) -> int:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def _mixture_rule(ftype: str, t: str, cat: str, i: int, n_layers: int, n_gqa: int, tied: bool, cols: int,
                  imatrix: bool) -> str:
    if cat == "output" or (tied and cat == "token_embd"):
        if cols % get_type(t).block_size != 0:
            return "Q8_0"
        return t if t == "Q8_0" else "Q6_K"
    if cat == "attn_v":
        if ftype == "Q2_K":
            return "Q4_K" if n_gqa >= 4 else "Q3_K"
        if ftype == "Q3_K_M":
            return "Q5_K" if i < 2 else "Q4_K"
        if ftype == "Q3_K_L":
            return "Q5_K"
        if ftype in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n_layers):
            return "Q6_K"
        if ftype == "Q4_K_S" and i < 4:
            return "Q5_K"
        return t
    if cat == "ffn_down":
        if ftype == "Q2_K":
            return "Q3_K"
        if ftype == "Q3_K_M":
            return "Q5_K" if i < n_layers // 16 else "Q4_K"
        if ftype == "Q3_K_L":
            return "Q5_K"
        if ftype == "Q4_K_M":
            return "Q6_K" if use_more_bits(i, n_layers) else t
        if ftype == "Q5_K_M" and use_more_bits(i, n_layers):
            return "Q6_K"
        if ftype == "Q4_K_S" and i < n_layers // 8:
            return "Q5_K"
        if ftype in ("Q4_0", "Q5_0") and imatrix and i < n_layers // 8:
            return "Q4_1" if ftype == "Q4_0" else "Q5_1"
        return t
    if cat == "attn_output":
        return {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(ftype, t)
    if cat == "attn_qkv":
        return {"Q3_K_M": "Q4_K", "Q3_K_L": "Q4_K", "Q4_K_M": "Q5_K", "Q5_K_M": "Q6_K"}.get(ftype, t)
    return t


def fallback(t: str, cols: int) -> str:
    if cols % get_type(t).block_size == 0:
        return t
    t2 = FALLBACK.get(t, t)
    return t2 if cols % get_type(t2).block_size == 0 else "F16"


def choose_types(tensors: list[TensorInfo], ftype: str, n_layers: int, n_gqa: int,
                 overrides: list[tuple[str, str]] = (), imatrix: bool = False) -> dict[str, str]:
    """GGUF tensor name -> tensor type name, for one file type (``imatrix``: calibrated, as llama.cpp with one)."""
    ftype = file_type(ftype)
    base = FILE_TYPES[ftype][0]
    names = {t.name for t in tensors}
    tied = "output.weight" not in names
    pats = [(re.compile(p), get_type(v).name) for p, v in overrides]
    out: dict[str, str] = {}
    for t in tensors:
        if len(t.shape) < 2:
            out[t.name] = "F32"
            continue
        cols = t.shape[-1]
        chosen = next((v for p, v in pats if p.search(t.name)), None)  # an override wins, for F16/F32 files too
        if chosen is None and base in FLOAT:
            chosen = base
        if chosen is None:
            chosen = _mixture_rule(ftype, base, _category(t.name), _layer(t.name), n_layers, n_gqa, tied, cols,
                                   imatrix)
        out[t.name] = fallback(chosen, cols) if chosen not in FLOAT else chosen
    return out


def bits_per_weight(types: dict[str, str], shapes: dict[str, tuple[int, ...]]) -> float:
    bits = n = 0
    for name, t in types.items():
        shp = shapes[name]
        rows = 1
        for s in shp[:-1]:
            rows *= s
        bits += 8 * rows * TYPES[t].row_bytes(shp[-1])
        n += rows * shp[-1]
    return bits / n
