import copy

import pytest
import torch

import lowbit
from lowbit import QuantConfig
from lowbit.algorithms.smoothquant import smooth, smooth_factors
from lowbit.nn.int8 import W8_CHANNEL, W8_TENSOR, ActQuant, Int8OutlierLinear, W8A8Linear

# Folding is exact in real arithmetic; fp32 reassociation leaves this much on logits of order 1.
FOLD_ATOL = 1e-4


def test_smooth_factors_formula():
    xa = torch.tensor([8.0, 1.0, 0.0, 2.0])
    wa = torch.tensor([0.5, 2.0, 1.0, 1.0])
    s = smooth_factors(xa, wa, 0.5)
    assert torch.allclose(s[:2], torch.tensor([(8 / 0.5) ** 0.5, (1 / 2.0) ** 0.5]))
    assert s[2] == 1.0  # a channel that never fires is left alone
    assert torch.allclose(smooth_factors(xa, wa, 1.0)[[0, 1, 3]], xa[[0, 1, 3]])
    with pytest.raises(lowbit.LowbitError):
        smooth_factors(xa, wa, 1.5)


def test_smoothing_alone_keeps_float_outputs(tiny, calib):
    model, _ = tiny
    x = calib[:2]
    ref = model(x).logits
    w_before = model.model.layers[0].self_attn.q_proj.weight.clone()
    smooth(model, calib, alpha=0.5)
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, w_before)  # something moved
    assert torch.allclose(model(x).logits, ref, atol=FOLD_ATOL)


def test_smoothing_flattens_the_activation_range(tiny, calib):
    model, _ = tiny
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[5] = 30.0  # an outlier channel in q/k/v's input
    seen = {}
    lin = model.model.layers[0].self_attn.q_proj
    h = lin.register_forward_hook(lambda m, i, o: seen.__setitem__("x", i[0].abs().amax(dim=(0, 1))))
    model(calib[:2])
    before = float(seen["x"].max() / seen["x"].median())
    smooth(model, calib, alpha=0.5)
    model(calib[:2])
    h.remove()
    assert float(seen["x"].max() / seen["x"].median()) < before / 2


def test_alpha_zero_with_unit_weight_ranges_is_plain_w8a8(tiny, calib):
    """s = max|X|^0 / max|W|^1 = 1 when every weight column's max is 1: smoothing is the identity."""
    model, _ = tiny
    with torch.no_grad():
        for n, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and n.startswith("model.layers"):
                m.weight.div_(m.weight.abs().amax(dim=0, keepdim=True))
        # mappings take the max over all the linears they feed: make each group share its column maxima
        for layer in model.model.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                        layer.mlp.gate_proj, layer.mlp.up_proj):
                lin.weight[0] = 1.0
    plain = lowbit.quantize(copy.deepcopy(model), QuantConfig(method="w8a8", scheme=W8_CHANNEL,
                                                              options={"act": "static"}), calib_ids=calib)
    sq = lowbit.quantize(copy.deepcopy(model), QuantConfig(method="w8a8", scheme=W8_CHANNEL,
                                                           options={"act": "static", "smooth": 0.0}), calib_ids=calib)
    for n, m in plain.named_modules():
        if isinstance(m, W8A8Linear):
            o = sq.get_submodule(n)
            assert torch.equal(o.qweight, m.qweight) and torch.equal(o.scales, m.scales)
            assert torch.equal(o.input_scale, m.input_scale)


@pytest.mark.parametrize("options,scheme", [
    ({"act": "dynamic"}, W8_CHANNEL),
    ({"act": "static"}, W8_CHANNEL),
    ({"act": "tensor"}, W8_TENSOR),
    ({"act": "dynamic", "smooth": 0.5, "act_bits": 7}, W8_CHANNEL),
    ({"act": "static", "smooth": 0.8}, W8_CHANNEL),
    ({"act": "dynamic", "rotate": False, "pair_bound": False}, W8_CHANNEL),
    ({"act": "dynamic", "smooth": 0.5}, W8_CHANNEL),
])
def test_w8a8_round_trip(tiny, calib, tmp_path, options, scheme):
    model, tok = tiny
    ref = model(calib[:2]).logits
    q = lowbit.quantize(copy.deepcopy(model), QuantConfig(method="w8a8", scheme=scheme, options=dict(options)),
                        calib_ids=calib)
    mods = [m for m in q.modules() if isinstance(m, W8A8Linear)]
    assert len(mods) == 14 and all(m.act.static == (options["act"] == "static") for m in mods)
    rotated = options.get("rotate", options["act"] == "dynamic")  # the default: per-token activations rotate
    assert {m.rotated for m in mods} == {rotated}
    before = q(calib[:2]).logits
    assert (before - ref).abs().max() < 0.1 * ref.abs().max()
    lowbit.save(q, tok, tmp_path / "c")
    loaded, _ = lowbit.load(tmp_path / "c")
    assert all(isinstance(loaded.get_submodule(n), W8A8Linear) for n, m in q.named_modules() if isinstance(m, W8A8Linear))
    assert torch.equal(loaded(calib[:2]).logits, before)
    if rotated:  # one rotation per input width, stored once and shared again after loading
        attn = loaded.model.layers[1].self_attn
        assert attn.q_proj.rot_a is attn.k_proj.rot_a is loaded.model.layers[0].mlp.up_proj.rot_a
    # q/k/v and gate/up quantize their common input once (kept by the checkpoint)
    assert loaded.model.layers[1].self_attn.v_proj.share == (
        "model.layers.1.self_attn.q_proj+self_attn.k_proj+self_attn.v_proj", 2, 3)
    assert loaded.model.layers[0].mlp.up_proj.share == ("model.layers.0.mlp.gate_proj+mlp.up_proj", 1, 2)


def test_rotation_leaves_the_float_function_and_helps_outliers(tiny, calib):
    """Rotated W8A8 computes (x R)(W R)ᵀ = x Wᵀ: with an outlier channel in q/k/v's input it is closer to the
    float model than plain per-token W8A8."""
    model, _ = tiny
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[5] = 40.0
    ref = model(calib[:2]).logits
    err = {}
    for rot in (False, True):
        q = lowbit.quantize(copy.deepcopy(model), QuantConfig(method="w8a8", scheme=W8_CHANNEL,
                                                              options={"rotate": rot, "pair_bound": False}))
        err[rot] = float((q(calib[:2]).logits - ref).norm())
    assert err[True] < err[False]


def test_rotated_static_w8a8_is_refused(tiny, calib):
    model, _ = tiny
    with pytest.raises(lowbit.LowbitError, match="run time"):
        lowbit.quantize(model, QuantConfig(method="w8a8", scheme=W8_CHANNEL,
                                           options={"act": "static", "rotate": True}), calib_ids=calib)


def test_llm_int8_round_trip_and_counts(tiny, calib, tmp_path):
    model, tok = tiny
    q = lowbit.quantize(copy.deepcopy(model), QuantConfig(method="llm-int8", scheme=W8_CHANNEL,
                                                          options={"threshold": 0.5}))
    before = q(calib[:2]).logits
    mods = [m for m in q.modules() if isinstance(m, Int8OutlierLinear)]
    assert len(mods) == 14 and sum(m.outlier_columns for m in mods) > 0  # a low threshold finds some
    lowbit.save(q, tok, tmp_path / "i")
    loaded, _ = lowbit.load(tmp_path / "i")
    assert loaded.model.layers[0].mlp.down_proj.threshold == 0.5
    assert torch.equal(loaded(calib[:2]).logits, before)


@pytest.mark.parametrize("options, symmetric", [({}, False), ({"act_symmetric": True}, True)])
def test_llm_int8_zeropoint_by_default(tiny, options, symmetric):
    """Zeropoint LLM.int8() (the paper's most accurate variant) unless absmax is asked for; the
    checkpoint-facing ActQuant records which."""
    model, _ = tiny
    q = lowbit.quantize(copy.deepcopy(model), QuantConfig(method="llm-int8", scheme=W8_CHANNEL, options=options))
    acts = {m.act for m in q.modules() if isinstance(m, Int8OutlierLinear)}
    assert acts == {ActQuant(granularity="token", static=False, bits=8, symmetric=symmetric)}
