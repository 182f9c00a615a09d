"""models/lazy.py: a float model read block by block from its safetensors quantizes exactly as the loaded one."""
import pytest
import torch

from lowbit import api
from lowbit.core.config import QuantConfig
from lowbit.core.scheme import Scheme
from lowbit.models.loading import load


def state(model):
    return {k: v for k, v in model.state_dict().items()}


def test_lazy_model_starts_on_meta_and_materializes_tied(tiny_dir):
    model, tok = load(tiny_dir, lazy=True)
    assert tok is not None and all(p.is_meta for p in model.parameters())
    lazy = model.lowbit_lazy
    lazy.materialize(model, "model.layers.0.")
    assert not model.model.layers[0].mlp.down_proj.weight.is_meta and model.model.layers[1].mlp.down_proj.weight.is_meta
    lazy.materialize(model)
    full, _ = load(tiny_dir)
    for (n, a), (_, b) in zip(state(model).items(), state(full).items()):
        assert torch.equal(a, b), n
    if full.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    lazy.release(model, skip=("model.layers.",))
    assert model.model.embed_tokens.weight.is_meta and not model.model.layers[0].mlp.down_proj.weight.is_meta


@pytest.mark.parametrize("method", ["gptq", "awq", "rtn"])
def test_lazy_quantization_equals_loaded_quantization(tiny_dir, calib, method):
    cfg = lambda: QuantConfig(method=method, scheme=Scheme(4, False, "group", 32), seed=3)  # noqa: E731
    full, _ = load(tiny_dir)
    api.quantize(full, cfg(), calib_ids=calib)
    lazy, _ = load(tiny_dir, lazy=True)
    api.quantize(lazy, cfg(), calib_ids=calib)
    assert not hasattr(lazy, "lowbit_lazy") and not any(t.is_meta for t in lazy.state_dict().values())
    a, b = state(full), state(lazy)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
