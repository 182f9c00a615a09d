"""models/arch.py is the one architecture table: no other module spells LLaMA's layer names, and every
consumer (true-sequential GPTQ groups, AWQ clipping, scale mappings, the lean runtime and its skeleton,
GGUF export) follows an entry registered under another model_type with other names."""
from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest
import torch

from lowbit import api
from lowbit.core.config import QuantConfig
from lowbit.core.scheme import Scheme
from lowbit.models import arch as A
from lowbit.runtime.decoder import LeanDecoder
from lowbit.runtime.lean import LeanCausalLM, lean_config

from tests.conftest import make_tiny_llama, make_tokenizer

SRC = Path(__file__).resolve().parents[2] / "src" / "lowbit"
LLAMA_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "down_proj",
               "gate_up_proj", "embed_tokens", "lm_head", "model.layers", "model.norm", "input_layernorm",
               "post_attention_layernorm", "self_attn", "rotary_emb", "act_fn")
NAME = re.compile(r"(?<![A-Za-z0-9_])(" + "|".join(re.escape(n) for n in LLAMA_NAMES) + r")(?![A-Za-z0-9_])")


def name_literals(source: str) -> list[tuple[int, str]]:
    """(line, string) of every string constant that looks like a module name (no whitespace) and holds a
    LLaMA layer name; f-string parts included. Prose (docstrings, help texts) has spaces and is left alone."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if not re.search(r"\s", node.value) and NAME.search(node.value):
                out.append((node.lineno, node.value))
    return out


# literals that are a format's own keys, not module names
FORMAT_KEYS = {("formats/gptq_format.py", "lm_head")}  # GPTQ's quantization_config: "lm_head": false


def test_no_module_but_the_table_spells_llama_layer_names():
    bad = []
    for p in sorted(SRC.rglob("*.py")):
        if p == SRC / "models" / "arch.py":
            continue
        rel = str(p.relative_to(SRC))
        bad += [f"{rel}:{line}: {s!r}" for line, s in name_literals(p.read_text()) if (rel, s) not in FORMAT_KEYS]
    assert not bad, "layer names belong in models/arch.py's table:\n" + "\n".join(bad)


def test_the_scan_sees_names_in_any_string():
    src = 'x = ("q_proj", "k_proj")\ny = f"{a}.mlp.down_proj"\nz = "lm_head.weight"\n"""A docstring on lm_head."""\n'
    assert sorted(s for _, s in name_literals(src)) == [".mlp.down_proj", "k_proj", "lm_head.weight", "q_proj"]
    assert name_literals('w = "my_q_proj2"; h = "help: e.g. lm_head=8/-1"') == []


# -- a copy of the LLaMA entry under another model_type, with every name changed -------------------------------

MODEL = {"model.embed_tokens": "net.tok", "model.layers": "net.blocks", "model.norm": "net.norm_f",
         "model.rotary_emb": "net.rope", "lm_head": "out"}
BLOCK = {"input_layernorm": "ln1", "self_attn.q_proj": "attn.wq", "self_attn.k_proj": "attn.wk",
         "self_attn.v_proj": "attn.wv", "self_attn.o_proj": "attn.wo", "post_attention_layernorm": "ln2",
         "mlp.gate_proj": "ffn.w1", "mlp.up_proj": "ffn.w3", "mlp.down_proj": "ffn.w2", "mlp.act_fn": "ffn.act"}


def rename(name: str) -> str:
    """An HF LLaMA module or parameter name -> the toy's."""
    m = re.match(r"^model\.layers\.(\d+)\.(.+)$", name)
    if m:
        i, rest = m.groups()
        for old, new in BLOCK.items():
            if rest == old or rest.startswith(old + "."):
                return f"net.blocks.{i}.{new}{rest[len(old):]}"
        raise KeyError(name)
    for old, new in MODEL.items():
        if name == old or name.startswith(old + "."):
            return new + name[len(old):]
    raise KeyError(name)


def toy_arch() -> A.Arch:
    llama = A.ARCHITECTURES["llama"]
    d = llama.decoder
    layout = dataclasses.replace(
        d, embed=rename(d.embed), layers="net.blocks", final_norm=rename(d.final_norm), head=rename(d.head),
        rotary=rename(d.rotary), attn_norm=BLOCK[d.attn_norm], qkv=tuple(BLOCK[n] for n in d.qkv), o=BLOCK[d.o],
        mlp_norm=BLOCK[d.mlp_norm], gate_up=tuple(BLOCK[n] for n in d.gate_up), down=BLOCK[d.down], act=BLOCK[d.act])
    g = llama.gguf
    return A.Arch(
        blocks=r"^net\.blocks\.\d+$", linears=(r"attn\.w[qkvo]$", r"ffn\.w[123]$"),
        embeddings=tuple(rename(n) for n in llama.embeddings), head=tuple(rename(n) for n in llama.head),
        sequential=(("wq", "wk", "wv"), ("wo",), ("w1", "w3"), ("w2",)), awq_no_clip=("wq", "wk"),
        mappings=tuple(A.ScaleMapping(BLOCK[mp.prev], tuple(BLOCK[n] for n in mp.linears)) for mp in llama.mappings),
        decoder=layout,
        gguf=dataclasses.replace(g, tensors=tuple((rename(h), t) for h, t in g.tensors),
                                 block_tensors=tuple((BLOCK[h], t) for h, t in g.block_tensors)))


@pytest.fixture()
def toy(monkeypatch):
    """(HF LLaMA, the same weights in a model of type 'toyllama' built by the lean skeleton from the toy entry)."""
    monkeypatch.setitem(A.ARCHITECTURES, "toyllama", toy_arch())
    hf = make_tiny_llama()
    conf = hf.config.to_dict()
    conf.pop("model_type")
    model = LeanCausalLM(lean_config("toyllama", conf))
    sd = {rename(k): v for k, v in hf.state_dict().items()}
    model.load_state_dict(sd, strict=True, assign=True)
    return hf, model


def test_the_table_drives_block_discovery_groups_clipping_and_mappings(toy):
    hf, model = toy
    blocks = A.find_blocks(model)
    assert [n for n, _ in blocks] == [rename(n) for n, _ in A.find_blocks(hf)] == ["net.blocks.0", "net.blocks.1"]
    assert A.select_modules(model) == [rename(n) for n in A.select_modules(hf)]
    names = [n for n, _ in A.block_linears(model, *blocks[0])]
    hf_names = [n for n, _ in A.block_linears(hf, *A.find_blocks(hf)[0])]
    assert A.sequential_groups(model, names) == [[rename(n) for n in g] for g in A.sequential_groups(hf, hf_names)]
    assert len(A.sequential_groups(model, names)) == 4
    assert [A.awq_clips(model, n) for n in names] == [A.awq_clips(hf, n) for n in hf_names]
    assert [A.awq_clips(model, n) for n in names].count(False) == 2  # q and k
    got = [rel for _, rel in A.scale_mappings(model, blocks[0][1])]
    want = [[BLOCK[r] for r in rel] for _, rel in A.scale_mappings(hf, A.find_blocks(hf)[0][1])]
    assert got == want and got
    assert A.input_groups(model) and set(A.input_groups(model)) == {rename(n) for n in A.input_groups(hf)}


def test_the_lean_runtime_runs_the_toy_entry(toy):
    hf, model = toy
    assert "net" in dict(model.named_children()) and not hasattr(model, "model")
    ids = torch.arange(1, 13)
    for native in (False, None):
        a, b = LeanDecoder(hf, max_len=16, native=native), LeanDecoder(model, max_len=16, native=native)
        assert torch.equal(a.forward(ids[:6]), b.forward(ids[:6]))
        assert torch.equal(a.forward(ids[6:7]), b.forward(ids[6:7]))
    api.quantize(hf, QuantConfig(scheme=Scheme(8, True, "channel")))
    api.quantize(model, QuantConfig(scheme=Scheme(8, True, "channel")))
    a, b = LeanDecoder(hf, max_len=16), LeanDecoder(model, max_len=16)
    assert b.blocks[0].qkv.kind == a.blocks[0].qkv.kind == "w8"  # packed from the toy names too
    assert torch.equal(a.forward(ids), b.forward(ids))


def test_gguf_export_takes_names_and_permutation_from_the_table(toy, tmp_path):
    from gguf import GGUFReader

    from lowbit.formats.gguf.export import export_gguf

    hf, model = toy
    tok = make_tokenizer()
    export_gguf(hf, tok, tmp_path / "hf.gguf", "F32", progress=False)
    export_gguf(model, tok, tmp_path / "toy.gguf", "F32", progress=False)
    a = {t.name: t.data.copy() for t in GGUFReader(str(tmp_path / "hf.gguf")).tensors}
    b = {t.name: t.data.copy() for t in GGUFReader(str(tmp_path / "toy.gguf")).tensors}
    assert sorted(a) == sorted(b) and "blk.1.attn_q.weight" in a and "output.weight" not in a  # tied head dropped
    assert all((a[n] == b[n]).all() for n in a)


@pytest.mark.parametrize("model_type", [t for t, a in A.ARCHITECTURES.items() if a.gguf is not None])
def test_gguf_names_are_gguf_pys(model_type):
    """The table's HF -> GGUF names agree with gguf-py's own map (llama.cpp's converter)."""
    import gguf
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(cfg)
    arch = A.arch_of(model)
    enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch.gguf.arch)
    tmap = gguf.get_tensor_name_map(enum, 2)
    names = [n for n, _ in model.named_parameters()]
    assert {n: arch.gguf_name(n) for n in names} == {n: tmap.get_name(n, try_suffixes=(".weight", ".bias")) for n in names}


def test_unknown_architectures_keep_the_generic_fallback(tiny):
    import copy

    model, _ = tiny
    other = copy.deepcopy(model)
    other.config.model_type = "somethingelse"
    assert A.arch_of(other) is A.GENERIC and A.decoder_layout(other) is None
    assert [n for n, _ in A.find_blocks(other)] == [n for n, _ in A.find_blocks(model)]
    block = A.find_blocks(other)[0]
    names = [n for n, _ in A.block_linears(other, *block)]
    assert len(A.sequential_groups(other, names)) == 4 and A.scale_mappings(other, block[1]) == []
