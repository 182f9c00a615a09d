"""GGUF files as hostile input: the header is read with bounds before gguf-py/transformers see it, models whose
tensors do not match their metadata are refused, and the float conversion cache is keyed by content, written
atomically and never holds a refused conversion."""
from __future__ import annotations

import os
import resource
import struct
import time

import numpy as np
import pytest

import lowbit
from lowbit.errors import LowbitError
from lowbit.formats.gguf import check as C
from lowbit.formats.gguf.check import read_header, read_model

from tests.conftest import make_tiny_llama, make_tokenizer


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from lowbit.formats.gguf.export import export_gguf

    p = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    export_gguf(make_tiny_llama(), make_tokenizer(), p, "F32", progress=False)
    return p


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    c = tmp_path / "cache"
    monkeypatch.setenv("LOWBIT_CACHE", str(c))
    return c


def patched(src, dst, *edits):
    """Copy of src with (offset, struct code, value) edits (little-endian)."""
    data = bytearray(src.read_bytes())
    for off, code, value in edits:
        struct.pack_into("<" + code, data, off, value)
    dst.write_bytes(bytes(data))
    return dst


def rewrite(src, dst, drop=(), kv=None):
    """src written again by gguf-py (byte-identical when nothing changes), minus tensors `drop`, with the
    metadata values in `kv` replaced."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    r = GGUFReader(str(src))
    w = GGUFWriter(str(dst), arch=r.fields["general.architecture"].contents())
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture":
            continue
        sub = f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None
        w.add_key_value(k, (kv or {}).get(k, f.contents()), f.types[0], sub_type=sub)
    for t in r.tensors:
        if t.name not in drop:
            w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def cached(cache):
    d = cache / "gguf"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def test_rewrite_is_identity(tiny_gguf, tmp_path):
    assert rewrite(tiny_gguf, tmp_path / "same.gguf").read_bytes() == tiny_gguf.read_bytes()
    h = read_model(tiny_gguf)
    assert len(h.tensors) == 20 and h.kv["llama.block_count"].value == 2 and h.kv["tokenizer.ggml.tokens"].count == 320


def test_block_count_bomb_is_refused_at_once(cli, tiny_gguf, tmp_path, cache):
    """block_count 10^6 (the model transformers would build: >= 4.2 GB, 91 s)."""
    kv = read_header(tiny_gguf).kv["llama.block_count"]
    bomb = patched(tiny_gguf, tmp_path / "bomb.gguf", (kv.value_offset, "I", 10 ** 6))
    t0 = time.time()
    code, _, err = cli("eval", bomb, "--limit-tokens", "64", "--seqlen", "32")
    assert code == 2 and time.time() - t0 < 10
    assert err.strip().splitlines()[-1] == (f"lowbit: error: {bomb}: GGUF model refused (llama.block_count = "
                                            "1,000,000, more than the limit of 4,096)")
    small = patched(tiny_gguf, tmp_path / "three.gguf", (kv.value_offset, "I", 3))
    with pytest.raises(LowbitError, match=r"block_count is 3 but it has tensors for 2 blocks \(blk.0 to blk.1\)"):
        lowbit.load(small)
    assert cached(cache) == []


@pytest.mark.parametrize("key", ["llama.context_length", "general.name", "tokenizer.ggml.model",
                                 "llama.rope.freq_base"])
def test_metadata_type_changed_to_array_is_refused(cli, tiny_gguf, tmp_path, cache, key):
    """A value type changed to ARRAY: what follows is read as an element type and a length (5.5 GB in 32 s)."""
    kv = read_header(tiny_gguf).kv[key]
    bad = patched(tiny_gguf, tmp_path / "arr.gguf", (kv.type_offset, "I", C.ARRAY))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for cmd in (["eval", bad, "--limit-tokens", "64"], ["inspect", bad]):
        code, _, err = cli(*cmd)
        last = err.strip().splitlines()[-1]
        assert code == 2 and last.startswith(f"lowbit: error: {bad}: not a valid GGUF file (metadata '{key}'"), err
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024
    assert cached(cache) == []


def test_model_without_tensors_is_refused_and_not_cached(cli, tiny_gguf, tmp_path, cache):
    empty = patched(tiny_gguf, tmp_path / "empty.gguf", (8, "Q", 0))  # tensor count 0
    code, _, err = cli("quantize", empty, tmp_path / "q")
    assert code == 2 and "GGUF model refused (it has no tensors" in err.strip().splitlines()[-1]
    assert cached(cache) == [] and not (tmp_path / "q").exists()
    code, out, _ = cli("inspect", empty)  # a valid GGUF file all the same: inspect lists nothing
    assert code == 0 and "0 tensors" in out


def test_missing_tensor_is_refused_not_random(tiny_gguf, tmp_path, cache):
    bad = rewrite(tiny_gguf, tmp_path / "nodown.gguf", drop=("blk.1.ffn_down.weight",))
    with pytest.raises(LowbitError, match=r"GGUF model refused \(no weights in the file for "
                                          r"model.layers.1.mlp.down_proj.weight"):
        lowbit.load(bad)
    assert cached(cache) == []


def test_embedding_must_match_the_vocabulary_and_widths(tiny_gguf, tmp_path):
    r = read_header(tiny_gguf)
    tokens = rewrite(tiny_gguf, tmp_path / "t.gguf", kv={"tokenizer.ggml.tokens": [f"t{i}" for i in range(319)]})
    with pytest.raises(LowbitError, match="vocabulary has 319 tokens but token_embd.weight has 320 rows"):
        read_model(tokens)
    for key, value, msg in [("llama.embedding_length", 4096, "embedding_length is 4,096 but token_embd.weight has rows of 72"),
                            ("llama.feed_forward_length", 10 ** 6, "feed_forward_length = 1,000,000"),
                            ("llama.attention.head_count", 8, "blk.0.attn_k.weight is"),
                            ("llama.attention.head_count_kv", 3, "4 attention heads cannot share 3"),
                            ("llama.context_length", 2 ** 31, "context_length = 2,147,483,648, more than the limit"),
                            ("tokenizer.ggml.eos_token_id", 320, "eos_token_id = 320, not a token of its 320")]:
        bad = patched(tiny_gguf, tmp_path / "w.gguf", (r.kv[key].value_offset, "I", value))
        with pytest.raises(LowbitError, match=msg):
            read_model(bad)


def test_per_layer_hyperparameters(tiny_gguf, tmp_path):
    """A per-layer integer array (LFM2's head_count_kv) is accepted, and its values bounded like scalars."""
    from tests.fuzz.campaign import _rewrite

    r = read_header(tiny_gguf)
    kv = r.kv["llama.attention.head_count_kv"]
    p = tmp_path / "per-layer.gguf"
    for values, ok in (([2, 2], True), ([2, 10 ** 9], False)):
        _rewrite(tiny_gguf, p, drop_kv=kv.key, add=(kv.key, ("u32[]", values)))
        if ok:
            assert read_model(p).kv[kv.key].value == values
        else:
            with pytest.raises(LowbitError, match="head_count_kv = 1,000,000,000, more than the limit"):
                read_model(p)


def test_counts_lengths_and_offsets_are_bounded(tiny_gguf, tmp_path):
    r = read_header(tiny_gguf)
    size = tiny_gguf.stat().st_size
    t0 = r.tensors[0]
    kv = r.kv["general.name"]
    tokens = r.kv["tokenizer.ggml.tokens"]
    cases = {
        "tensor count": ((8, "Q", 10 ** 12), "tensors, more than the limit of 65,536"),
        "kv count": ((16, "Q", 2 ** 40), "metadata entries, more than the limit"),
        "counts past the end": ((8, "Q", 60000), "cannot fit in the"),
        "string length": ((kv.value_offset, "Q", 2 ** 62), "a string of 4,611,686,018,427,387,904 bytes, more than"),
        "string past the end": ((kv.value_offset, "Q", size), "truncated or a corrupt length"),
        "array length": ((tokens.value_offset + 4, "Q", 2 ** 33), "an array of 8,589,934,592 elements, more than"),
        "array past the end": ((tokens.value_offset + 4, "Q", 400_000), "needs at least 3,200,000 bytes"),
        "array element type": ((tokens.value_offset, "I", 99), "unknown array element type 99"),
        "value type": ((kv.type_offset, "I", 13), "unknown value type 13"),
        "dimension count": ((t0.dims_offset, "I", 9), "9 dimensions"),
        "dimension zero": ((t0.dims_offset + 4, "Q", 0), "each must be 1 to"),
        "dimension huge": ((t0.dims_offset + 4, "Q", 2 ** 50), "each must be 1 to"),
        "tensor type": ((t0.dims_offset + 4 + 8 * len(t0.dims), "I", 1234), "unknown tensor type 1234"),
        "offset past the end": ((t0.dims_offset + 8 + 8 * len(t0.dims), "Q", size), "end past the end of the file"),
        "offset misaligned": ((t0.dims_offset + 8 + 8 * len(t0.dims), "Q", 4), "not a multiple of the alignment"),
        "offset overlapping": ((r.tensors[1].dims_offset + 8 + 8 * len(r.tensors[1].dims), "Q", 0), "overlaps"),
        "version": ((4, "I", 1), "version 1"),
    }
    for name, (edit, msg) in cases.items():
        bad = patched(tiny_gguf, tmp_path / "b.gguf", edit)
        with pytest.raises(LowbitError, match=msg):
            read_header(bad)


def test_nested_arrays_are_bounded(tmp_path):
    def s(x):
        return struct.pack("<Q", len(x)) + x

    def file(value_type_and_value):
        head = b"GGUF" + struct.pack("<IQQ", 3, 0, 1)
        return head + s(b"k") + value_type_and_value

    inner = struct.pack("<IQ", C.UINT8, 1) + b"\x01"
    depth2 = struct.pack("<I", C.ARRAY) + struct.pack("<IQ", C.ARRAY, 1) + inner
    p = tmp_path / "n.gguf"
    p.write_bytes(file(depth2))
    assert read_header(p).kv["k"].count == 1
    depth3 = struct.pack("<I", C.ARRAY) + struct.pack("<IQ", C.ARRAY, 1) + struct.pack("<IQ", C.ARRAY, 1) + inner
    p.write_bytes(file(depth3))
    with pytest.raises(LowbitError, match="nested more than 2 deep"):
        read_header(p)


def test_array_limits(tmp_path):
    """Tokenizer arrays may hold a vocabulary (up to 2^19); other arrays 2^16; all of them 786,432 elements
    (gguf-py and transformers spend ~1.5 KB and ~150 us on each: 1M empty strings took 1.9 GB and 150 s)."""
    def file(*kvs):
        out = b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs))
        for key, n in kvs:
            out += struct.pack("<Q", len(key)) + key + struct.pack("<IIQ", C.ARRAY, C.UINT8, n) + b"\0" * n
        return out

    p = tmp_path / "a.gguf"
    p.write_bytes(file((b"tokenizer.ggml.scores", 70_000)))
    assert read_header(p).kv["tokenizer.ggml.scores"].count == 70_000
    p.write_bytes(file((b"junk", 70_000)))
    with pytest.raises(LowbitError, match="'junk': an array of 70,000 elements, more than the limit of 65,536"):
        read_header(p)
    p.write_bytes(file(*[(f"tokenizer.x{i}".encode(), 300_000) for i in range(3)]))
    with pytest.raises(LowbitError, match="more than 786,432 array elements in the metadata"):
        read_header(p)


def test_every_truncation_is_refused(tiny_gguf, tmp_path):
    data = tiny_gguf.read_bytes()
    p = tmp_path / "cut.gguf"
    header_end = read_header(tiny_gguf).data_start
    for n in [0, 3, 4, 7, 12, 20, 23, *range(24, header_end, 97), header_end, len(data) - 1]:
        p.write_bytes(data[:n])
        with pytest.raises(LowbitError, match=str(p)):
            read_header(p)


def test_cache_is_keyed_by_content_and_atomic(tiny_gguf, tmp_path, cache):
    from lowbit.formats.gguf.convert import gguf_cache_folder

    g = tmp_path / "m.gguf"
    g.write_bytes(tiny_gguf.read_bytes())
    m1, _ = lowbit.load(g)
    (first,) = cached(cache)
    # the same bytes, another edit: the weights change, size and mtime are restored -> a new conversion
    st = g.stat()
    h = read_header(g)
    emb = next(t for t in h.tensors if t.name == "token_embd.weight")
    data = bytearray(g.read_bytes())
    struct.pack_into("<f", data, h.data_start + emb.offset, 123.0)
    g.write_bytes(bytes(data))
    os.utime(g, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert g.stat().st_size == st.st_size and g.stat().st_mtime_ns == st.st_mtime_ns
    m2, _ = lowbit.load(g)
    assert m2.model.embed_tokens.weight[0, 0].item() == 123.0  # not the stale conversion
    assert m1.model.embed_tokens.weight[0, 0].item() != 123.0
    assert len(cached(cache)) == 2 and gguf_cache_folder(g).name in cached(cache)
    # a temporary folder a killed conversion left behind (538 MB for SmolLM2) is swept by the next load
    stale = cache / "gguf" / f".{first}.tmp-999999999-abcdefgh"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    legacy = cache / "gguf" / "old-0123456789abcdef.tmp-k3j4h5g6"  # an earlier version's, an hour old
    legacy.mkdir()
    os.utime(legacy, (time.time() - 7200, time.time() - 7200))
    lowbit.load(g)
    assert not stale.exists() and not legacy.exists() and len(cached(cache)) == 2


def test_unwritable_cache_is_one_error(cli, tiny_gguf, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setenv("LOWBIT_CACHE", str(blocker))
    code, _, err = cli("eval", tiny_gguf, "--limit-tokens", "64", "--seqlen", "32")
    lines = [l for l in err.splitlines() if l.startswith("lowbit: error:")]
    assert code == 2 and len(lines) == 1 and "cannot write" in lines[0], err
    assert blocker.read_text() == "x"
