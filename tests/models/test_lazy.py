"""models/lazy.py: a float model read block by block from its safetensors quantizes exactly as the loaded one."""
import pytest
import torch

from lowbit import api
from lowbit.api import load
from lowbit.core.config import QuantConfig
from lowbit.core.scheme import Scheme
from lowbit.core.state import state_of


def state(model):
    return {k: v for k, v in model.state_dict().items()}


def test_lazy_model_starts_on_meta_and_materializes_tied(tiny_dir):
    model, tok = load(tiny_dir, lazy=True)
    assert tok is not None and all(p.is_meta for p in model.parameters())
    lazy = state_of(model).lazy
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


@pytest.mark.parametrize("method", ["gptq", "awq", "rtn", "rtn+head", "w8a8", "llm-int8"])
def test_lazy_quantization_equals_loaded_quantization(tiny_dir, calib, method):
    scheme = Scheme(8, True, "channel") if method in ("w8a8", "llm-int8") else Scheme(4, False, "group", 32)
    include = (r"layers\.\d+\..*_proj$", r"^lm_head$") if method == "rtn+head" else ()
    cfg = lambda: QuantConfig(method=method.split("+")[0], scheme=scheme, seed=3, include=include)  # noqa: E731
    full, _ = load(tiny_dir)
    api.quantize(full, cfg(), calib_ids=calib)
    lazy, _ = load(tiny_dir, lazy=True)
    api.quantize(lazy, cfg(), calib_ids=calib)
    assert state_of(lazy).lazy is None and not any(t.is_meta for t in lazy.state_dict().values())
    a, b = state(full), state(lazy)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lazy_rtn_reads_one_layer_at_a_time(tiny_dir, monkeypatch):
    """RTN on a lazily loaded model: when a layer is rounded, the layers after it are still on disk."""
    from lowbit.algorithms import rtn

    model, _ = load(tiny_dir, lazy=True)
    last = model.model.layers[-1].mlp.down_proj
    seen = []
    orig = rtn.quantize_module

    def spy(mod, scheme, *rest):
        seen.append((mod.weight.is_meta, last.weight.is_meta))
        return orig(mod, scheme, *rest)

    monkeypatch.setattr(rtn, "quantize_module", spy)
    api.quantize(model, QuantConfig(method="rtn", scheme=Scheme(4, True, "group", 32)))
    assert seen and not any(meta for meta, _ in seen)  # each layer read before it is rounded
    assert seen[0][1] and not seen[-1][1]  # the last layer stayed on disk until its turn
