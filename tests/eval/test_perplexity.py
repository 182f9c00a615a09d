import math

import pytest
import torch

import lowbit
from lowbit import QuantConfig, Scheme
from lowbit.errors import LowbitError
from lowbit.eval.perplexity import windows
from tests.conftest import TEXT


def test_windows_non_overlapping():
    ids = torch.arange(1030)
    w = windows(ids, 512)
    assert w.shape == (2, 512) and torch.equal(w.flatten(), ids[:1024])
    assert windows(ids, 512, limit_tokens=600).shape == (1, 512)
    assert windows(ids, 512, limit_tokens=100).shape == (1, 100)
    with pytest.raises(LowbitError):
        windows(ids, 1)


def test_perplexity_matches_manual_cross_entropy(tiny):
    model, tok = tiny
    res = lowbit.evaluate(model, tok, text=TEXT, seqlen=64, limit_tokens=256, progress=False)
    ids = tok(TEXT, add_special_tokens=False, return_tensors="pt").input_ids[0][:256].reshape(4, 64)
    logits = model(ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert math.isclose(res["ppl"], math.exp(float(loss)), rel_tol=1e-5)
    assert res["tokens"] == 256 and res["seqlen"] == 64 and res["bpw"] == 32.0


def test_kl_and_top1_against_base(tiny):
    model, tok = tiny
    same = lowbit.evaluate(model, tok, text=TEXT, seqlen=64, limit_tokens=128, base=model, progress=False)
    assert abs(same["kl"]) < 1e-6 and same["top1"] == 1.0
    from tests.conftest import make_tiny_llama

    q = make_tiny_llama()
    lowbit.quantize(q, QuantConfig(scheme=Scheme(2, False, "group", 32)))
    res = lowbit.evaluate(q, tok, text=TEXT, seqlen=64, limit_tokens=128, base=model, progress=False)
    assert res["kl"] > 0 and 0 <= res["top1"] < 1
    assert math.isclose(res["base_ppl"], same["ppl"], rel_tol=1e-6)
    assert 2 < res["bpw"] < 3


def test_chunked_tokenize_equals_one_call():
    from tests.conftest import TEXT, make_tokenizer
    from lowbit.core.tokens import _cut_points, tokenize

    tok = make_tokenizer()
    text = TEXT + "\n \n  indented\n\n\nThe end"
    whole = tok(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    assert len(_cut_points(text, 100)) > 10  # many cuts
    assert torch.equal(tokenize(tok, text, chunk=100), whole)
    assert torch.equal(tokenize(tok, text), whole)  # one chunk


def test_chunked_tokenize_falls_back_when_a_cut_changes_tokens():
    """A tokenizer that marks the start of every call (SentencePiece's dummy prefix) gets the text whole."""
    from tests.conftest import TEXT, make_tokenizer
    from lowbit.core.tokens import tokenize

    inner = make_tokenizer()

    class Prefixing:
        def __call__(self, text, add_special_tokens=False, **kw):
            return inner(" " + text, add_special_tokens=add_special_tokens, **kw)

    whole = inner(" " + TEXT, add_special_tokens=False).input_ids
    assert tokenize(Prefixing(), TEXT, chunk=100).tolist() == whole


def test_perplexity_past_float_range_is_infinite(tiny):
    """A model whose loss is past float range (a GGUF with flipped data bytes): ppl inf, not an OverflowError."""
    from types import SimpleNamespace

    model, tok = tiny

    def confident(x, **kw):
        logits = torch.zeros(*x.shape, 320)
        logits[..., 1] = 1e5  # all mass on one token the text never has next: nll 1e5 per token
        return SimpleNamespace(logits=logits)

    model.forward = confident
    # the fake replaces transformers' forward, which only the transformers runtime calls (auto would pick lean)
    res = lowbit.evaluate(model, tok, text=TEXT, seqlen=32, limit_tokens=64, progress=False, runtime="transformers")
    assert res["ppl"] == math.inf
