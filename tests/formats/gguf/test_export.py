"""GGUF export: a tiny LLaMA written in every type, read back with gguf-py, and (when llama-cpp-python is
installed) loaded, scored and run by llama.cpp itself."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from gguf.quants import dequantize

from lowbit.eval import llama_cpp as L
from lowbit.formats.gguf.export import export_gguf, permute_qk
from lowbit.formats.gguf.mixtures import FILE_TYPES, TensorInfo, choose_types

from tests.conftest import make_tokenizer

needs_llama_cpp = pytest.mark.skipif(not L.available(), reason="llama-cpp-python is not installed "
                                     "(pip install llama-cpp-python) - llama.cpp loading tests skipped")


def gguf_llama(seed: int = 0):
    """2 layers, hidden 256 (so the K-quants apply), GQA 4/2, vocab 320, tied embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, eos_token_id=0, bos_token_id=0, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def tiny_gguf_model():
    return gguf_llama(), make_tokenizer()


def read(path):
    r = GGUFReader(str(path))
    return r, {t.name: t for t in r.tensors}


def test_f32_export_round_trips_every_tensor(tiny_gguf_model, tmp_path):
    model, tok = tiny_gguf_model
    out = tmp_path / "m.gguf"
    res = export_gguf(model, tok, out, "F32", progress=False)
    assert res["bpw"] == 32.0 and out.stat().st_size == res["bytes"]
    r, ts = read(out)
    sd = model.state_dict()
    q = dequantize(ts["blk.1.attn_q.weight"].data, ts["blk.1.attn_q.weight"].tensor_type)
    assert np.array_equal(q, permute_qk(sd["model.layers.1.self_attn.q_proj.weight"], 4).numpy())
    k = dequantize(ts["blk.0.attn_k.weight"].data, ts["blk.0.attn_k.weight"].tensor_type)
    assert np.array_equal(k, permute_qk(sd["model.layers.0.self_attn.k_proj.weight"], 2).numpy())
    v = dequantize(ts["blk.0.ffn_down.weight"].data, ts["blk.0.ffn_down.weight"].tensor_type)
    assert np.array_equal(v, sd["model.layers.0.mlp.down_proj.weight"].numpy())
    assert "output.weight" not in ts  # tied: llama.cpp reuses token_embd
    f = r.fields
    assert f["general.architecture"].contents() == "llama"
    assert f["llama.attention.head_count_kv"].contents() == 2
    assert f["llama.rope.dimension_count"].contents() == 64
    assert f["tokenizer.ggml.model"].contents() == "gpt2"
    assert len(f["tokenizer.ggml.tokens"].contents()) == 320
    assert len(f["tokenizer.ggml.merges"].contents()) > 0


def test_permutation_is_llama_cpp_interleaving():
    """Per head, HF keeps the rotary pairs as two halves (i, i + d/2); GGUF interleaves them (2i, 2i+1)."""
    d = 8
    w = torch.arange(2 * d, dtype=torch.float32)[:, None]  # 2 heads of 8 rows
    p = permute_qk(w, 2).flatten().tolist()
    assert p[:8] == [0, 4, 1, 5, 2, 6, 3, 7]
    assert p[8:] == [8, 12, 9, 13, 10, 14, 11, 15]


@pytest.mark.parametrize("ftype", list(FILE_TYPES))
def test_every_type_writes_the_chosen_types_and_round_trips(tiny_gguf_model, tmp_path, ftype):
    model, tok = tiny_gguf_model
    out = tmp_path / f"{ftype}.gguf"
    res = export_gguf(model, tok, out, ftype, progress=False)
    _, ts = read(out)
    infos = [TensorInfo(n, tuple(int(s) for s in reversed(t.shape.tolist()))) for n, t in ts.items()]
    want = choose_types(infos, ftype, 2, 2)
    assert {n: t.tensor_type.name for n, t in ts.items()} == want
    w = model.state_dict()["model.layers.0.mlp.down_proj.weight"].numpy()
    t = ts["blk.0.ffn_down.weight"]
    back = dequantize(t.data, t.tensor_type).reshape(w.shape)
    assert np.sqrt(((back - w) ** 2).mean()) / w.std() < 0.45
    assert res["bytes"] == out.stat().st_size


def test_mixture_rules_for_smollm2_shapes():
    """SmolLM2-135M (30 layers, hidden 576, ffn 1536, GQA 9/3, tied): the per-tensor types llama.cpp's
    quantizer chose for Q4_K_M on the same file (checked against llama_model_quantize)."""
    infos = [TensorInfo("token_embd.weight", (49152, 576)), TensorInfo("output_norm.weight", (576,))]
    for i in range(30):
        infos += [TensorInfo(f"blk.{i}.{n}.weight", s) for n, s in (
            ("attn_norm", (576,)), ("ffn_norm", (576,)), ("attn_q", (576, 576)), ("attn_k", (192, 576)),
            ("attn_v", (192, 576)), ("attn_output", (576, 576)), ("ffn_gate", (1536, 576)),
            ("ffn_up", (1536, 576)), ("ffn_down", (576, 1536)))]
    types = choose_types(infos, "Q4_K_M", 30, 3)
    counts = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    assert counts == {"F32": 61, "Q8_0": 15, "Q5_0": 166, "Q4_K": 16, "Q6_K": 14}
    assert types["token_embd.weight"] == "Q8_0"  # tied output, 576 % 256 != 0
    assert types["blk.0.attn_v.weight"] == "Q8_0"  # Q6_K by use_more_bits, then its fallback
    assert types["blk.4.attn_v.weight"] == "Q5_0"  # Q4_K -> fallback
    assert types["blk.0.ffn_down.weight"] == "Q6_K" and types["blk.4.ffn_down.weight"] == "Q4_K"
    over = choose_types(infos, "Q4_K_M", 30, 3, overrides=[(r"ffn_down", "Q8_0")])
    assert over["blk.4.ffn_down.weight"] == "Q8_0"


def test_calibrated_export_uses_the_statistics(tiny_gguf_model, tmp_path, calib):
    from lowbit.calibration.stats import input_sq_means

    model, tok = tiny_gguf_model
    stats = input_sq_means(model, calib[:4] % 320, progress=False)
    assert stats["model.layers.0.mlp.down_proj"].shape == (512,)
    assert torch.equal(stats["model.embed_tokens"], stats["lm_head"])
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    export_gguf(model, tok, a, "Q3_K_M", progress=False)
    res = export_gguf(model, tok, b, "Q3_K_M", imatrix=stats, progress=False)
    assert res["calibrated"]
    _, ta = read(a)
    _, tb = read(b)
    assert not np.array_equal(np.asarray(ta["blk.0.ffn_down.weight"].data), np.asarray(tb["blk.0.ffn_down.weight"].data))


def test_cli_export_and_inspect(cli, tiny_dir, tmp_path):
    out = tmp_path / "x.gguf"
    code, stdout, _ = cli("export-gguf", str(tiny_dir), str(out), "--type", "Q8_0")
    assert code == 0 and out.is_file()  # hidden 72: rows fall back to F16 where 32 does not divide
    code, stdout, _ = cli("inspect", str(out))
    assert code == 0 and "bits/weight" in stdout and "token_embd.weight" in stdout


def test_cli_bad_type_writes_nothing(cli, tiny_dir, tmp_path):
    out = tmp_path / "y.gguf"
    code, _, err = cli("export-gguf", str(tiny_dir), str(out), "--type", "Q9_9")
    assert code == 2 and "unknown GGUF type" in err and not out.exists()
    code, _, err = cli("export-gguf", str(tiny_dir), str(out), "--tensor-type", "nonsense")
    assert code == 2 and "PATTERN=TYPE" in err and not out.exists()
    assert not any(p.name.startswith(".y.gguf") for p in tmp_path.iterdir())


@needs_llama_cpp
def test_llama_cpp_scores_the_f32_export_like_transformers(tiny_gguf_model, tmp_path):
    model, tok = tiny_gguf_model
    out = tmp_path / "f32.gguf"
    export_gguf(model, tok, out, "F32", progress=False)
    ids = torch.randint(0, 320, (1, 64), generator=torch.Generator().manual_seed(0))
    llm = L.open_model(out, n_ctx=64, logits_all=True)
    llm.eval(ids[0].tolist())
    theirs = torch.from_numpy(np.array(llm.scores[:64], dtype=np.float32))
    ours = model(ids).logits[0]
    assert torch.allclose(theirs, ours, atol=2e-3, rtol=0), float((theirs - ours).abs().max())


@needs_llama_cpp
@pytest.mark.parametrize("ftype", [t for t in FILE_TYPES if t not in ("F32",)])
def test_llama_cpp_loads_and_generates_every_type(tiny_gguf_model, tmp_path, ftype):
    model, tok = tiny_gguf_model
    out = tmp_path / f"{ftype}.gguf"
    export_gguf(model, tok, out, ftype, progress=False)
    toks = L.generate(out, [5, 6, 7, 8], max_new_tokens=4)
    assert 1 <= len(toks) <= 4 and all(0 <= t < 320 for t in toks)


def test_gptq_export_writes_valid_blocks(tiny_gguf_model, tmp_path, calib):
    from lowbit.calibration.stats import input_sq_means

    model, tok = tiny_gguf_model
    H = input_sq_means(model, calib[:4] % 320, progress=False, full=True)
    assert H["model.layers.0.mlp.down_proj"].shape == (512, 512)
    out = tmp_path / "g.gguf"
    res = export_gguf(model, tok, out, "Q4_K_M", hessians=H, progress=False)
    assert res["gptq"] and res["calibrated"]
    _, ts = read(out)
    w = model.state_dict()["model.layers.1.mlp.down_proj.weight"].numpy()
    t = ts["blk.1.ffn_down.weight"]
    back = dequantize(t.data, t.tensor_type).reshape(w.shape)
    assert np.sqrt(((back - w) ** 2).mean()) / w.std() < 0.2
    if L.available():
        assert len(L.generate(out, [5, 6, 7], max_new_tokens=3)) >= 1


def test_cli_gptq_needs_calibration(cli, tiny_dir, tmp_path):
    code, _, err = cli("export-gguf", str(tiny_dir), str(tmp_path / "z.gguf"), "--gptq")
    assert code == 2 and "--calib" in err


@pytest.mark.parametrize("bits,gtype", [(4, "Q4_0"), (5, "Q5_0"), (8, "Q8_0")])
def test_packed_layers_with_an_exact_gguf_type_keep_their_values(tmp_path, bits, gtype):
    """Symmetric g32 codes with float16 scales are the blocks of Q4_0/Q5_0/Q8_0: the export writes them as they
    are (gguf-py's dequantizer gives lowbit's dequantized weight bit for bit, Q/K rows permuted), whatever the
    file's type; other schemes are re-rounded and counted."""
    import lowbit
    from lowbit import QuantConfig, Scheme

    model = gguf_llama(seed=3)
    lowbit.quantize(model, QuantConfig(method="rtn", scheme=Scheme(bits, True, "group", 32)))
    res = export_gguf(model, make_tokenizer(), tmp_path / "m.gguf", "Q4_K_M", progress=False)
    assert res["exact"] == 14 and res["rerounded"] == 0
    _, ts = read(tmp_path / "m.gguf")
    for hf, g, heads in [("model.layers.1.self_attn.q_proj", "blk.1.attn_q.weight", 4),
                         ("model.layers.0.self_attn.k_proj", "blk.0.attn_k.weight", 2),
                         ("model.layers.0.mlp.down_proj", "blk.0.ffn_down.weight", None)]:
        t = ts[g]
        assert t.tensor_type.name == gtype
        want = model.get_submodule(hf).dequantize_weight().float()
        if heads:
            want = permute_qk(want, heads)
        assert np.array_equal(dequantize(t.data, t.tensor_type), want.numpy())
    m2 = gguf_llama(seed=3)
    lowbit.quantize(m2, QuantConfig(method="rtn", scheme=Scheme(4, False, "group", 32)))
    res = export_gguf(m2, make_tokenizer(), tmp_path / "a.gguf", "Q4_K_M", progress=False)
    assert res["exact"] == 0 and res["rerounded"] == 14
