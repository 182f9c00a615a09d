"""The lean runtime computes the model's logits: prefill, token-by-token decode, chunks after a prefix."""
import copy

import pytest
import torch

from lowbit import api
from lowbit.core.config import QuantConfig
from lowbit.core.scheme import Scheme
from lowbit.runtime.decoder import LeanDecoder, fused_linear, unsupported_reason

# float32, another order of the same operations (fused matmuls, sdpa): relative to the logits' scale
FLOAT_RTOL = 1e-4
# int4 kernel: bf16 activations in the fused kernel vs transformers' path through the same kernel per layer;
# native decode (kernels/decode.c): activations quantized to int8 per block of up to 128 columns in every matvec
INT4_RTOL = 2e-2
# native decode keeps K/V in float16 (llama.cpp's default cache type): the prefix's keys and values rounded
KV16_RTOL = 2e-3


def native_available():
    from lowbit.kernels.native import lib

    return lib() is not None


NATIVE = [False, pytest.param(True, marks=pytest.mark.skipif(not native_available(), reason="no C compiler"))]


def tiny_llama(hidden=128, inter=256, heads=4, kv=2, layers=2, vocab=320, seed=0, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=512,
                      tie_word_embeddings=True, eos_token_id=0, bos_token_id=0, pad_token_id=0, **kw)
    return LlamaForCausalLM(cfg).eval()


def reference_logits(model, ids):
    with torch.no_grad():
        return model(ids.unsqueeze(0), use_cache=False).logits[0].float()


def close(a, b, rtol):
    return (a - b).abs().max().item() <= rtol * b.abs().max().item()


@pytest.mark.parametrize("native", NATIVE)
@pytest.mark.parametrize("kw", [{}, {"attention_bias": True, "mlp_bias": True}, {"rope_theta": 500.0}])
def test_float_prefill_and_decode_equal_transformers(kw, native):
    model = tiny_llama(**kw)
    ids = torch.randint(0, 320, (24,), generator=torch.Generator().manual_seed(1))
    ref = reference_logits(model, ids)
    dec = LeanDecoder(model, max_len=64, native=native)
    assert (dec.native is not None) == native
    assert dec.k_cache.dtype == (torch.float16 if native else torch.float32)
    rtol = KV16_RTOL if native else FLOAT_RTOL
    got = dec.forward(ids[:10])
    assert got.shape == (10, 320) and close(got, ref[:10], rtol)
    for t in range(10, 16):  # one token at a time
        assert close(dec.forward(ids[t: t + 1]), ref[t: t + 1], rtol)
    assert close(dec.forward(ids[16:]), ref[16:], rtol)  # a chunk after a cached prefix
    dec.reset()
    assert close(dec.forward(ids), ref, rtol)


@pytest.mark.parametrize("native", NATIVE)
def test_w4_fused_kernel_equals_transformers_decode(native):
    model = tiny_llama()
    api.quantize(model, QuantConfig(scheme=Scheme(4, True, "group", 64)))
    dec = LeanDecoder(model, max_len=64, native=native)
    kind = "native" if native else "int4"
    assert dec.blocks[0].qkv.kind == kind and dec.blocks[0].gate_up.kind == kind and (dec.native is not None) == native
    ids = torch.randint(0, 320, (20,), generator=torch.Generator().manual_seed(2))
    ref = reference_logits(model, ids)  # transformers, reference path (20 rows > int4.MAX_ROWS)
    got = torch.cat([dec.forward(ids[:12])] + [dec.forward(ids[t: t + 1]) for t in range(12, 20)])
    assert close(got, ref, INT4_RTOL)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("native", NATIVE)
def test_mixed_kernels_in_one_block(native):
    # attention at g64 (native matvec where available), MLP at g32 (torch's int4 kernel: the native one needs
    # groups of 64): the decode step runs float32 rows through both
    model = tiny_llama()
    api.quantize(model, QuantConfig(scheme=Scheme(4, True, "group", 64), overrides={"mlp": Scheme(4, True, "group", 32)}))
    dec = LeanDecoder(model, max_len=32, native=native)
    assert dec.blocks[0].gate_up.kind == "int4" and dec.blocks[0].qkv.kind == ("native" if native else "int4")
    ids = torch.arange(1, 13)
    ref = reference_logits(model, ids)
    got = torch.cat([dec.forward(ids[:4])] + [dec.forward(ids[t: t + 1]) for t in range(4, 12)])
    assert close(got, ref, INT4_RTOL) and torch.equal(got.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("native", NATIVE)
@pytest.mark.parametrize("method", ["rtn-w8", "w8a8", "rtn-w3"])
def test_other_quantized_layers_run_through_their_modules(method, native):
    model = tiny_llama()
    if method == "rtn-w8":
        api.quantize(model, QuantConfig(scheme=Scheme(8, True, "channel")))
    elif method == "w8a8":
        api.quantize(model, QuantConfig(method="w8a8", scheme=Scheme(8, True, "channel")))
    else:
        api.quantize(model, QuantConfig(scheme=Scheme(3, False, "group", 32)))
    dec = LeanDecoder(model, max_len=32, native=native)
    kinds = {"rtn-w8": "native" if native else "int8x2", "w8a8": "parts", "rtn-w3": "parts"}
    assert dec.blocks[0].qkv.kind == kinds[method]
    ids = torch.arange(1, 13)
    ref = reference_logits(model, ids)
    got = torch.cat([dec.forward(ids[:4])] + [dec.forward(ids[t: t + 1]) for t in range(4, 12)])
    # w8a8 with the native float16 cache: the cache's rounding flips some int8 activation codes (whole steps)
    w8a8 = INT4_RTOL if native else 1e-3
    assert close(got, ref, {"w8a8": w8a8, "rtn-w8": INT4_RTOL}.get(method, KV16_RTOL if native else FLOAT_RTOL))


def test_fused_int4_rows_equal_the_separate_layers():
    from lowbit.kernels.int4 import MAX_ROWS
    from lowbit.nn.qlinear import QuantLinear
    from torch import nn

    torch.manual_seed(0)
    parts = [QuantLinear.from_linear(nn.Linear(128, n, bias=False), Scheme(4, False, "group", 64)) for n in (64, 32)]
    fused = fused_linear(parts, native=False)
    assert fused.kind == "int4"
    x = torch.randn(MAX_ROWS, 128)
    assert torch.equal(fused(x), torch.cat([p(x) for p in parts], -1))


def test_refuses_models_it_cannot_run_and_long_sequences(tiny):
    from lowbit.errors import LowbitError

    model, _ = tiny
    gpt2 = copy.deepcopy(model)
    gpt2.config.model_type = "gpt2"
    assert "layout" in unsupported_reason(gpt2)
    with pytest.raises(LowbitError, match="lean runtime"):
        LeanDecoder(gpt2)
    dec = LeanDecoder(model, max_len=8)
    with pytest.raises(LowbitError, match="exceed the cache of 8"):
        dec.forward(torch.arange(9))


def test_lean_generation_equals_transformers_generate(tiny):
    from lowbit.runtime.generation import generate

    model, tok = tiny
    a = generate(model, tok, "The quick brown", max_new_tokens=12, runtime="lean")
    b = generate(model, tok, "The quick brown", max_new_tokens=12, runtime="transformers")
    assert a == b
    streamed = []
    c = generate(model, tok, "The quick brown", max_new_tokens=12, runtime="lean", on_text=streamed.append)
    assert c == a and "".join(streamed) == a


def test_sampling_is_seeded_and_top_p_keeps_the_head():
    from lowbit.runtime.generation import generate_ids, next_token

    model = tiny_llama()
    ids = torch.arange(1, 6).unsqueeze(0)
    s1 = generate_ids(model, ids, 10, temperature=0.8, top_p=0.9, seed=3)
    s2 = generate_ids(model, ids, 10, temperature=0.8, top_p=0.9, seed=3)
    assert s1 == s2 and len(s1) == 10
    logits = torch.tensor([5.0, 4.0, -10.0, -10.0])
    g = torch.Generator().manual_seed(0)
    assert {next_token(logits, 1.0, 0.5, g) for _ in range(50)} == {0}  # p(0) = 0.73 >= 0.5: only the top token
    assert {next_token(logits, 1.0, 0.99, g) for _ in range(200)} == {0, 1}
    assert next_token(logits, 0.0, 1.0, None) == 0


def test_generation_stops_at_eos():
    from lowbit.runtime.generation import generate_ids

    model = tiny_llama()
    ids = torch.arange(1, 6).unsqueeze(0)
    free = generate_ids(model, ids, 8)
    stop = generate_ids(model, ids, 8, eos={free[2]})
    assert stop == free[: free.index(free[2]) + 1]


def test_bf16_model_runs_in_bf16():
    model = tiny_llama().to(torch.bfloat16)
    ids = torch.arange(1, 11)
    dec = LeanDecoder(model, max_len=16)
    got = torch.cat([dec.forward(ids[:6])] + [dec.forward(ids[t: t + 1]) for t in range(6, 10)])
    assert dec.k_cache.dtype == torch.bfloat16 and got.dtype == torch.float32
    assert close(got, reference_logits(model, ids), 5e-2)  # bf16 rounding, different op order


def test_last_logits_only():
    model = tiny_llama()
    ids = torch.arange(1, 11)
    full = LeanDecoder(model, max_len=16, native=False).forward(ids)
    last = LeanDecoder(model, max_len=16, native=False).forward(ids, all_logits=False)
    assert last.shape == (1, 320) and close(last, full[-1:], FLOAT_RTOL)  # a matvec sums in another order


def test_sliding_window_models_run_within_their_window():
    from lowbit.errors import LowbitError
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=32, max_position_embeddings=512)
    model = MistralForCausalLM(cfg).eval()
    ids = torch.arange(1, 21)
    assert close(LeanDecoder(model, max_len=32, native=False).forward(ids), reference_logits(model, ids), FLOAT_RTOL)
    with pytest.raises(LowbitError, match="attention window of 32"):
        LeanDecoder(model, max_len=64)
