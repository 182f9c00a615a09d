import json
import os

import pytest
import torch

import lowbit
from lowbit import QuantConfig, Scheme
from lowbit.core.state import state_of
from lowbit.errors import LowbitError
from lowbit.nn.qlinear import QuantLinear


@pytest.mark.parametrize("scheme", [Scheme(4, True, "group", 32), Scheme(3, False, "group", 32),
                                    Scheme(8, True, "channel"), Scheme(2, False, "group", 64)],
                         ids=lambda s: s.describe())
def test_golden_round_trip_bitwise(tiny, tmp_path, scheme):
    """quantize -> save -> load gives bitwise identical logits (tiny LLaMA, hidden 72: short last group)."""
    model, tok = tiny
    lowbit.quantize(model, QuantConfig(scheme=scheme, seed=7))
    x = torch.randint(0, 320, (2, 24))
    before = model(x).logits
    lowbit.save(model, tok, tmp_path / "ckpt")
    loaded, tok2 = lowbit.load(tmp_path / "ckpt")
    assert torch.equal(loaded(x).logits, before)
    assert tok2 is not None and tok2("fox").input_ids == tok("fox").input_ids
    conf = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    qc = conf["quantization_config"]
    assert qc["quant_method"] == "lowbit" and qc["method"] == "rtn" and qc["seed"] == 7
    assert qc["scheme"] == scheme.to_dict() and "lowbit_version" in qc
    assert set(qc["layers"]) == set(state_of(model).quant.modules)
    assert state_of(loaded).quant.config.scheme == scheme


def test_round_trip_with_quantized_head(tiny, tmp_path):
    model, tok = tiny
    lowbit.quantize(model, QuantConfig(scheme=Scheme(4, False, "group", 16), include=("layers", "lm_head", "embed")))
    x = torch.randint(0, 320, (1, 10))
    before = model(x).logits
    lowbit.save(model, tok, tmp_path / "c")
    loaded, _ = lowbit.load(tmp_path / "c")
    assert isinstance(loaded.lm_head, QuantLinear)
    assert torch.equal(loaded(x).logits, before)


def test_tied_weights_stored_once(tiny, tmp_path):
    model, tok = tiny
    lowbit.quantize(model, QuantConfig(scheme=Scheme(4, True, "group", 32)))
    lowbit.save(model, tok, tmp_path / "c")
    loaded, _ = lowbit.load(tmp_path / "c")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_save_is_atomic_and_refuses_existing(tiny, tmp_path):
    model, tok = tiny
    lowbit.quantize(model, QuantConfig(scheme=Scheme(4, True, "group", 32)))
    out = tmp_path / "c"
    lowbit.save(model, tok, out)
    with pytest.raises(LowbitError, match="exists"):
        lowbit.save(model, tok, out)
    lowbit.save(model, tok, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no temp folders left


def test_failed_save_leaves_nothing(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    lowbit.quantize(model, QuantConfig(scheme=Scheme(4, True, "group", 32)))

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(tok, "save_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        lowbit.save(model, tok, tmp_path / "c")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage", ["truncate", "flip", "config", "missing"])
def test_corrupt_checkpoint_refused(tiny, tmp_path, damage):
    model, tok = tiny
    lowbit.quantize(model, QuantConfig(scheme=Scheme(4, True, "group", 32)))
    out = tmp_path / "c"
    lowbit.save(model, tok, out)
    w = out / "lowbit.safetensors"
    if damage == "truncate":
        data = w.read_bytes()
        w.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        data = bytearray(w.read_bytes())
        data[-100] ^= 0xFF
        w.write_bytes(bytes(data))
    elif damage == "config":
        (out / "config.json").write_text('{"quantization_config": {"quant_method": "lowbit"')
    else:
        os.remove(w)
    with pytest.raises(LowbitError, match=str(out)):
        lowbit.load(out)


def test_failed_save_into_new_folders_leaves_nothing(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    lowbit.quantize(model, QuantConfig(scheme=Scheme(4, True, "group", 32)))
    monkeypatch.setattr(tok, "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("disk full")))
    with pytest.raises(RuntimeError):
        lowbit.save(model, tok, tmp_path / "a" / "b" / "c")
    assert list(tmp_path.iterdir()) == []


def test_tied_head_and_embedding_quantized_alike_share_their_codes(tiny, tmp_path):
    model, tok = tiny
    assert model.lm_head.weight is model.model.embed_tokens.weight
    lowbit.quantize(model, QuantConfig(scheme=Scheme(4, True, "group", 32),
                                       overrides={"lm_head|embed_tokens": Scheme(8, True, "channel")}))
    head, emb = model.lm_head, model.model.embed_tokens
    assert head.qweight is emb.qweight and head.scales is emb.scales  # one copy in memory
    x = torch.randint(0, 320, (1, 10))
    before = model(x).logits
    lowbit.save(model, tok, tmp_path / "c")
    conf = json.loads((tmp_path / "c" / "config.json").read_text())
    assert conf["quantization_config"]["aliases"]["lm_head.qweight"] == "model.embed_tokens.qweight"
    loaded, _ = lowbit.load(tmp_path / "c")
    assert loaded.lm_head.qweight.data_ptr() == loaded.model.embed_tokens.qweight.data_ptr()
    assert torch.equal(loaded(x).logits, before)


def _saved(tiny, tmp_path):
    m, tok = tiny
    lowbit.quantize(m, QuantConfig(method="rtn", scheme=Scheme(4, False, "group", 32)))
    lowbit.save(m, tok, tmp_path / "q")
    return tmp_path / "q"


def test_a_scheme_edited_in_place_is_refused(tiny, tmp_path):
    """Fuzz finding: group_size 32 -> 33 keeps the scales' shape (ceil(72/33) = ceil(72/32)) and loaded as other
    weights with exit 0; the table's checksum refuses it."""
    q = _saved(tiny, tmp_path)
    conf = json.loads((q / "config.json").read_text())
    conf["quantization_config"]["scheme"]["group_size"] = 33
    (q / "config.json").write_text(json.dumps(conf))
    with pytest.raises(LowbitError, match=r"quantization_config does not match its checksum \(table_sha256\)"):
        lowbit.load(q)


@pytest.mark.parametrize("value", ["0.01", float("nan"), -1.0, True, [0.1]])
def test_a_bad_rel_error_is_refused(tiny, tmp_path, value):
    """Fuzz finding: a string rel_error loaded, then `inspect` failed formatting it (exit 1)."""
    from lowbit.formats.checkpoint import table_sha256

    q = _saved(tiny, tmp_path)
    conf = json.loads((q / "config.json").read_text())
    qc = conf["quantization_config"]
    qc["layers"][next(iter(qc["layers"]))]["rel_error"] = value
    qc["table_sha256"] = table_sha256(qc)
    (q / "config.json").write_text(json.dumps(conf))
    with pytest.raises(LowbitError, match="rel_error of .* not a finite number"):
        lowbit.load(q)


def _to_legacy_zero_layout(q, edit=None):
    """Rewrite checkpoint q as lowbit wrote it before the flat zero-point layout: qzeros [R, ceil(G/8)*bits],
    no zero_point_layout entry (checksums recomputed). `edit(tensors, qc)` may change it further."""
    import hashlib

    from safetensors import safe_open
    from safetensors.torch import save_file

    from lowbit.core.packing import pack, unpack_zero_points
    from lowbit.formats.checkpoint import WEIGHTS, table_sha256

    with safe_open(str(q / WEIGHTS), framework="pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
    conf = json.loads((q / "config.json").read_text())
    qc = conf["quantization_config"]
    assert qc.pop("zero_point_layout") == "flat"
    for k in [k for k in t if k.endswith(".qzeros")]:
        name = k.removesuffix(".qzeros")
        bits = Scheme.from_dict(qc["layers"][name].get("scheme", qc["scheme"])).bits
        r, g = t[name + ".scales"].shape
        assert t[k].dim() == 1
        t[k] = pack(unpack_zero_points(t[k], bits, r, g), bits)  # one packed row per weight row
    if edit is not None:
        edit(t, qc)
    save_file(t, str(q / WEIGHTS), metadata={"format": "pt"})
    qc["weights_sha256"] = hashlib.sha256((q / WEIGHTS).read_bytes()).hexdigest()
    qc["table_sha256"] = table_sha256(qc)
    (q / "config.json").write_text(json.dumps(conf))


@pytest.mark.parametrize("tied", [False, True], ids=["layers", "tied-head-and-embedding"])
def test_checkpoints_with_per_row_zero_points_still_load(tiny, tmp_path, tied):
    """Checkpoints written before the flat zero-point layout stored qzeros as one packed row per weight row
    ([R, ceil(G/8)*bits]) and no zero_point_layout entry: they load into the same logits, repacked flat (a
    tied pair still shares one tensor)."""
    model, tok = tiny
    over = {"lm_head|embed_tokens": Scheme(4, False, "group", 16)} if tied else {}
    lowbit.quantize(model, QuantConfig(scheme=Scheme(3, False, "group", 32), overrides=over,
                                       include=("layers", "lm_head", "embed") if tied else ("layers",)))
    x = torch.randint(0, 320, (1, 12))
    before = model(x).logits
    q = lowbit.save(model, tok, tmp_path / "q")
    _to_legacy_zero_layout(q)
    loaded, _ = lowbit.load(q)
    assert torch.equal(loaded(x).logits, before)
    qlin = loaded.model.layers[0].self_attn.k_proj
    assert qlin.qzeros.dim() == 1 and torch.equal(qlin.zero_points(), model.model.layers[0].self_attn.k_proj.zero_points())
    if tied:
        assert loaded.lm_head.qzeros.data_ptr() == loaded.model.embed_tokens.qzeros.data_ptr()


def test_a_legacy_zero_table_shared_by_modules_of_other_sizes_is_refused(tiny, tmp_path):
    """Review finding: the embedding at g16 (5 groups of 72 columns) and the head at g32 (3 groups) both stored
    [320, 4] bytes per-row, so an alias between them passed the shape check; repacked flat they need 800 and
    480 bytes. Refused at load, not a ValueError at the first forward."""
    model, tok = tiny
    lowbit.quantize(model, QuantConfig(scheme=Scheme(4, False, "group", 32), include=("lm_head", "embed"),
                                       overrides={"embed_tokens": Scheme(4, False, "group", 16)}))
    q = lowbit.save(model, tok, tmp_path / "q")

    def alias(t, qc):
        assert t["model.embed_tokens.qzeros"].shape == t["lm_head.qzeros"].shape == (320, 4)
        del t["lm_head.qzeros"]
        qc["aliases"]["lm_head.qzeros"] = "model.embed_tokens.qzeros"

    _to_legacy_zero_layout(q, alias)
    with pytest.raises(LowbitError, match=r"(lm_head|embed_tokens)\.qzeros is shared with a module of another zero-point"):
        lowbit.load(q)


def test_an_unknown_zero_point_layout_is_refused(tiny, tmp_path):
    q = _saved(tiny, tmp_path)
    from lowbit.formats.checkpoint import table_sha256

    conf = json.loads((q / "config.json").read_text())
    conf["quantization_config"]["zero_point_layout"] = "columns"
    conf["quantization_config"]["table_sha256"] = table_sha256(conf["quantization_config"])
    (q / "config.json").write_text(json.dumps(conf))
    with pytest.raises(LowbitError, match="unknown zero_point_layout 'columns'"):
        lowbit.load(q)
