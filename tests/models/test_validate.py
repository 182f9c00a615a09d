"""models/validate.py: hostile checkpoints and model folders are refused with one line before anything is
built, allocated, run or handed to C (issue 24). Every malicious input is made from the tiny model."""
import hashlib
import json
import os
import time

import pytest

from lowbit.core.state import state_of
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import lowbit
from lowbit import QuantConfig, Scheme
from lowbit.errors import LowbitError
from lowbit.formats.checkpoint import WEIGHTS, table_sha256
from lowbit.api import load
from tests.conftest import make_tiny_llama, make_tokenizer


def tensors(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def rewrite(ckpt, edit_tensors=None, edit_qc=None, edit_conf=None):
    """Change a lowbit checkpoint as an attacker would: the tensors (the recorded sha256 recomputed, as
    checkpoint.py computes it), the quantization table, the config."""
    w = ckpt / WEIGHTS
    if edit_tensors is not None:
        t = tensors(w)
        edit_tensors(t)
        save_file(t, str(w), metadata={"format": "pt"})
    conf = json.loads((ckpt / "config.json").read_text())
    conf["quantization_config"]["weights_sha256"] = hashlib.sha256(w.read_bytes()).hexdigest()
    if edit_qc is not None:
        edit_qc(conf["quantization_config"])
    if edit_conf is not None:
        edit_conf(conf)
    qc = conf.get("quantization_config")
    if isinstance(qc, dict):
        qc["table_sha256"] = table_sha256(qc)  # as checkpoint.py computes it: the checks behind it are tested
    (ckpt / "config.json").write_text(json.dumps(conf))


@pytest.fixture()
def ckpt(tmp_path):
    """The tiny LLaMA (hidden 72, GQA 4/2, tied) quantized W4 g32 asymmetric, saved as a lowbit checkpoint."""
    model, tok = make_tiny_llama(), make_tokenizer()
    lowbit.quantize(model, QuantConfig(scheme=Scheme(4, False, "group", 32)))
    return lowbit.save(model, tok, tmp_path / "ckpt")


def hf_folder(tmp_path, name="hf"):
    d = tmp_path / name
    make_tiny_llama().save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    return d


LEAN = pytest.mark.parametrize("lean", [False, True], ids=["eager", "lean"])
Q = "model.layers.0.self_attn.k_proj"  # 36 x 72: qweight [36, 36] uint8, scales [36, 3] float16


def refused(path, match, **kw):
    with pytest.raises(LowbitError, match=match) as e:
        load(path, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


# ---- aliases, dtypes, shapes, missing and unexpected tensors of lowbit checkpoints -----------------------------

@LEAN
def test_alias_to_a_tensor_of_another_shape_is_refused(ckpt, lean):
    """The heap overflow: model.norm.weight (72 floats) taken out of the file and aliased to a 36-float tensor."""
    rewrite(ckpt, edit_tensors=lambda t: t.pop("model.norm.weight"),
            edit_qc=lambda qc: qc["aliases"].update({"model.norm.weight": f"{Q}.scales"}))
    refused(ckpt, r"alias model\.norm\.weight -> .*k_proj\.scales: model\.norm\.weight is torch\.float32 \[72\]",
            lean=lean)


@LEAN
def test_alias_of_packed_codes_to_a_small_buffer_is_refused(ckpt, lean):
    rewrite(ckpt, edit_tensors=lambda t: t.pop(f"{Q}.qweight"),
            edit_qc=lambda qc: qc["aliases"].update({f"{Q}.qweight": "model.norm.weight"}))
    refused(ckpt, r"alias .*k_proj\.qweight -> model\.norm\.weight", lean=lean)


@pytest.mark.parametrize("alias,match", [
    ({"model.norm.weight": "model.layers.1.input_layernorm.weight"}, "model.norm.weight is stored too"),
    ({"lm_head.weight": "model.nothing.weight"}, "the model has no tensor model.nothing.weight"),
    ({"lm_head.weight": "lm_head.weight"}, "lm_head.weight is not stored"),
])
def test_aliases_only_to_stored_tensors_of_the_model(ckpt, alias, match):
    rewrite(ckpt, edit_qc=lambda qc: qc["aliases"].update(alias))
    refused(ckpt, match)


def test_an_alias_between_tensors_of_one_shape_and_dtype_still_loads(ckpt):
    """What the saver writes (a tied head) and any alias of the same kind load as before."""
    conf = json.loads((ckpt / "config.json").read_text())
    assert conf["quantization_config"]["aliases"] == {"lm_head.weight": "model.embed_tokens.weight"}
    rewrite(ckpt, edit_tensors=lambda t: t.pop("model.norm.weight"),
            edit_qc=lambda qc: qc["aliases"].update({"model.norm.weight": "model.layers.1.input_layernorm.weight"}))
    model, _ = load(ckpt)
    assert model.model.norm.weight is model.model.layers[1].input_layernorm.weight


@LEAN
@pytest.mark.parametrize("name,dtype", [("qweight", torch.int8), ("qweight", torch.bool), ("scales", torch.int16),
                                        ("scales", torch.float32), ("qzeros", torch.int8)])
def test_wrong_dtypes_of_packed_tensors_are_refused(ckpt, lean, name, dtype):
    rewrite(ckpt, edit_tensors=lambda t: t.update({f"{Q}.{name}": t[f"{Q}.{name}"].to(dtype)}))
    refused(ckpt, rf"k_proj\.{name}: stored as \w+, the model needs torch\.", lean=lean)


@LEAN
@pytest.mark.parametrize("name,shape", [("qweight", (36, 4)), ("scales", (36, 2)), ("qzeros", (36, 1)),
                                        ("qweight", (1, 36 * 36))])
def test_wrong_shapes_of_packed_tensors_are_refused(ckpt, lean, name, shape):
    def edit(t):
        old = t[f"{Q}.{name}"]
        t[f"{Q}.{name}"] = torch.zeros(shape, dtype=old.dtype)

    rewrite(ckpt, edit_tensors=edit)
    refused(ckpt, rf"k_proj\.{name}: stored as \w+ \[{shape[0]}, {shape[1]}\], the model needs shape", lean=lean)


@LEAN
def test_a_zero_point_table_of_another_length_is_refused(ckpt, lean):
    """qzeros is one packed row per module ([ceil(R*G/8)*bits] bytes): one byte short is refused by name."""
    def edit(t):
        old = t[f"{Q}.qzeros"]
        assert old.dim() == 1
        t[f"{Q}.qzeros"] = old[:-1].clone()

    rewrite(ckpt, edit_tensors=edit)
    refused(ckpt, r"k_proj\.qzeros: stored as \w+ \[\d+\], the model needs shape", lean=lean)


@LEAN
def test_a_missing_tensor_is_an_error_not_a_random_init(ckpt, lean):
    rewrite(ckpt, edit_tensors=lambda t: t.pop(f"{Q}.scales"))
    refused(ckpt, r"k_proj\.scales: missing", lean=lean)


@LEAN
def test_an_unexpected_tensor_is_refused(ckpt, lean):
    rewrite(ckpt, edit_tensors=lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(4)}))
    refused(ckpt, r"model\.layers\.0\.extra\.weight: unexpected tensor", lean=lean)


def test_float_tensors_in_mixed_dtypes_are_refused(ckpt):
    rewrite(ckpt, edit_tensors=lambda t: t.update({"model.norm.weight": t["model.norm.weight"].half()}))
    refused(ckpt, r"float tensors stored in several dtypes \(F16, F32\)")


@LEAN
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_scales_are_refused(ckpt, lean, value):
    def edit(t):
        t[f"{Q}.scales"][3, 1] = value

    rewrite(ckpt, edit_tensors=edit)
    refused(ckpt, r"k_proj\.scales: NaN or Inf", lean=lean)


def test_layer_table_naming_a_module_that_is_not_a_linear_is_refused(ckpt):
    rewrite(ckpt, edit_qc=lambda qc: qc["layers"].update({"model.norm": {"kind": "linear"}}))
    refused(ckpt, r"layer table: 'model\.norm' is not a float linear")


# ---- config bombs ----------------------------------------------------------------------------------------------

@LEAN
def test_twenty_thousand_layers_are_refused_before_anything_is_built(ckpt, lean):
    rewrite(ckpt, edit_conf=lambda c: c.update(num_hidden_layers=20000))
    t0 = time.perf_counter()
    msg = refused(ckpt, r"config\.json: num_hidden_layers: 20000 exceeds lowbit's limit of 1024", lean=lean)
    assert time.perf_counter() - t0 < 5, msg


@pytest.mark.parametrize("field,value,match", [
    ("num_hidden_layers", 3, r"num_hidden_layers is 3, but the weights hold 2 layers \(no model\.layers\.2\)"),
    ("num_hidden_layers", 1, r"num_hidden_layers is 1, but the weights hold 2 layers \(model\.layers\.1 beyond"),
    ("hidden_size", 80, r"hidden_size is 80, but model\.embed_tokens\.weight is \[320, 72\]"),
    ("vocab_size", 400, r"vocab_size is 400, but model\.embed_tokens\.weight has 320 rows"),
    ("vocab_size", 10 ** 12, r"vocab_size: 1000000000000 exceeds lowbit's limit"),
    ("num_attention_heads", 5, r"num_attention_heads 5 is not a multiple of num_key_value_heads 2"),
    ("num_key_value_heads", 0, r"num_key_value_heads: 0 is not a positive integer"),
    ("intermediate_size", "160", r"intermediate_size: '160' is not a positive integer"),
    ("max_position_embeddings", 1 << 40, r"max_position_embeddings: \d+ exceeds lowbit's limit"),
    ("rms_norm_eps", "1e-6", r"rms_norm_eps: '1e-6' is not a positive number"),
    ("rope_theta", -1.0, r"rope_theta: -1.0 is not a positive number"),
    ("rope_parameters", {"rope_type": "default", "rope_theta": float("nan")}, r"rope_parameters\.rope_theta: nan"),
])
def test_config_sizes_are_checked_against_limits_and_the_tensor_table(ckpt, field, value, match):
    rewrite(ckpt, edit_conf=lambda c: c.update({field: value}))
    refused(ckpt, match)


def test_heads_must_divide_the_width(ckpt):
    def edit(c):
        c.update(num_attention_heads=7, num_key_value_heads=7)
        c.pop("head_dim", None)

    rewrite(ckpt, edit_conf=edit)
    refused(ckpt, r"hidden_size 72 is not a multiple of num_attention_heads 7")


# ---- custom code -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["config", "tokenizer"])
def test_auto_map_is_refused_in_checkpoints_and_hf_folders(ckpt, tmp_path, where):
    for folder in (ckpt, hf_folder(tmp_path)):
        f = folder / ("config.json" if where == "config" else "tokenizer_config.json")
        c = json.loads(f.read_text())
        c["auto_map"] = {"AutoModelForCausalLM": "evil.Model", "AutoTokenizer": ["evil.Tok", None]}
        f.write_text(json.dumps(c))
        (folder / "evil.py").write_text("raise SystemExit('custom code ran')\n")
        for kw in ({}, {"lazy": True}):
            refused(folder, rf"{f.name}: auto_map: the model needs custom code from its folder, which lowbit never runs",
                    **kw)


def test_unknown_model_type_is_refused(ckpt, tmp_path):
    rewrite(ckpt, edit_conf=lambda c: c.update(model_type="evilllama"))
    refused(ckpt, r"model_type 'evilllama' is not one transformers knows: the model needs custom code")
    hf = hf_folder(tmp_path)
    c = json.loads((hf / "config.json").read_text())
    c["model_type"] = "evilllama"
    (hf / "config.json").write_text(json.dumps(c))
    refused(hf, r"model_type 'evilllama'")


# ---- Hugging Face folders: missing weights, paths, lazy reading ------------------------------------------------

@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
def test_hf_folder_with_a_missing_weight_is_an_error_not_a_random_init(tmp_path, lazy, capfd):
    d = hf_folder(tmp_path)
    t = tensors(d / "model.safetensors")
    t.pop("model.layers.1.mlp.up_proj.weight")
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    capfd.readouterr()
    refused(d, r"model\.layers\.1\.mlp\.up_proj\.weight", lazy=lazy)
    assert "LOAD REPORT" not in capfd.readouterr().err  # one line: transformers' report is not printed


@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
def test_hf_folder_with_an_unexpected_weight_is_refused(tmp_path, lazy):
    d = hf_folder(tmp_path)
    t = tensors(d / "model.safetensors")
    t["model.layers.0.mlp.extra.weight"] = torch.zeros(3)
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    refused(d, r"model\.layers\.0\.mlp\.extra\.weight", lazy=lazy)


def test_checkpoint_without_quantization_config_is_refused(ckpt):
    """It used to load through transformers with every quantized linear at a random init (ppl ~ 330)."""
    conf = json.loads((ckpt / "config.json").read_text())
    del conf["quantization_config"]
    (ckpt / "config.json").write_text(json.dumps(conf))
    for kw in ({}, {"lazy": True}):
        refused(ckpt, r"holds lowbit\.safetensors .*but config\.json has no lowbit quantization_config", **kw)


def test_pickled_weights_are_never_read(tmp_path):
    d = hf_folder(tmp_path)
    os.remove(d / "model.safetensors")
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not read")
    refused(d, r"no model\.safetensors \(lowbit reads safetensors weights only; it never unpickles \.bin files\)")


def shard(d, names_to_file):
    """Move the folder's weights into an index whose weight_map names the given file(s)."""
    t = tensors(d / "model.safetensors")
    os.remove(d / "model.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        k: names_to_file for k in t}}))
    return t


@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_index_paths_stay_inside_the_model_folder(tmp_path, lazy, how):
    d = hf_folder(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    t = tensors(d / "model.safetensors")
    save_file(t, str(outside / "w.safetensors"), metadata={"format": "pt"})
    name = {"dotdot": "../outside/w.safetensors", "absolute": str(outside / "w.safetensors"),
            "symlink": "link.safetensors"}[how]
    if how == "symlink":
        os.symlink(outside / "w.safetensors", d / "link.safetensors")
    shard(d, name)
    match = "is a link to .*outside the model folder" if how == "symlink" else "points outside the model folder"
    refused(d, rf"model\.safetensors\.index\.json: '.*' {match}", lazy=lazy)


@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
@pytest.mark.parametrize("name", ["a" * 5000, "d/" + "b" * 300 + ".safetensors"], ids=["5000", "component-300"])
def test_index_file_names_longer_than_the_file_system_allows_are_refused(tmp_path, lazy, name):
    """Fuzz finding: a 5,000-character name in weight_map raised OSError ENAMETOOLONG (exit 1)."""
    d = hf_folder(tmp_path)
    shard(d, name)
    refused(d, r"model\.safetensors\.index\.json: '.*'\.\.\. is not a file name \(longer than the file system allows\)",
            lazy=lazy)


def test_a_sharded_folder_inside_itself_still_loads(tmp_path):
    d = hf_folder(tmp_path)
    t = tensors(d / "model.safetensors")
    ref, _ = load(d)
    save_file(t, str(d / "part.safetensors"), metadata={"format": "pt"})
    shard(d, "part.safetensors")
    for kw in ({}, {"lazy": True}):
        m, _ = load(d, **kw)
        if kw:
            state_of(m).lazy.materialize(m)
        assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), ref.state_dict().values()))


def test_model_safetensors_linked_from_outside_is_refused(tmp_path):
    d = hf_folder(tmp_path)
    outside = tmp_path / "elsewhere.safetensors"
    os.replace(d / "model.safetensors", outside)
    os.symlink(outside, d / "model.safetensors")
    refused(d, "is a link to .*outside the model folder")


def test_lazy_load_checks_shapes_against_the_skeleton(tmp_path):
    """A header giving model.norm.weight a wrong shape used to pass the lazy load and RTN wrote a checkpoint
    that could not be loaded: now the lazy load itself refuses it."""
    d = hf_folder(tmp_path)
    t = tensors(d / "model.safetensors")
    t["model.norm.weight"] = torch.ones(64)
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    refused(d, r"model\.norm\.weight: stored as F32 \[64\], the model needs shape \[72\]", lazy=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
def test_hf_config_bomb_is_refused_quickly(tmp_path, lazy):
    d = hf_folder(tmp_path)
    c = json.loads((d / "config.json").read_text())
    for field, value in (("num_hidden_layers", 20000), ("num_hidden_layers", 900)):
        c[field] = value
        (d / "config.json").write_text(json.dumps(c))
        t0 = time.perf_counter()
        refused(d, r"config\.json: num_hidden_layers", lazy=lazy)
        assert time.perf_counter() - t0 < 5


def test_huge_config_json_is_refused(tmp_path):
    from lowbit.models import validate

    d = hf_folder(tmp_path)
    (d / "config.json").write_bytes(b"{" + b" " * (validate.MAX_JSON_BYTES + 1))
    refused(d, r"config\.json: larger than 64 MiB")


def test_token_ids_beyond_the_embedding_are_refused(tmp_path):
    """A tokenizer.json with more tokens than the model's vocab_size: one line, not an IndexError in a forward."""
    d = hf_folder(tmp_path)
    tok = make_tokenizer()
    tok.add_tokens([f"zz{i}" for i in range(40)])  # ids 300..339, the model has 320 embeddings
    tok.save_pretrained(d)
    model, tok = load(d)
    with pytest.raises(LowbitError, match="the tokenizer gives token id 33\\d, but the model has 320 embeddings"):
        lowbit.generate(model, tok, "a zz39", max_new_tokens=2)
    with pytest.raises(LowbitError, match="but the model has 320 embeddings"):
        lowbit.evaluate(model, tok, text="zz39 " * 64, seqlen=16, progress=False)


@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
def test_buffers_old_checkpoints_hold_load_as_transformers_loads_them(tmp_path, lazy):
    """Per-layer rotary_emb.inv_freq of older LLaMA checkpoints: transformers drops them, so does the lazy load."""
    d = hf_folder(tmp_path)
    t = tensors(d / "model.safetensors")
    t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(9)
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    model, _ = load(d, lazy=lazy)
    if lazy:
        state_of(model).lazy.materialize(model)
    assert not any(p.is_meta for p in model.parameters())


def test_positions_are_bounded_and_checked_against_a_learned_position_table(tmp_path):
    """GPT-2 style models: the config's positions against wpe's rows; GPT-Neo style models, whose every layer
    holds a positions x positions mask, within a tighter limit."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    d = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=320, n_positions=64, n_embd=32, n_layer=2, n_head=2)).save_pretrained(d)
    assert load(d)[0].config.n_positions == 64
    c = json.loads((d / "config.json").read_text())
    for value, match in ((100000, r"n_positions is 100000, but transformer\.wpe\.weight has 64 rows"),
                         (1 << 30, r"n_positions: 1073741824 exceeds lowbit's limit of 1048576")):
        (d / "config.json").write_text(json.dumps({**c, "n_positions": value}))
        refused(d, match)
    (d / "config.json").write_text(json.dumps({**c, "model_type": "gpt_neo", "max_position_embeddings": 65536}))
    refused(d, r"max_position_embeddings: 65536 exceeds lowbit's limit of 8192 for gpt_neo")
