import pytest
import torch
from torch import nn

import lowbit
from lowbit import QuantConfig, Scheme
from lowbit.core.state import state_of
from lowbit.errors import LowbitError
from lowbit.nn.qlinear import QuantEmbedding, QuantLinear


def test_rtn_quantizes_every_block_linear_only(tiny):
    model, _ = tiny
    lowbit.quantize(model, QuantConfig(scheme=Scheme(4, True, "group", 32)))
    names = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(names) == 2 * 7
    assert all(n.startswith("model.layers.") for n in names)
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.model.embed_tokens, nn.Embedding)
    assert not any(isinstance(m, nn.Linear) for m in model.model.layers.modules())


def test_include_exclude(tiny):
    model, _ = tiny
    cfg = QuantConfig(scheme=Scheme(8, True, "channel"), include=(r"mlp",), exclude=(r"layers\.1\.",))
    lowbit.quantize(model, cfg)
    names = sorted(state_of(model).quant.modules)
    assert names == [f"model.layers.0.mlp.{p}_proj" for p in ("down", "gate", "up")]


def test_head_and_embeddings_only_when_asked(tiny):
    model, _ = tiny
    lowbit.quantize(model, QuantConfig(scheme=Scheme(8, True, "channel"), include=(r"lm_head", r"embed_tokens")))
    assert isinstance(model.lm_head, QuantLinear) and isinstance(model.model.embed_tokens, QuantEmbedding)
    assert model.config.tie_word_embeddings is False
    out = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(out).all()


def test_overrides(tiny):
    model, _ = tiny
    cfg = QuantConfig(scheme=Scheme(4, True, "group", 32), overrides={r"down_proj": Scheme(8, True, "channel")})
    lowbit.quantize(model, cfg)
    assert model.model.layers[0].mlp.down_proj.scheme.bits == 8
    assert model.model.layers[0].mlp.up_proj.scheme.bits == 4


def test_nothing_matched_and_unknown_method(tiny):
    model, _ = tiny
    with pytest.raises(LowbitError, match="nothing was quantized"):
        lowbit.quantize(model, QuantConfig(include=("no_such_layer",)))
    with pytest.raises(LowbitError, match="unknown method"):
        lowbit.quantize(model, QuantConfig(method="magic"))


def test_w8_is_close_to_float(tiny):
    model, _ = tiny
    x = torch.randint(0, 320, (1, 16))
    ref = model(x).logits
    lowbit.quantize(model, QuantConfig(scheme=Scheme(8, True, "channel")))
    assert torch.allclose(model(x).logits, ref, atol=2e-2)
