"""runtime/lean.py: lowbit checkpoints of the LLaMA family load without transformers' model classes and give
the lean decoder the same logits as the transformers-built model."""
import pytest
import torch

from lowbit import api
from lowbit.api import load
from lowbit.core.config import QuantConfig
from lowbit.core.scheme import Scheme
from lowbit.runtime.decoder import LeanDecoder
from lowbit.runtime.lean import LeanCausalLM


def tiny(model_type="llama", **kw):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(model_type, vocab_size=320, hidden_size=128, intermediate_size=256,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=256, **kw)
    return AutoModelForCausalLM.from_config(cfg).eval()


def decode_logits(model, ids):
    dec = LeanDecoder(model, max_len=32)
    return torch.cat([dec.forward(ids[:6])] + [dec.forward(ids[t: t + 1]) for t in range(6, len(ids))])


@pytest.mark.parametrize("model_type,kw,scheme", [
    ("llama", {"tie_word_embeddings": True}, Scheme(4, True, "group", 64)),
    ("llama", {"attention_bias": True, "rope_theta": 5000.0}, None),  # float checkpoint
    ("qwen2", {}, Scheme(8, True, "channel")),
    ("mistral", {"sliding_window": 64}, Scheme(4, False, "group", 64)),
])
def test_lean_load_gives_the_same_logits(tmp_path, model_type, kw, scheme):
    model = tiny(model_type, **kw)
    if scheme is not None:
        api.quantize(model, QuantConfig(scheme=scheme))
    api.save(model, None, tmp_path / "ckpt")
    full, _ = load(tmp_path / "ckpt")
    lean, tok = load(tmp_path / "ckpt", lean=True)
    assert isinstance(lean, LeanCausalLM) and tok is None
    ids = torch.arange(1, 13)
    assert torch.equal(decode_logits(lean, ids), decode_logits(full, ids))
    with pytest.raises(TypeError, match="LeanDecoder"):
        lean(ids.unsqueeze(0))


def test_what_the_skeleton_does_not_describe_loads_through_transformers(tmp_path):
    model = tiny(rope_scaling={"rope_type": "linear", "factor": 2.0})
    api.save(model, None, tmp_path / "ckpt")
    m, _ = load(tmp_path / "ckpt", lean=True)
    assert not isinstance(m, LeanCausalLM)
