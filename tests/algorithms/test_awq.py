import copy

import pytest
import torch

import lowbit
from lowbit import QuantConfig, Scheme
from lowbit.algorithms.awq import apply_scale, output_mse, rtn_dequant, search_clip
from lowbit.core.quant import dequantize, quantize
from lowbit.models.arch import scale_mappings
from lowbit.nn.qlinear import QuantLinear

# Folding is exact in real arithmetic; fp32 reassociation leaves this much on logits of order 1.
FOLD_ATOL = 1e-4


@pytest.mark.parametrize("sch", [Scheme(3, False, "group", 32), Scheme(4, True, "group", 32),
                                 Scheme(8, True, "channel", None), Scheme(2, False, "tensor", None)])
def test_rtn_dequant_matches_core(sch):
    W = torch.randn(8, 70)
    assert torch.equal(rtn_dequant(W, sch), dequantize(quantize(W, sch)))


def test_alpha_zero_is_rtn(tiny, calib):
    model, _ = tiny
    scheme = Scheme(4, False, "group", 32)
    rtn = lowbit.quantize(copy.deepcopy(model), QuantConfig(scheme=scheme))
    awq = lowbit.quantize(copy.deepcopy(model), QuantConfig(method="awq", scheme=scheme,
                                                            options={"awq_grid": 1, "awq_clip": False}), calib_ids=calib)
    for name, m in rtn.named_modules():
        if isinstance(m, QuantLinear):
            a = awq.get_submodule(name)
            assert torch.equal(a.qweight, m.qweight) and torch.equal(a.scales, m.scales)


def test_output_mse_from_h_matches_the_tokens():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 40, generator=g, dtype=torch.float64)
    d = torch.randn(7, 40, generator=g, dtype=torch.float64)
    H = 2 * x.T @ x / x.shape[0]
    assert output_mse(d, H) == pytest.approx(float((x @ d.T).pow(2).mean()), rel=1e-12)


def test_scale_folding_keeps_float_outputs(tiny):
    model, _ = tiny
    x = torch.randint(0, 320, (1, 20))
    ref = model(x).logits
    g = torch.Generator().manual_seed(0)
    for block in model.model.layers:
        maps = scale_mappings(model, block)
        assert [names for _, names in maps] == [
            ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],  # v->o is skipped: GQA shapes differ
            ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
        for prev, names in maps:
            lins = [block.get_submodule(n) for n in names]
            apply_scale(prev, lins, torch.rand(lins[0].in_features, generator=g) * 4 + 0.25)
    assert torch.allclose(model(x).logits, ref, atol=FOLD_ATOL)


@pytest.mark.parametrize("cols,sch", [(64, Scheme(3, True, "group", 16)), (70, Scheme(3, False, "group", 32)),
                                      (64, Scheme(3, True, "channel", None))])
def test_clip_never_increases_group_output_error(cols, sch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, cols, generator=g)
    W = torch.randn(16, cols, generator=g)
    W[0, 3] = 12.0  # an outlier weight that a clipped range serves better
    Wc = search_clip(2 * x.T @ x / x.shape[0], W, sch)
    err = lambda w: (x @ (rtn_dequant(w, sch) - W).T).pow(2).mean()
    assert err(Wc) < err(W)


@pytest.mark.parametrize("method", ["awq", "awq+gptq"])
def test_awq_round_trip(tiny, calib, tmp_path, method):
    model, tok = tiny
    q = lowbit.quantize(copy.deepcopy(model), QuantConfig(method=method, scheme=Scheme(4, True, "group", 32)),
                        calib_ids=calib)
    x = calib[:2]
    before = q(x).logits
    assert torch.isfinite(before).all()
    lowbit.save(q, tok, tmp_path / "a")
    loaded, _ = lowbit.load(tmp_path / "a")
    assert torch.equal(loaded(x).logits, before)
