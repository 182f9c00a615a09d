"""Fuzz campaign: hostile inputs built from the tiny test model, run through the real CLI, judged.

Seeds (built once per campaign, through the CLI where lowbit makes them): the tiny Hugging Face folder
(tests/conftest.py), a W4 g32 asym checkpoint and a W8A8 checkpoint (`lowbit quantize`), F32 and Q8_0
GGUF files (`lowbit export-gguf`), a short text. Reference outputs of the unmutated seeds: eval's
perplexity, generate's text.

Targets and their structured mutations (one per case, drawn from a seeded generator):
  gguf   header fields read by formats/gguf/check.py's parser (counts, version, metadata types, key/string
         lengths, array types and lengths, hyperparameters, tensor names, dims, types, offsets), tensors or
         metadata dropped, truncations, byte flips in the header or the data
  ckpt   config.json values (dims, quantization_config, layer table, aliases, checksum; huge, negative, NaN,
         wrong JSON types), the safetensors header (dtype, shape, data_offsets, entries, length) with the
         checksum recomputed (to reach the loader) or not, truncations, byte flips, files removed or
         replaced by a FIFO, a folder, a link to /dev/zero
  hf     the same on the Hugging Face folder's config.json and weights, an index with hostile paths,
         auto_map (remote code)
  text   texts for eval/calibration: truncations inside characters, invalid UTF-8, NUL, long lines without
         newlines or spaces, FIFOs, devices, folders, sparse 2 GiB files, link loops
  out    OUT for quantize / export-gguf / --plot: absent, a checkpoint, a user's folder or file, a GGUF, a
         PNG, links, FIFOs, a file as parent, stale temporaries of killed runs; with and without --force

Oracle, for every case: exit 0 with the right output, or exit 2 with exactly one `lowbit: error:` line;
never a signal, a traceback, another exit code, a timeout, a peak RSS over the cap, a file left in the
case's folder (or a temporary in the cache, or a cached conversion of a refused GGUF). Exit 0 after a
"strict" mutation (one that leaves the weights and their meaning as they were, or that must be refused)
must reproduce the reference output exactly: anything else is a silent load of other weights. `out`
cases also check that only what --force may replace was replaced, and that nothing else changed.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

# the weights file of a lowbit checkpoint (formats/checkpoint.py)
CKPT_WEIGHTS = "lowbit.safetensors"
CAP = 2 << 30  # peak RSS of a case, bytes
EVAL = ["--seqlen", "32", "--limit-tokens", "96", "--json"]
GEN = ["--prompt", "The quick", "--max-new-tokens", "4"]
UNICODE = "Naïve café — 日本語のテキスト, emojis 🙂🚀 and combining e\u0301.\n"

# the area of a case (for the summary): what part of the loaders it attacks
AREAS = ("mine", "ckpt-tensors", "config-dims", "hf-weights", "index-paths", "lazy-sizes", "remote-code", "native")

DIM_KEYS = {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "vocab_size", "head_dim", "max_position_embeddings"}
# model config values whose change legitimately changes the outputs (a model that computes otherwise)
SEMANTIC_CFG = {"rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "hidden_act", "attention_bias",
                "mlp_bias", "pretraining_tp", "dtype", "torch_dtype", "attention_dropout", "head_dim",
                "max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "use_cache",
                "initializer_range", "num_attention_heads", "num_key_value_heads", "layer_types", "sliding_window"}
GGUF_STRICT_SUFFIX = ("block_count", "embedding_length", "feed_forward_length", "vocab_size")


@dataclass
class Case:
    id: str
    target: str
    command: str
    mutation: str
    argv: list
    strict: bool = True  # exit 0 must reproduce the reference output
    area: str = "mine"  # one of AREAS
    ref: str | None = None  # reference key ("eval:ckpt", ...)
    out: str | None = None  # OUT (relative to the case folder), allowed to exist after exit 0
    out_kind: str | None = None  # checkpoint | gguf | png
    expect_exit: int | None = None  # out cases: the only right exit code
    protect: list = field(default_factory=list)  # paths that must be as they were unless exit 0 replaced OUT
    inputs: list | None = None  # entries of the case folder made before the run (default: all there)
    gguf_sha: str | None = None  # a mutated GGUF's content sha256 (must not be cached when refused)
    setup: object = None  # callable(case_dir) that builds the inputs
    timeout: float | None = None  # this case's own (long texts: linear work, minutes on a loaded machine)


# ----------------------------------------------------------------------------- small helpers


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree_state(path: Path) -> str:
    """A fingerprint of what is at path (kind, link target, file bytes, folder entries), not following links."""
    h = hashlib.sha256()
    if not os.path.lexists(path):
        return "absent"
    st = os.lstat(path)
    if os.path.islink(path):
        return "link:" + os.readlink(path)
    if os.path.isdir(path):
        for p in sorted(path.rglob("*")):
            h.update(str(p.relative_to(path)).encode())
            if p.is_file() and not p.is_symlink():
                h.update(p.read_bytes())
        return "dir:" + h.hexdigest()
    if not os.path.isfile(path):
        return f"special:{st.st_mode:o}"
    if st.st_size > (16 << 20):
        return f"file:{st.st_size}:{st.st_mtime_ns}"
    return "file:" + _sha(path)


def _copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst, symlinks=True)
    else:
        shutil.copyfile(src, dst)


def _st_parse(data: bytes):
    (n,) = struct.unpack_from("<Q", data, 0)
    return json.loads(data[8:8 + n]), n


def _st_build(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


def _resha(folder: Path) -> None:
    """Recompute the checkpoint's checksums as lowbit writes them (an edit that keeps them consistent)."""
    from lowbit.formats.checkpoint import table_sha256

    cfg = folder / "config.json"
    conf = json.loads(cfg.read_text())
    qc = conf["quantization_config"]
    qc["weights_sha256"] = _sha(folder / CKPT_WEIGHTS)
    qc["table_sha256"] = table_sha256(qc)
    cfg.write_text(json.dumps(conf, indent=2))


def _resign_table(folder: Path) -> None:
    from lowbit.formats.checkpoint import table_sha256

    cfg = folder / "config.json"
    conf = json.loads(cfg.read_text())
    qc = conf.get("quantization_config")
    if isinstance(qc, dict):
        qc["table_sha256"] = table_sha256(qc)
        cfg.write_text(json.dumps(conf, indent=2))


def _json_paths(obj, prefix=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield prefix + (k,)
            yield from _json_paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield prefix + (i,)
            yield from _json_paths(v, prefix + (i,))


def _get(obj, path):
    for p in path:
        obj = obj[p]
    return obj


JSON_VALUES = [
    ("huge31", 2 ** 31), ("huge63", 2 ** 63), ("huge1e18", 10 ** 18), ("huge_float", 1e308), ("neg1", -1),
    ("neg_huge", -2 ** 31), ("zero", 0), ("nan", float("nan")), ("inf", float("inf")), ("ninf", float("-inf")),
    ("half", 0.5), ("string", "x"), ("long_string", "A" * 100_000), ("list", [1, 2]), ("nested_list", [[[[]]]]),
    ("dict", {}), ("null", None), ("true", True), ("false", False), ("one", 1), ("two", 2), ("plus1", "+1"),
    ("minus1", "-1"), ("times2", "*2"),
]


def _mutate_json(obj, rng: random.Random, favour: list[tuple] = ()) -> tuple[str, tuple]:
    """Mutate obj in place; returns (description, path)."""
    paths = list(_json_paths(obj))
    fav = [p for p in favour if _has(obj, p)]
    path = rng.choice(fav) if fav and rng.random() < 0.5 else rng.choice(paths)
    parent = _get(obj, path[:-1])
    key = path[-1]
    op = rng.random()
    if op < 0.12 and isinstance(parent, dict):
        del parent[key]
        return f"delete {'.'.join(map(str, path))}", path
    if op < 0.18 and isinstance(parent, dict):
        parent[str(key) + "_x"] = parent.pop(key)
        return f"rename {'.'.join(map(str, path))}", path
    name, value = rng.choice(JSON_VALUES)
    old = parent[key]
    if value in ("+1", "-1", "*2"):
        if isinstance(old, (int, float)) and not isinstance(old, bool):
            value = old + 1 if value == "+1" else old - 1 if value == "-1" else old * 2
        else:
            value = 1
    parent[key] = value
    return f"{'.'.join(map(str, path))} = {name}", path


def _has(obj, path) -> bool:
    try:
        _get(obj, path)
        return True
    except (KeyError, IndexError, TypeError):
        return False


# ----------------------------------------------------------------------------- mutators


def _safetensors_mutation(data: bytes, rng: random.Random) -> tuple[bytes, str, bool]:
    """(new bytes, description, strict)."""
    header, n = _st_parse(data)
    body = data[8 + n:]
    names = [k for k in header if k != "__metadata__"]
    k = rng.choice(names)
    e = header[k]
    op = rng.choice(["dtype", "shape", "shape", "offsets", "offsets", "remove", "rename", "add", "metadata",
                     "hlen", "hjson", "truncate", "flip_header", "flip_data", "append"])
    if op == "dtype":
        e["dtype"] = rng.choice(["F16", "BF16", "F32", "F64", "I8", "U8", "I16", "I32", "I64", "BOOL", "F8_E4M3",
                                 "XX", 7, None])
        return _st_build(header, body), f"safetensors {k}.dtype = {e['dtype']}", True
    if op == "shape":
        s = list(e["shape"])
        how = rng.choice(["+1", "-1", "x2", "zero", "huge", "neg", "drop", "add", "swap", "empty", "float", "str"])
        if how in ("+1", "-1", "x2", "zero", "huge", "neg") and s:
            i = rng.randrange(len(s))
            s[i] = {"+1": s[i] + 1, "-1": s[i] - 1, "x2": s[i] * 2, "zero": 0, "huge": 2 ** 40, "neg": -1}[how]
        elif how == "drop" and s:
            s.pop()
        elif how == "add":
            s.append(rng.choice([1, 2, 2 ** 31]))
        elif how == "swap":
            s = s[::-1]
        elif how == "empty":
            s = []
        elif how == "float":
            s = [float(x) + 0.5 for x in s]
        else:
            s = "72"
        e["shape"] = s
        return _st_build(header, body), f"safetensors {k}.shape {how}", True
    if op == "offsets":
        b, en = e["data_offsets"]
        how = rng.choice(["shift", "end+", "end-", "swap", "past", "huge", "neg", "zero", "other"])
        if how == "shift":
            d = rng.choice([-4, 4, 8])
            e["data_offsets"] = [b + d, en + d]
        elif how == "end+":
            e["data_offsets"] = [b, en + 4]
        elif how == "end-":
            e["data_offsets"] = [b, max(en - 4, 0)]
        elif how == "swap":
            e["data_offsets"] = [en, b]
        elif how == "past":
            e["data_offsets"] = [len(body), len(body) + en - b]
        elif how == "huge":
            e["data_offsets"] = [b, 2 ** 64 - 1]
        elif how == "neg":
            e["data_offsets"] = [-8, en]
        elif how == "zero":
            e["data_offsets"] = [0, en - b]
        else:
            o = header[rng.choice(names)]
            e["data_offsets"] = list(o["data_offsets"])
        return _st_build(header, body), f"safetensors {k}.data_offsets {how}", True
    if op == "remove":
        del header[k]
        return _st_build(header, body), f"safetensors remove {k}", True
    if op == "rename":
        header[k + ".x" if rng.random() < 0.5 else k.replace("layers.1", "layers.7")] = header.pop(k)
        return _st_build(header, body), f"safetensors rename {k}", True
    if op == "add":
        header["model.layers.9.extra.weight"] = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
        return _st_build(header, body), "safetensors add a tensor", True
    if op == "metadata":
        header["__metadata__"] = rng.choice([{"format": "np"}, {"x": 1}, [1], "s", None])
        return _st_build(header, body), "safetensors __metadata__", True
    if op == "hlen":
        v = rng.choice([0, 1, n - 1, n + 1, len(data), 2 ** 40, 2 ** 64 - 1])
        return struct.pack("<Q", v) + data[8:], f"safetensors header length = {v}", True
    if op == "hjson":
        raw = rng.choice([b"[]", b"null", b'{"a": 1', b"{" * 10000, b"\xff\xfe", b'{"x": {"dtype": "F32"}}'])
        raw += b" " * (-len(raw) % 8)
        return struct.pack("<Q", len(raw)) + raw + body, "safetensors header garbage", True
    if op == "truncate":
        cut = rng.randrange(0, len(data))
        return data[:cut], f"safetensors truncated at {cut}", True
    if op == "append":
        return data + os.urandom(rng.choice([1, 8, 4096])), "safetensors trailing bytes", True
    b = bytearray(data)
    if op == "flip_header":
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(8, 8 + n)] ^= 1 << rng.randrange(8)
        return bytes(b), "safetensors header byte flips", True
    for _ in range(rng.randint(1, 8)):
        b[rng.randrange(8 + n, len(b))] ^= 1 << rng.randrange(8)
    return bytes(b), "safetensors data byte flips", False


def _file_op(folder: Path, name: str, op: str) -> None:
    p = folder / name
    if op == "delete":
        p.unlink()
    elif op == "dir":
        p.unlink()
        p.mkdir()
    elif op == "fifo":
        p.unlink()
        os.mkfifo(p)
    elif op == "devzero":
        p.unlink()
        p.symlink_to("/dev/zero")
    elif op == "empty":
        p.write_bytes(b"")
    elif op == "truncate":
        p.write_bytes(p.read_bytes()[: max(1, p.stat().st_size // 2)])
    elif op == "loop":
        p.unlink()
        p.symlink_to(name)


FILE_OPS = ["delete", "dir", "fifo", "devzero", "empty", "truncate", "loop"]


def _gguf_regions(h) -> list[tuple[int, int, bool]]:
    """(start, end, strict) byte ranges of a GGUF file (see the module docstring); default strict."""
    from lowbit.formats.gguf import check as C

    arch = h.kv["general.architecture"].value
    regions = []
    for kv in h.kv.values():
        key = kv.key
        semantic = key.startswith("tokenizer.") or key == "general.name" or (
            key.startswith(arch + ".") and not key.endswith(GGUF_STRICT_SUFFIX))
        if not semantic:
            continue
        # its key text and value content may change the model's meaning; its length/type fields misparse
        regions.append((kv.offset + 8, kv.type_offset, False))
        start = kv.value_offset + (12 if kv.type == C.ARRAY else 8 if kv.type == C.STRING else 0)
        end = min([x.offset for x in h.kv.values() if x.offset > kv.offset] +
                  [t.info_offset for t in h.tensors] + [h.data_start])
        regions.append((start, end, False))
    for t in h.tensors:  # its type and offset: a different reading of the data
        at = t.dims_offset + 4 + 8 * len(t.dims)
        regions.append((at, at + 12, False))
    regions.append((h.data_start, h.file_size, False))
    return regions


def _strict_at(regions, positions) -> bool:
    for p in positions:
        if not any(a <= p < b and not s for a, b, s in regions):
            return True
    return False


def _gguf_mutation(src: Path, dst: Path, rng: random.Random) -> tuple[str, bool]:
    """Write a mutation of the GGUF file src to dst: (description, strict)."""
    from lowbit.formats.gguf import check as C
    from lowbit.formats.gguf.check import read_header

    h = read_header(src)
    data = bytearray(src.read_bytes())
    arch = h.kv["general.architecture"].value
    kvs = list(h.kv.values())

    def put(off, code, value):
        struct.pack_into("<" + code, data, off, value)

    def done(desc, strict):
        dst.write_bytes(bytes(data))
        return desc, strict

    op = rng.choice(["count", "version", "kv_type", "kv_type", "kv_keylen", "kv_value", "kv_value", "kv_value",
                     "kv_strlen", "arr_count", "arr_count", "arr_type", "t_namelen", "t_rename", "t_ndims", "t_dim",
                     "t_dim", "t_type", "t_offset", "drop_tensor", "drop_kv", "alignment", "truncate", "truncate",
                     "flip", "flip", "data_flip", "insert", "delete"])
    if op == "count":
        which = rng.choice([(8, len(h.tensors), "tensor"), (16, len(kvs), "metadata")])
        v = rng.choice([0, which[1] - 1, which[1] + 1, 2 ** 31, 2 ** 63, rng.getrandbits(64)])
        put(which[0], "Q", v)
        return done(f"{which[2]} count = {v}", True)
    if op == "version":
        v = rng.choice([0, 1, 2, 4, 2 ** 16, 2 ** 31])
        put(4, "I", v)
        return done(f"version = {v}", True)
    kv = rng.choice(kvs)
    strict_kv = not (kv.key.startswith("tokenizer.") or kv.key == "general.name" or
                     (kv.key.startswith(arch + ".") and not kv.key.endswith(GGUF_STRICT_SUFFIX)))
    if op == "kv_type":
        v = rng.choice([*range(13), 13, 2 ** 31, C.ARRAY, C.ARRAY, C.STRING])
        put(kv.type_offset, "I", v)
        return done(f"type of {kv.key} = {v}", True)
    if op == "kv_keylen":
        n = len(kv.key.encode())
        v = rng.choice([0, n - 1, n + 1, 2 ** 20, 2 ** 63])
        put(kv.offset, "Q", v)
        return done(f"key length of {kv.key} = {v}", True)
    if op == "kv_value":
        num = [x for x in kvs if x.type in C._SCALAR and x.type != C.BOOL]
        kv = rng.choice(num)
        code = C._SCALAR[kv.type]
        strict_kv = kv.key.endswith(GGUF_STRICT_SUFFIX) or not (
            kv.key.startswith("tokenizer.") or kv.key.startswith(arch + "."))
        if code in "fd":
            v = rng.choice([float("nan"), float("inf"), -1.0, 0.0, 1e30, kv.value * 2])
        else:
            bits = 8 * struct.calcsize(code)
            lo, hi = (-(1 << bits - 1), (1 << bits - 1) - 1) if code.islower() else (0, (1 << bits) - 1)
            v = rng.choice([lo, hi, 0, 1, kv.value + 1, kv.value - 1, kv.value * 2, 10 ** 6])
            v = min(max(v, lo), hi)
        put(kv.value_offset, code, v)
        return done(f"{kv.key} = {v}", strict_kv)
    if op == "kv_strlen":
        strs = [x for x in kvs if x.type == C.STRING]
        kv = rng.choice(strs)
        v = rng.choice([0, 1, 2 ** 24 + 1, 2 ** 40, 2 ** 64 - 1, h.file_size])
        put(kv.value_offset, "Q", v)
        return done(f"string length of {kv.key} = {v}", True)
    arrays = [x for x in kvs if x.type == C.ARRAY]
    if op == "arr_count":
        kv = rng.choice(arrays)
        v = rng.choice([0, kv.count - 1, kv.count + 1, 2 ** 20 + 1, 2 ** 40, 2 ** 64 - 1])
        put(kv.value_offset + 4, "Q", v)
        return done(f"array length of {kv.key} = {v}", True)
    if op == "arr_type":
        kv = rng.choice(arrays)
        v = rng.choice([*range(13), 13, 99])
        put(kv.value_offset, "I", v)
        return done(f"array element type of {kv.key} = {v}", True)
    t = rng.choice(h.tensors)
    if op == "t_namelen":
        n = len(t.name)
        v = rng.choice([0, n - 1, n + 1, 2 ** 8 + 1, 2 ** 63])
        put(t.info_offset, "Q", v)
        return done(f"name length of {t.name} = {v}", True)
    if op == "t_rename":
        i = t.info_offset + 8 + rng.randrange(len(t.name))
        data[i] = rng.choice(b"0123456789abcxyz.")
        return done(f"tensor {t.name} renamed", True)
    if op == "t_ndims":
        v = rng.choice([0, 1, 3, 5, 2 ** 32 - 1])
        put(t.dims_offset, "I", v)
        return done(f"dimension count of {t.name} = {v}", True)
    if op == "t_dim":
        i = rng.randrange(len(t.dims))
        v = rng.choice([0, t.dims[i] + 1, t.dims[i] - 1, t.dims[i] * 2, 2 ** 40, 2 ** 63, 32, 1])
        put(t.dims_offset + 4 + 8 * i, "Q", v)
        return done(f"dims[{i}] of {t.name} = {v}", True)
    if op == "t_type":
        v = rng.choice([0, 1, 2, 3, 6, 7, 8, 10, 12, 14, 24, 30, 99, 2 ** 31])
        put(t.dims_offset + 4 + 8 * len(t.dims), "I", v)
        return done(f"type of {t.name} = {v}", False)
    if op == "t_offset":
        v = rng.choice([0, t.offset + 32, t.offset - 32, t.offset + 1, h.file_size, 2 ** 63])
        put(t.dims_offset + 8 + 8 * len(t.dims), "Q", max(v, 0))
        return done(f"data offset of {t.name} = {v}", False)
    if op in ("drop_tensor", "drop_kv", "alignment"):
        if op == "drop_tensor":
            _rewrite(src, dst, drop_tensor=t.name)
            return f"tensor {t.name} dropped", True
        if op == "drop_kv":
            _rewrite(src, dst, drop_kv=kv.key)
            return f"metadata {kv.key} dropped", strict_kv
        v = rng.choice([("u32", 0), ("u32", 3), ("u32", 64), ("u32", 2 ** 31), ("str", "32"), ("u64", 32)])
        _rewrite(src, dst, add=("general.alignment", v))
        return f"general.alignment = {v}", True
    if op == "truncate":
        cut = rng.choice([rng.randrange(0, h.data_start + 1), rng.randrange(0, len(data))])
        del data[cut:]
        return done(f"truncated at {cut}", True)
    if op == "data_flip":
        for _ in range(rng.randint(1, 16)):
            data[rng.randrange(h.data_start, len(data))] ^= 1 << rng.randrange(8)
        return done("tensor data byte flips", False)
    regions = _gguf_regions(h)
    if op == "flip":
        pos = [rng.randrange(0, h.data_start) for _ in range(rng.randint(1, 4))]
        for p in pos:
            data[p] ^= 1 << rng.randrange(8)
        return done(f"header byte flips at {pos}", _strict_at(regions, pos))
    at = rng.randrange(4, h.data_start)
    if op == "insert":
        data[at:at] = os.urandom(rng.choice([1, 4, 8]))
    else:
        del data[at: at + rng.choice([1, 4, 8])]
    return done(f"{op} bytes at {at}", True)


def _rewrite(src: Path, dst: Path, drop_tensor: str | None = None, drop_kv: str | None = None, add=None) -> None:
    """src written again by gguf-py (byte-identical when nothing changes) without a tensor or a metadata entry,
    or with one more metadata entry."""
    import numpy as np
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    r = GGUFReader(str(src))
    w = GGUFWriter(str(dst), arch=r.fields["general.architecture"].contents())
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture" or k == drop_kv:
            continue
        sub = f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None
        w.add_key_value(k, f.contents(), f.types[0], sub_type=sub)
    if add is not None:
        key, (kind, value) = add
        if kind == "u32[]":
            w.add_key_value(key, value, GGUFValueType.ARRAY, sub_type=GGUFValueType.UINT32)
        else:
            w.add_key_value(key, value, {"u32": GGUFValueType.UINT32, "u64": GGUFValueType.UINT64,
                                         "str": GGUFValueType.STRING}[kind])
    for t in r.tensors:
        if t.name != drop_tensor:
            w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _text_mutation(seed_text: bytes, case_dir: Path, rng: random.Random, big: bool) -> tuple[str, str]:
    """Make case_dir/t.txt (or what stands in its place): (description, path to pass)."""
    p = case_dir / "t.txt"
    op = rng.choice(["truncate", "invalid", "nul", "empty", "spaces", "crlf", "bom", "long_line", "long_line",
                     "long_word", "newlines", "binary", "fifo", "devzero", "devnull", "dir", "sparse", "loop",
                     "missing", "latin1"])
    L = rng.choice([50_000, 200_000, 1_000_000] + ([4_000_000, 8_000_000] if big else []))
    words = seed_text.decode().replace("\n", " ")
    if op == "truncate":
        p.write_bytes(seed_text[: rng.randrange(1, len(seed_text))])
    elif op == "invalid":
        b = bytearray(seed_text)
        b[rng.randrange(len(b)):rng.randrange(len(b))] = rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80"])
        p.write_bytes(bytes(b))
    elif op == "nul":
        p.write_bytes(seed_text.replace(b" ", b"\x00", rng.randint(1, 50)))
    elif op == "empty":
        p.write_bytes(b"")
    elif op == "spaces":
        p.write_bytes(b" \n\t\r\n " * rng.randint(1, 1000))
    elif op == "crlf":
        p.write_bytes(seed_text.replace(b"\n", b"\r\n"))
    elif op == "bom":
        p.write_bytes(b"\xef\xbb\xbf" + seed_text)
    elif op == "long_line":
        p.write_text((words * (L // len(words) + 1))[:L])
        op += f" {L}"
    elif op == "long_word":
        p.write_text("ab" * (L // 2))
        op += f" {L}"
    elif op == "newlines":
        p.write_bytes(b"\n" * L)
        op += f" {L}"
    elif op == "binary":
        p.write_bytes(bytes(rng.getrandbits(8) for _ in range(rng.choice([10, 1000, 50_000]))))
    elif op == "fifo":
        os.mkfifo(p)
    elif op == "devzero":
        p.symlink_to("/dev/zero")
    elif op == "devnull":
        return op, "/dev/null"
    elif op == "dir":
        p.mkdir()
    elif op == "sparse":
        with open(p, "wb") as f:
            f.truncate((2 << 30) + 1)
    elif op == "loop":
        p.symlink_to("t.txt")
    elif op == "latin1":
        p.write_bytes(UNICODE.encode("latin-1", "replace") + "déjà".encode("latin-1"))
    return op, "t.txt"


# ----------------------------------------------------------------------------- the campaign


class Campaign:
    def __init__(self, work: str | os.PathLike, jobs: int = 2, timeout: float = 30.0, cap: int = CAP,
                 big: bool = False, log=None):
        self.work = Path(work)
        self.seeds, self.cases_dir, self.cache = self.work / "seeds", self.work / "cases", self.work / "cache"
        self.jobs, self.timeout, self.cap, self.big = jobs, timeout, cap, big
        self.refs: dict[str, object] = {}
        self.server = None
        self.log = log

    # -- setup
    def start(self) -> "Campaign":
        from tests.fuzz.forkserver import ForkServer

        for d in (self.seeds, self.cases_dir, self.cache):
            d.mkdir(parents=True, exist_ok=True)
        self.server = ForkServer(jobs=self.jobs, log=self.work / "server.log")
        self._build_seeds()
        return self

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    def _req(self, argv, cwd, tag, timeout=None) -> dict:
        return {"argv": [str(a) for a in argv], "cwd": str(cwd), "env": {"LOWBIT_CACHE": str(self.cache)},
                "timeout": timeout or self.timeout, "mem_cap": self.cap,
                "stdout": str(self.work / "logs" / f"{tag}.out"),
                "stderr": str(self.work / "logs" / f"{tag}.err")}

    def _cli(self, tag: str, *argv) -> tuple[int, str, str]:
        (self.work / "logs").mkdir(exist_ok=True)
        r = self.server.run(self._req(argv, self.seeds, tag, timeout=300))
        out = (self.work / "logs" / f"{tag}.out").read_text(errors="replace")
        err = (self.work / "logs" / f"{tag}.err").read_text(errors="replace")
        if r["code"] != 0:
            raise RuntimeError(f"seed step {tag} failed ({r}): {err[-2000:]}")
        return r["code"], out, err

    def _build_seeds(self) -> None:
        from tests.conftest import TEXT, make_tiny_llama, make_tokenizer

        s = self.seeds
        if not (s / "hf" / "config.json").is_file():
            model, tok = make_tiny_llama(), make_tokenizer()
            model.save_pretrained(s / "hf")
            tok.save_pretrained(s / "hf")
        (s / "text.txt").write_text(TEXT + UNICODE * 3)
        steps = [("ckpt", ["quantize", "hf", "ckpt", "--bits", "4", "--group-size", "32", "--asym"]),
                 ("ckpt8", ["quantize", "hf", "ckpt8", "--method", "w8a8"]),
                 ("f32.gguf", ["export-gguf", "hf", "f32.gguf", "--type", "F32"]),
                 ("q8.gguf", ["export-gguf", "hf", "q8.gguf", "--type", "Q8_0"])]
        for name, argv in steps:
            if not (s / name).exists():
                self._cli(f"seed-{name}", *argv)
        (s / "plot.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
        reqs = []
        for name in ("hf", "ckpt", "ckpt8", "f32.gguf", "q8.gguf"):
            reqs.append({**self._req(["eval", name, "--text", s / "text.txt", *EVAL], s, f"ref-eval-{name}", 300),
                         "id": f"eval:{name}"})
            reqs.append({**self._req(["generate", name, *GEN], s, f"ref-generate-{name}", 300),
                         "id": f"generate:{name}"})
        for r in self.server.run_many(reqs):
            cmd, name = r["id"].split(":")
            out = (self.work / "logs" / f"ref-{cmd}-{name}.out").read_text()
            if r["code"] != 0:
                raise RuntimeError(f"reference {r['id']} failed: {r}")
            self.refs[r["id"]] = json.loads(out.strip().splitlines()[-1])["ppl"] if cmd == "eval" else out

    # -- cases
    def make_cases(self, n: int, seed: int = 0, weights: dict | None = None) -> list[Case]:
        weights = weights or {"gguf": 0.36, "ckpt": 0.26, "text": 0.14, "out": 0.12, "hf": 0.12}
        cases = []
        for i in range(n):
            rng = random.Random(f"{seed}:{i}")
            target = rng.choices(list(weights), list(weights.values()))[0]
            cases.append(getattr(self, f"_case_{target}")(f"{seed}-{i:05d}-{target}", rng))
        return cases

    def _case_gguf(self, cid: str, rng: random.Random) -> Case:
        seed = rng.choice(["f32.gguf", "f32.gguf", "q8.gguf"])
        cmd = rng.choices(["inspect", "eval", "generate", "quantize", "export-gguf"], [25, 40, 15, 10, 10])[0]
        c = Case(cid, "gguf", cmd, "", [], ref=f"{cmd}:{seed}" if cmd in ("eval", "generate") else None)
        argv = {"inspect": ["inspect", "m.gguf"], "eval": ["eval", "m.gguf", "--text", self.seeds / "text.txt", *EVAL],
                "generate": ["generate", "m.gguf", *GEN],
                "quantize": ["quantize", "m.gguf", "out", "--bits", "4", "--group-size", "32"],
                "export-gguf": ["export-gguf", "m.gguf", "out.gguf", "--type", rng.choice(["F32", "Q8_0"])]}[cmd]
        c.argv = argv
        c.out = {"quantize": "out", "export-gguf": "out.gguf"}.get(cmd)

        def setup(d: Path, c=c, seed=seed, rng_state=rng.getstate()):
            r = random.Random()
            r.setstate(rng_state)
            c.mutation, c.strict = _gguf_mutation(self.seeds / seed, d / "m.gguf", r)
            c.gguf_sha = _sha(d / "m.gguf")

        c.setup = setup
        return c

    def _case_ckpt(self, cid: str, rng: random.Random) -> Case:
        seed = rng.choice(["ckpt", "ckpt", "ckpt", "ckpt8"])
        cmd = rng.choices(["eval", "inspect", "generate", "export-gguf", "quantize"], [50, 20, 20, 5, 5])[0]
        c = Case(cid, "ckpt", cmd, "", [], ref=f"{cmd}:{seed}" if cmd in ("eval", "generate") else None,
                 area="ckpt-tensors")
        c.argv = {"eval": ["eval", "m", "--text", self.seeds / "text.txt", *EVAL], "inspect": ["inspect", "m"],
                  "generate": ["generate", "m", *GEN], "export-gguf": ["export-gguf", "m", "out.gguf", "--type", "F32"],
                  "quantize": ["quantize", "m", "out"]}[cmd]
        c.out = {"export-gguf": "out.gguf", "quantize": "out"}.get(cmd)

        def setup(d: Path, c=c, seed=seed, rng_state=rng.getstate()):
            r = random.Random()
            r.setstate(rng_state)
            m = d / "m"
            _copy(self.seeds / seed, m)
            kind = r.choices(["config", "safetensors", "files"], [45, 45, 10])[0]
            if kind == "config":
                conf = json.loads((m / "config.json").read_text())
                favour = [(k,) for k in DIM_KEYS] + [("tie_word_embeddings",), ("model_type",)] + [
                    ("quantization_config", k) for k in ("quant_method", "method", "scheme", "layers", "aliases",
                                                         "weights_sha256", "table_sha256")] + [
                    ("quantization_config", "scheme", k) for k in ("bits", "group_size", "granularity", "symmetric")]
                desc, path = _mutate_json(conf, r, favour)
                (m / "config.json").write_text(json.dumps(conf, indent=2))
                c.strict = path[0] not in SEMANTIC_CFG
                if path[0] == "quantization_config" and r.random() < 0.5:
                    # the table's checksum recomputed: the edit reaches the validation behind it. A scheme
                    # edited consistently is another valid model (a group size of 33 for 32 keeps the scales'
                    # shape), so its output may differ; it must still load or be refused cleanly.
                    _resign_table(m)
                    desc += " (table checksum updated)"
                    if len(path) > 1 and path[1] in ("scheme", "layers", "overrides", "options", "method"):
                        c.strict = False
                c.mutation = "config.json " + desc
                if path[0] in DIM_KEYS:
                    c.area = "config-dims"
                elif path[:2] in (("quantization_config",), ("quantization_config", "quant_method")):
                    c.area = "hf-weights"  # no longer a lowbit checkpoint: transformers loads the folder
            elif kind == "safetensors":
                new, desc, c.strict = _safetensors_mutation((m / CKPT_WEIGHTS).read_bytes(), r)
                (m / CKPT_WEIGHTS).write_bytes(new)
                if r.random() < 0.85:
                    _resha(m)
                    desc += " (checksum updated)"
                c.mutation = desc
            else:
                name = r.choice(["config.json", CKPT_WEIGHTS, "tokenizer.json", "tokenizer_config.json",
                                 "generation_config.json"])
                op = r.choice(FILE_OPS)
                _file_op(m, name, op)
                c.mutation = f"{name} {op}"
                c.area = "mine"  # what the folder holds: lowbit must not hang on it or read it unbounded

        c.setup = setup
        return c

    def _case_hf(self, cid: str, rng: random.Random) -> Case:
        cmd = rng.choices(["eval", "quantize"], [70, 30])[0]
        c = Case(cid, "hf", cmd, "", [], ref="eval:hf" if cmd == "eval" else None, area="hf-weights")
        c.argv = {"eval": ["eval", "m", "--text", self.seeds / "text.txt", *EVAL],
                  "quantize": ["quantize", "m", "out", "--bits", "4", "--group-size", "32"]}[cmd]
        c.out = "out" if cmd == "quantize" else None

        def setup(d: Path, c=c, rng_state=rng.getstate()):
            r = random.Random()
            r.setstate(rng_state)
            m = d / "m"
            _copy(self.seeds / "hf", m)
            kind = r.choices(["config", "safetensors", "index", "remote", "files"], [40, 35, 10, 5, 10])[0]
            if kind == "config":
                conf = json.loads((m / "config.json").read_text())
                desc, path = _mutate_json(conf, r, [(k,) for k in DIM_KEYS] + [("tie_word_embeddings",),
                                                                                ("model_type",), ("architectures",)])
                (m / "config.json").write_text(json.dumps(conf, indent=2))
                c.mutation = "config.json " + desc
                c.strict = path[0] not in SEMANTIC_CFG
                c.area = "config-dims" if path[0] in DIM_KEYS else "hf-weights"
            elif kind == "safetensors":
                new, desc, c.strict = _safetensors_mutation((m / "model.safetensors").read_bytes(), r)
                (m / "model.safetensors").write_bytes(new)
                c.mutation = desc
                c.area = "lazy-sizes" if cmd == "quantize" else "hf-weights"
            elif kind == "index":
                header, _ = _st_parse((m / "model.safetensors").read_bytes())
                shard = "model-00001-of-00001.safetensors"
                os.rename(m / "model.safetensors", m / shard)
                wm = {k: shard for k in header if k != "__metadata__"}
                k = r.choice(sorted(wm))
                wm[k] = r.choice(["/etc/passwd", "../../seeds/hf/model.safetensors", "/dev/zero", "missing.safetensors",
                                  "", ".", "config.json", "a" * 5000, 7, None])
                (m / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
                c.mutation = f"index: {k} -> {str(wm[k])[:40]}"
                c.area = "index-paths"
            elif kind == "remote":
                conf = json.loads((m / "config.json").read_text())
                conf["auto_map"] = {"AutoModelForCausalLM": "evil.EvilModel", "AutoConfig": "evil.EvilConfig"}
                (m / "config.json").write_text(json.dumps(conf))
                (m / "evil.py").write_text("import os\nos.system('touch PWNED')\n")
                c.mutation = "auto_map to remote code"
                c.area = "remote-code"
            else:
                name = r.choice(["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"])
                op = r.choice(FILE_OPS)
                _file_op(m, name, op)
                c.mutation = f"{name} {op}"
                c.area = "mine"

        c.setup = setup
        return c

    def _case_text(self, cid: str, rng: random.Random) -> Case:
        cmd = rng.choices(["eval", "activations", "quantize"], [55, 30, 15])[0]
        c = Case(cid, "text", cmd, "", [], strict=False)
        hf = self.seeds / "hf"

        def setup(d: Path, c=c, rng_state=rng.getstate()):
            r = random.Random()
            r.setstate(rng_state)
            desc, path = _text_mutation((self.seeds / "text.txt").read_bytes(), d, r, self.big)
            c.mutation = desc
            long = desc.startswith(("long_", "newlines"))
            if long:
                c.timeout = max(self.timeout, 60 * int(desc.split()[-1]) / 1_000_000)  # 60 s per million chars
            if cmd == "eval":  # (a long text's first 4096 tokens: 8 windows of the tiny model)
                c.argv = ["eval", hf, "--text", path, "--json", *(["--seqlen", "512", "--limit-tokens", "4096"] if long
                                                                   else ["--seqlen", "32", "--limit-tokens", "96"])]
            elif cmd == "activations":
                c.argv = ["inspect", hf, "--activations", "--calib", path, "--nsamples", "2", "--calib-seqlen", "16",
                          "--json"]
            else:
                c.argv = ["quantize", hf, "out", "--method", "gptq", "--calib", path, "--nsamples", "2",
                          "--calib-seqlen", "16", "--group-size", "32"]
                c.out = "out"

        c.setup = setup
        return c

    def _case_out(self, cid: str, rng: random.Random) -> Case:
        cmd = rng.choice(["quantize", "export-gguf", "plot"])
        kind = {"quantize": "checkpoint", "export-gguf": "gguf", "plot": "png"}[cmd]
        state = rng.choice(["absent", "empty_dir", "user_dir", "ckpt", "text_file", "gguf_file", "png_file",
                            "empty_file", "link_ckpt", "link_file", "dangling", "fifo", "parent_file", "nested",
                            "stale"])
        force = cmd == "plot" or rng.random() < 0.6
        name = {"checkpoint": "o", "gguf": "o.gguf", "png": "o.png"}[kind]
        out = {"parent_file": f"afile/{name}", "nested": f"a/b/{name}"}.get(state, name)
        hf = self.seeds / "hf"
        argv = {"quantize": ["quantize", hf, out], "export-gguf": ["export-gguf", hf, out, "--type", "F32"],
                "plot": ["inspect", hf, "--activations", "--calib", self.seeds / "text.txt", "--nsamples", "2",
                         "--calib-seqlen", "16", "--plot", out]}[cmd]
        if force and cmd != "plot":
            argv.append("--force")
        replaceable = {"absent": True, "nested": True, "stale": True, "parent_file": False,
                       "empty_dir": kind == "checkpoint", "ckpt": kind == "checkpoint", "user_dir": False,
                       "text_file": False, "gguf_file": kind == "gguf", "png_file": kind == "png",
                       "empty_file": kind != "checkpoint", "link_ckpt": False, "link_file": False,
                       "dangling": False, "fifo": False}[state]
        exists = state not in ("absent", "nested", "stale", "parent_file")
        ok = replaceable and (not exists or force)
        c = Case(cid, "out", cmd, f"OUT {state}{' --force' if force and cmd != 'plot' else ''}", argv, strict=False,
                 out=out if ok else None, out_kind=kind, expect_exit=0 if ok else 2)

        def setup(d: Path, c=c):
            p = d / name
            if state == "empty_dir":
                p.mkdir()
            elif state == "user_dir":
                p.mkdir()
                (p / "thesis.tex").write_text("years of work")
            elif state == "ckpt":
                _copy(self.seeds / "ckpt", p)
            elif state == "text_file":
                p.write_text("notes")
            elif state == "gguf_file":
                _copy(self.seeds / "f32.gguf", p)
            elif state == "png_file":
                _copy(self.seeds / "plot.png", p)
            elif state == "empty_file":
                p.write_bytes(b"")
            elif state == "link_ckpt":
                _copy(self.seeds / "ckpt", d / "real")
                p.symlink_to("real")
            elif state == "link_file":
                (d / "real").write_text("notes")
                p.symlink_to("real")
            elif state == "dangling":
                p.symlink_to("nowhere")
            elif state == "fifo":
                os.mkfifo(p)
            elif state == "parent_file":
                (d / "afile").write_text("x")
            elif state == "stale":
                (d / f".{name}.tmp-999999999-abcdefgh").mkdir()
                legacy = d / f".{name}.tmp-abcd1234"
                legacy.write_bytes(b"x" * 1000)
                os.utime(legacy, (time.time() - 7200, time.time() - 7200))
            c.inputs = sorted(x.name for x in d.iterdir() if not x.name.startswith(f".{name}.tmp-"))
            c.protect = [(x, _tree_state(d / x)) for x in c.inputs]

        c.setup = setup
        return c

    # -- running and judging
    def run(self, cases: list[Case], progress=None) -> list[dict]:
        reqs, by_id = [], {}
        (self.work / "logs").mkdir(exist_ok=True)
        for c in cases:
            d = self.cases_dir / c.id
            if d.exists():
                shutil.rmtree(d)
            d.mkdir(parents=True)
            c.setup(d)
            if c.inputs is None:
                c.inputs = sorted(x.name for x in d.iterdir())
            if not c.protect:
                c.protect = [(x, _tree_state(d / x)) for x in c.inputs]
            req = self._req(c.argv, d, c.id, timeout=c.timeout)
            req["id"] = c.id
            reqs.append(req)
            by_id[c.id] = c
        results = []
        for reply in self.server.run_many(reqs):
            c = by_id[reply["id"]]
            res = self.judge(c, reply)
            results.append(res)
            if progress:
                progress(res)
        order = {c.id: i for i, c in enumerate(cases)}
        results.sort(key=lambda r: order[r["id"]])
        self._check_cache(results, {c.id: c for c in cases})
        return results

    def judge(self, c: Case, reply: dict) -> dict:
        d = self.cases_dir / c.id
        out = (self.work / "logs" / f"{c.id}.out").read_text(errors="replace")
        err = (self.work / "logs" / f"{c.id}.err").read_text(errors="replace")
        code, problems = reply["code"], []
        if reply["timed_out"]:
            problems.append("hang")
        elif reply["signal"] is not None:
            problems.append(f"signal {signal.Signals(reply['signal']).name}")
        elif code not in (0, 2):
            problems.append(f"exit {code}")
        if "Traceback (most recent call last)" in err:
            problems.append("traceback")
        if reply["peak_rss"] > self.cap:
            problems.append("over_cap")
        errors = [l for l in re.split(r"[\r\n]", err) if l.startswith("lowbit: error:")]
        if code == 2 and len(errors) != 1:
            problems.append("error_lines")
        if code == 0 and c.strict and c.ref:
            want = self.refs.get(c.ref)
            if c.command == "eval":
                try:
                    got = json.loads(out.strip().splitlines()[-1])["ppl"]
                except (ValueError, IndexError, KeyError, TypeError):
                    got = None
                same = got == want or (isinstance(got, float) and isinstance(want, float) and math.isnan(got)
                                       and math.isnan(want))
            else:
                got, same = out, out == want
            if not same:
                problems.append("random_weights")
        # what is left in the case folder
        allowed = set(c.inputs)
        if code == 0 and c.out:
            allowed.add(Path(c.out).parts[0])
        left = sorted(x.name for x in d.iterdir() if x.name not in allowed)
        if c.target == "out":
            left = [x for x in left if not (code != 0 and x.startswith(".")
                                            and re.match(r"^\.o(\.gguf|\.png)?\.tmp-", x))]  # planted, not swept on failure
        if left:
            problems.append("leftover")
        if c.target == "out":
            problems += self._judge_out(c, d, code)
        elif code != 0:  # a refused run leaves its inputs as they were
            if any(_tree_state(d / x) != s for x, s in c.protect):
                problems.append("input_changed")
        if code == 0 and c.out and not os.path.lexists(d / c.out):
            problems.append("no_output")
        area = c.area
        if c.command == "generate" and reply["signal"] is not None:
            area = "native"  # the lean decoder's C kernels crashed on what the loader accepted
        return {"id": c.id, "target": c.target, "command": c.command, "mutation": c.mutation, "code": code,
                "signal": reply["signal"], "timed_out": reply["timed_out"], "peak_rss": reply["peak_rss"],
                "seconds": reply["seconds"], "problems": problems, "area": area,
                "error": errors[-1][:300] if errors else None,
                "stderr_tail": err[-600:] if problems else None, "gguf_sha": c.gguf_sha, "leftovers": left[:5]}

    def _judge_out(self, c: Case, d: Path, code) -> list[str]:
        problems = []
        if code != c.expect_exit:
            problems.append(f"out_semantics (exit {code}, expected {c.expect_exit})")
        if code == 0 and c.out:
            p = d / c.out
            if c.out_kind == "checkpoint":
                from lowbit.core.io import is_lowbit_checkpoint

                good = p.is_dir() and not p.is_symlink() and is_lowbit_checkpoint(p)
            else:
                magic = b"GGUF" if c.out_kind == "gguf" else b"\x89PNG"
                good = p.is_file() and not p.is_symlink() and p.read_bytes()[:4] == magic
            if not good:
                problems.append("bad_output")
            for x, s in c.protect:  # everything but OUT as it was
                if x != Path(c.out).parts[0] and _tree_state(d / x) != s:
                    problems.append("other_changed")
        elif any(_tree_state(d / x) != s for x, s in c.protect):
            problems.append("out_changed")
        return problems

    def _check_cache(self, results: list[dict], cases: dict) -> None:
        """Temporaries left in the cache, and cached conversions of refused GGUF files."""
        gg = self.cache / "gguf"
        names = [x.name for x in gg.iterdir()] if gg.is_dir() else []
        temps = [n for n in names if ".tmp-" in n]
        for r in results:
            if r["target"] == "gguf" and r["code"] == 2 and "m.gguf" in (r["error"] or "") and r["gguf_sha"]:
                if any(n.endswith(r["gguf_sha"][:32]) for n in names):
                    r["problems"].append("cached_refused")
        if temps:
            for r in results:
                if r["target"] == "gguf":
                    r["problems"].append("cache_leftover")
                    break


def summarize(results: list[dict], seconds: float) -> dict:
    def count(pred):
        return sum(1 for r in results if pred(r))

    by_target, exits, by_area, findings = {}, {}, {}, []
    for r in results:
        by_target[r["target"]] = by_target.get(r["target"], 0) + 1
        k = "timeout" if r["timed_out"] else f"signal {r['signal']}" if r["signal"] is not None else str(r["code"])
        exits[k] = exits.get(k, 0) + 1
        if r["problems"]:
            by_area[r["area"]] = by_area.get(r["area"], 0) + 1
            findings.append({k: r[k] for k in ("id", "target", "command", "mutation", "problems", "error",
                                               "stderr_tail")})
    has = lambda name: (lambda r: any(p.startswith(name) for p in r["problems"]))  # noqa: E731
    return {
        "cases": len(results), "seconds": round(seconds, 1), "cases_per_s": round(len(results) / max(seconds, 1e-9), 2),
        "by_target": by_target, "exits": exits,
        "crashes": count(lambda r: r["signal"] is not None and not r["timed_out"]),
        "other_exit_codes": count(has("exit ")), "tracebacks": count(has("traceback")), "hangs": count(has("hang")),
        "over_cap": count(has("over_cap")), "leftovers": count(has("leftover")) + count(has("cache_leftover")),
        "random_weight_loads": count(has("random_weights")), "error_line_violations": count(has("error_lines")),
        "out_semantics_violations": count(lambda r: any(p.startswith(("out_", "other_changed", "bad_output"))
                                                        for p in r["problems"])),
        "cached_refused_gguf": count(has("cached_refused")),
        "peak_rss_max_mb": round(max((r["peak_rss"] for r in results), default=0) / 2 ** 20),
        "failures": count(lambda r: bool(r["problems"])),
        "failures_by_area": by_area,
        "findings": findings[:40],
    }
