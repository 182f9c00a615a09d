"""A bounded reading of a GGUF file's header, before gguf-py or transformers see the file.

gguf-py trusts every count and length in the file: a tensor or metadata count of 10^12, an array length, a
string length, a block_count of 10^6 make it (or transformers, which builds the model from the metadata)
allocate and loop for as long as the numbers say. Here every count and length is checked against what is
left of the file and against the limits below BEFORE it is used, nested arrays are bounded, every tensor's
data must lie inside the file without overlapping another's, and (read_model) a model must have tensors
that match its metadata: block_count against the blk.N tensors present, the embedding's shape against the
vocabulary and embedding_length, attention and feed-forward widths against their tensors.

The header is read with plain reads (no mmap: a file truncated meanwhile gives an error, not SIGBUS).
"""
from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass, field

from ...errors import LowbitError

# limits (generous: the largest public models are far below every one)
MAX_TENSORS = 1 << 16
MAX_KV = 1 << 16
MAX_KEY = 1 << 16  # bytes of a metadata key
MAX_NAME = 1 << 8  # bytes of a tensor name (llama.cpp: 64)
MAX_STRING = 1 << 24  # bytes of one string value
MAX_ARRAY = 1 << 19  # elements of one tokenizer array (vocabularies: up to ~262k; Llama 3's merges: 280k)
MAX_OTHER_ARRAY = 1 << 16  # elements of any other array
# array elements in all metadata: gguf-py and transformers' GGUF loader spend ~1.5 KB and ~150 us on each
# (measured: 1M empty strings, 1.9 GB and 150 s); 3 x 262,144 = Gemma 3's tokens, scores and token types
MAX_ELEMENTS = 3 << 18
MAX_DEPTH = 2  # arrays of arrays at most
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_DIM = 1 << 40  # elements along one tensor dimension
MAX_BLOCKS = 1 << 12  # decoder blocks
MAX_HPARAM = 1 << 24  # any integer hyperparameter of the architecture (widths, heads, context, experts)

UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
_SCALAR = {UINT8: "B", INT8: "b", UINT16: "H", INT16: "h", UINT32: "I", INT32: "i", FLOAT32: "f", BOOL: "?",
           UINT64: "Q", INT64: "q", FLOAT64: "d"}
INTEGER = {UINT8, INT8, UINT16, INT16, UINT32, INT32, UINT64, INT64}
TYPE_NAMES = ["UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "FLOAT32", "BOOL", "STRING", "ARRAY",
              "UINT64", "INT64", "FLOAT64"]
_MIN_SIZE = {**{t: struct.calcsize(c) for t, c in _SCALAR.items()}, STRING: 8, ARRAY: 12}
_MIN_KV = 8 + 4 + 1  # key length, type, smallest value
_MIN_TENSOR = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dim, type, offset


@dataclass
class KV:
    key: str
    type: int
    value: object = None  # scalars; strings up to 4 KiB; arrays of up to 4096 numbers; else None
    count: int | None = None  # arrays: number of elements
    elem_type: int | None = None  # arrays: element type
    offset: int = 0  # where the entry (its key's length) starts
    type_offset: int = 0  # where its value type is
    value_offset: int = 0  # where its value (an array's element type) starts


@dataclass
class Tensor:
    name: str
    dims: list[int]  # GGUF order: dims[0] is the row length
    type: int
    offset: int  # from the start of the data section
    nbytes: int
    info_offset: int = 0  # where its entry (name length) starts in the header
    dims_offset: int = 0  # where n_dims is


@dataclass
class Header:
    path: str
    version: int
    byte_order: str  # "<" or ">"
    file_size: int
    alignment: int
    data_start: int
    kv: dict[str, KV] = field(default_factory=dict)
    tensors: list[Tensor] = field(default_factory=list)  # (version at offset 4, tensor count at 8, KV count at 16)


def _bad(path, why: str) -> LowbitError:
    return LowbitError(f"{path}: not a valid GGUF file ({why})")


class _Reader:
    def __init__(self, f, size: int, path: str):
        self.f, self.size, self.path, self.pos, self.order = f, size, path, 0, "<"

    def left(self) -> int:
        return self.size - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n > self.left():
            raise _bad(self.path, f"{what} needs {n:,} bytes at offset {self.pos:,}, the file has {self.left():,} "
                                  "left: truncated or a corrupt length")
        b = self.f.read(n)
        if len(b) != n:
            raise _bad(self.path, f"file shrank while being read (at offset {self.pos:,})")
        self.pos += n
        return b

    def skip(self, n: int, what: str) -> None:
        if n > self.left():
            raise _bad(self.path, f"{what} needs {n:,} bytes at offset {self.pos:,}, the file has {self.left():,} "
                                  "left: truncated or a corrupt length")
        self.f.seek(n, os.SEEK_CUR)
        self.pos += n

    def unpack(self, code: str, what: str):
        return struct.unpack(self.order + code, self.take(struct.calcsize(code), what))[0]

    def u32(self, what: str) -> int:
        return self.unpack("I", what)

    def u64(self, what: str) -> int:
        return self.unpack("Q", what)

    def string(self, what: str, limit: int, keep: int | None = None) -> str | None:
        """A GGUF string: its text (when at most `keep` bytes; default all) or None (skipped)."""
        n = self.u64(f"{what}'s length")
        if n > limit:
            raise _bad(self.path, f"{what}: a string of {n:,} bytes, more than the limit of {limit:,}")
        if keep is not None and n > keep:
            self.skip(n, what)
            return None
        b = self.take(n, what)
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            raise _bad(self.path, f"{what}: not UTF-8") from None


class _Budget:
    def __init__(self):
        self.elements = 0


def _value(r: _Reader, t: int, what: str, depth: int, budget: _Budget, kv: KV | None = None):
    if t in _SCALAR:
        return r.unpack(_SCALAR[t], what)
    if t == STRING:
        return r.string(what, MAX_STRING, keep=4096)
    if t != ARRAY:
        raise _bad(r.path, f"{what}: unknown value type {t}")
    if depth >= MAX_DEPTH:
        raise _bad(r.path, f"{what}: arrays nested more than {MAX_DEPTH} deep")
    et = r.u32(f"{what}'s element type")
    n = r.u64(f"{what}'s length")
    if et not in _MIN_SIZE:
        raise _bad(r.path, f"{what}: unknown array element type {et}")
    limit = MAX_ARRAY if what.startswith("metadata 'tokenizer.") else MAX_OTHER_ARRAY
    if n > limit:
        raise _bad(r.path, f"{what}: an array of {n:,} elements, more than the limit of {limit:,}")
    budget.elements += n
    if budget.elements > MAX_ELEMENTS:
        raise _bad(r.path, f"{what}: more than {MAX_ELEMENTS:,} array elements in the metadata (the limit)")
    if n * _MIN_SIZE[et] > r.left():
        raise _bad(r.path, f"{what}: an array of {n:,} {TYPE_NAMES[et]} needs at least {n * _MIN_SIZE[et]:,} "
                           f"bytes, the file has {r.left():,} left")
    if kv is not None:
        kv.count, kv.elem_type = n, et
    if et in _SCALAR and depth == 0 and n <= 4096 and kv is not None:  # per-layer values: kept, to be checked
        size = _MIN_SIZE[et]
        raw = r.take(n * size, what)
        return [struct.unpack_from(r.order + _SCALAR[et], raw, i * size)[0] for i in range(n)]
    if et in _SCALAR:
        r.skip(n * _MIN_SIZE[et], what)
    elif et == STRING:
        for i in range(n):
            r.string(f"{what}[{i}]", MAX_STRING, keep=-1)
    else:
        for i in range(n):
            _value(r, ARRAY, f"{what}[{i}]", depth + 1, budget)
    return None


def read_header(path: str | os.PathLike) -> Header:
    """The header of the GGUF file at `path`, every count, length and offset checked (see the module)."""
    import gguf

    from ...core.inputs import open_regular

    p = os.fspath(path)
    fd, st = open_regular(p, "GGUF file")
    with os.fdopen(fd, "rb") as f:
        r = _Reader(f, st.st_size, p)
        if f.read(4) != b"GGUF":
            raise _bad(p, "no GGUF magic")
        r.pos = 4
        raw = r.take(4, "version")
        version = struct.unpack("<I", raw)[0]
        if version & 0xFFFF == 0:  # written on a machine of the other byte order
            r.order = ">"
            version = struct.unpack(">I", raw)[0]
        if version not in (2, 3):
            raise _bad(p, f"version {version}; lowbit reads GGUF versions 2 and 3")
        h = Header(p, version, r.order, st.st_size, 32, 0)
        n_tensors = r.u64("tensor count")
        n_kv = r.u64("metadata count")
        if n_tensors > MAX_TENSORS:
            raise _bad(p, f"{n_tensors:,} tensors, more than the limit of {MAX_TENSORS:,}")
        if n_kv > MAX_KV:
            raise _bad(p, f"{n_kv:,} metadata entries, more than the limit of {MAX_KV:,}")
        if n_tensors * _MIN_TENSOR + n_kv * _MIN_KV > r.left():
            raise _bad(p, f"{n_tensors:,} tensors and {n_kv:,} metadata entries cannot fit in the "
                          f"{r.left():,} bytes left: truncated or corrupt counts")
        budget = _Budget()
        for i in range(n_kv):
            start = r.pos
            key = r.string(f"metadata key #{i}", MAX_KEY)
            if key in h.kv:
                raise _bad(p, f"metadata key {key!r} appears twice")
            t_off = r.pos
            t = r.u32(f"type of {key!r}")
            kv = KV(key, t, offset=start, type_offset=t_off, value_offset=r.pos)
            if t not in _MIN_SIZE:
                raise _bad(p, f"metadata {key!r}: unknown value type {t}")
            kv.value = _value(r, t, f"metadata {key!r}", 0, budget, kv)
            h.kv[key] = kv
        names = set()
        for i in range(n_tensors):
            start = r.pos
            name = r.string(f"name of tensor #{i}", MAX_NAME)
            if name in names:
                raise _bad(p, f"tensor {name!r} appears twice")
            names.add(name)
            d_off = r.pos
            nd = r.u32(f"dimension count of {name!r}")
            if not 1 <= nd <= MAX_DIMS:
                raise _bad(p, f"tensor {name!r}: {nd} dimensions (1 to {MAX_DIMS} allowed)")
            dims = [r.u64(f"dimensions of {name!r}") for _ in range(nd)]
            if any(not 1 <= d <= MAX_DIM for d in dims):
                raise _bad(p, f"tensor {name!r}: dimensions {dims} (each must be 1 to {MAX_DIM:,})")
            t = r.u32(f"type of {name!r}")
            try:
                qt = gguf.GGMLQuantizationType(t)
                block, tsize = gguf.GGML_QUANT_SIZES[qt]
            except (ValueError, KeyError):
                raise _bad(p, f"tensor {name!r}: unknown tensor type {t}") from None
            if dims[0] % block:
                raise _bad(p, f"tensor {name!r}: rows of {dims[0]} are not whole {qt.name} blocks of {block}")
            count = 1
            for d in dims:
                count *= d
            off = r.u64(f"data offset of {name!r}")
            h.tensors.append(Tensor(name, dims, t, off, count // block * tsize, info_offset=start, dims_offset=d_off))
        al = h.kv.get("general.alignment")
        if al is not None:
            if al.type != UINT32:
                raise _bad(p, f"general.alignment is {TYPE_NAMES[al.type]}, not UINT32")
            if al.value == 0 or al.value & (al.value - 1) or al.value > (1 << 30):
                raise _bad(p, f"general.alignment {al.value} is not a power of two up to 2^30")
            h.alignment = al.value
        h.data_start = -(-r.pos // h.alignment) * h.alignment
        room = st.st_size - h.data_start
        end = 0
        for t in sorted(h.tensors, key=lambda t: t.offset):
            if t.offset % h.alignment:
                raise _bad(p, f"tensor {t.name!r}: data offset {t.offset:,} is not a multiple of the alignment "
                              f"{h.alignment}")
            if t.offset + t.nbytes > room:
                raise _bad(p, f"tensor {t.name!r}: its {t.nbytes:,} bytes at data offset {t.offset:,} end past "
                              f"the end of the file ({max(room, 0):,} bytes of data): truncated or corrupt")
            if t.offset < end:
                raise _bad(p, f"tensor {t.name!r}: its data overlaps another tensor's")
            end = t.offset + t.nbytes
    return h


# architecture hyperparameters that are widths or counts: integers >= 1 (transformers builds the model from them)
_DIMS = ("block_count", "embedding_length", "feed_forward_length", "context_length", "attention.head_count",
         "attention.head_count_kv", "attention.key_length", "attention.value_length", "vocab_size",
         "rope.dimension_count", "expert_count", "expert_used_count")


def _int(h: Header, key: str, required: bool = False, per_layer: bool = False) -> int | None:
    """The integer hyperparameter `key` (None if absent, or a per-layer array where `per_layer` allows one:
    LFM2's head_count_kv; its elements are bounded with the rest of the metadata)."""
    kv = h.kv.get(key)
    if kv is None:
        if required:
            raise LowbitError(f"{h.path}: GGUF model refused (no {key} in its metadata)")
        return None
    if per_layer and kv.type == ARRAY and kv.elem_type in INTEGER:
        return None
    if kv.type not in INTEGER:
        raise LowbitError(f"{h.path}: GGUF model refused (metadata {key} is {TYPE_NAMES[kv.type]}, "
                          "expected an integer)")
    if not 1 <= kv.value <= MAX_HPARAM:
        raise LowbitError(f"{h.path}: GGUF model refused (metadata {key} = {kv.value:,}, outside 1 to "
                          f"{MAX_HPARAM:,})")
    return kv.value


def check_model(h: Header) -> None:
    """A GGUF file about to be loaded as a model: tensors present, and matching the metadata."""
    def refuse(why: str) -> LowbitError:
        return LowbitError(f"{h.path}: GGUF model refused ({why})")

    if not h.tensors:
        raise refuse("it has no tensors: a vocabulary-only file, or a corrupt one")
    arch = h.kv.get("general.architecture")
    if arch is None or arch.type != STRING or not arch.value:
        raise refuse("no general.architecture string in its metadata")
    a = arch.value
    for key, kv in h.kv.items():
        if not key.startswith(a + "."):
            continue
        values = [kv.value] if kv.type in INTEGER else kv.value if kv.elem_type in INTEGER and kv.value else []
        big = [v for v in values if v > MAX_HPARAM]
        if big:
            raise refuse(f"metadata {key} = {big[0]:,}, more than the limit of {MAX_HPARAM:,}")
    dims = {k: _int(h, f"{a}.{k}", per_layer=k not in ("block_count", "embedding_length", "vocab_size"))
            for k in _DIMS}
    n_layer = _int(h, f"{a}.block_count", required=True)
    if n_layer > MAX_BLOCKS:
        raise refuse(f"{a}.block_count = {n_layer:,}, more than the limit of {MAX_BLOCKS:,}")
    by_name = {t.name: t for t in h.tensors}
    blocks = set()
    for t in h.tensors:
        m = re.match(r"blk\.(\d+)\.", t.name)
        if m:
            blocks.add(int(m.group(1)))
    if blocks != set(range(n_layer)):
        have = f"blk.0 to blk.{max(blocks)}" if blocks else "none"
        raise refuse(f"{a}.block_count is {n_layer:,} but it has tensors for {len(blocks):,} blocks ({have})")
    emb = by_name.get("token_embd.weight")
    if emb is None or len(emb.dims) != 2:
        raise refuse("no 2-D token_embd.weight tensor")
    n_embd, n_vocab = emb.dims
    if dims["embedding_length"] not in (None, n_embd):
        raise refuse(f"{a}.embedding_length is {dims['embedding_length']:,} but token_embd.weight has rows of {n_embd:,}")
    if dims["vocab_size"] not in (None, n_vocab):
        raise refuse(f"{a}.vocab_size is {dims['vocab_size']:,} but token_embd.weight has {n_vocab:,} rows")
    tokens = h.kv.get("tokenizer.ggml.tokens")
    if tokens is not None and (tokens.type != ARRAY or tokens.elem_type != STRING):
        raise refuse("tokenizer.ggml.tokens is not an array of strings")
    if tokens is not None and tokens.count != n_vocab:
        raise refuse(f"its vocabulary has {tokens.count:,} tokens but token_embd.weight has {n_vocab:,} rows")
    for key, kv in h.kv.items():
        if key.startswith("tokenizer.ggml.") and key.endswith("_token_id") and kv.type in INTEGER \
                and not 0 <= kv.value < n_vocab:
            raise refuse(f"metadata {key} = {kv.value:,}, not a token of its {n_vocab:,}")
    out = by_name.get("output.weight")
    if out is not None and out.dims != emb.dims:
        raise refuse(f"output.weight is {out.dims}, token_embd.weight {emb.dims}")
    n_head, n_kv = dims["attention.head_count"], dims["attention.head_count_kv"]
    if n_head is not None and n_kv is not None and (n_kv > n_head or n_head % n_kv):
        raise refuse(f"{n_head} attention heads cannot share {n_kv} key/value heads")
    head_dim = dims["attention.key_length"] or (n_embd // n_head if n_head else None)
    for i in range(n_layer):
        for suffix, width, what in (("attn_q", n_head, "attention.head_count"),
                                    ("attn_k", n_kv if n_kv is not None or f"{a}.attention.head_count_kv" in h.kv
                                     else n_head, "attention.head_count_kv")):
            t = by_name.get(f"blk.{i}.{suffix}.weight")
            if t is None or width is None or head_dim is None:
                continue
            if len(t.dims) != 2 or t.dims[0] != n_embd or t.dims[1] != width * head_dim:
                raise refuse(f"blk.{i}.{suffix}.weight is {t.dims}, but {a}.{what} = {width} heads of {head_dim} "
                             f"and embedding {n_embd} make [{n_embd}, {width * head_dim}]")
        t = by_name.get(f"blk.{i}.ffn_up.weight")
        ff = dims["feed_forward_length"]
        if t is not None and ff is not None and len(t.dims) == 2 and t.dims != [n_embd, ff]:
            raise refuse(f"blk.{i}.ffn_up.weight is {t.dims}, but {a}.feed_forward_length = {ff:,} and embedding "
                         f"{n_embd:,} make [{n_embd}, {ff}]")


def read_model(path: str | os.PathLike) -> Header:
    """read_header, then check_model: a GGUF file about to be converted to a model."""
    h = read_header(path)
    check_model(h)
    return h
