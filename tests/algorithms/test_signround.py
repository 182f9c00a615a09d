"""SignRound: 0 iterations is RTN exactly; what it trains is what it stores; training lowers the model's output
error against RTN on the tiny model; its options are checked; a checkpoint round-trips."""
import copy

import pytest
import torch

import lowbit
from lowbit import QuantConfig, Scheme
from lowbit.algorithms.signround import RoundingLinear
from lowbit.core.quant import dequantize
from lowbit.errors import LowbitError
from lowbit.nn.qlinear import QuantLinear

SCHEMES = [Scheme(2, False, "group", 32), Scheme(3, False, "group", 32), Scheme(4, True, "group", 32),
           Scheme(4, False, "channel", None)]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe())
def test_zero_iterations_is_rtn(tiny, calib, scheme):
    """Differential: v = 0 and α = β = 1 give min/max scales and round-to-nearest, bit for bit."""
    model, _ = tiny
    rtn = lowbit.quantize(copy.deepcopy(model), QuantConfig(scheme=scheme))
    sr = lowbit.quantize(copy.deepcopy(model), QuantConfig(method="signround", scheme=scheme,
                                                           options={"iters": 0, "nsamples": 4, "calib_seqlen": 64}),
                         calib_ids=calib[:4])
    n = 0
    for name, m in rtn.named_modules():
        if isinstance(m, QuantLinear):
            s = sr.get_submodule(name)
            assert torch.equal(s.qweight, m.qweight) and torch.equal(s.scales, m.scales)
            assert (m.qzeros is None and s.qzeros is None) or torch.equal(s.qzeros, m.qzeros)
            n += 1
    assert n == 14


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe())
def test_what_it_trains_is_what_it_stores(scheme):
    """After arbitrary offsets and range factors, the stored codes and scale dequantize to the weight the
    training forward used (72 columns: a short last group at g32)."""
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(72, 24, bias=False)
    r = RoundingLinear(lin, scheme)
    with torch.no_grad():
        r.v.copy_(torch.rand(r.v.shape, generator=g) - 0.5)
        r.alpha.copy_(0.5 + 0.5 * torch.rand(r.alpha.shape, generator=g))
        if r.beta is not None:
            r.beta.copy_(0.5 + 0.5 * torch.rand(r.beta.shape, generator=g))
    qt = r.qtensor()
    assert torch.equal(dequantize(qt), r.weight_hat().detach())
    q = QuantLinear.from_linear(lin, scheme, qt=qt)
    assert torch.equal(q.dequantize_weight(), r.weight_hat().detach())


def test_training_lowers_the_output_error_against_rtn(tiny, calib):
    model, _ = tiny
    scheme = Scheme(2, False, "group", 32)
    x = calib[4:]
    with torch.no_grad():
        ref = torch.log_softmax(model(x).logits, -1)

    def kl(m):
        with torch.no_grad():
            lp = torch.log_softmax(m(x).logits, -1)
        return float((ref.exp() * (ref - lp)).sum(-1).mean())

    rtn = lowbit.quantize(copy.deepcopy(model), QuantConfig(scheme=scheme))
    sr = lowbit.quantize(copy.deepcopy(model), QuantConfig(method="signround", scheme=scheme,
                                                           options={"iters": 40, "batch": 2, "nsamples": 4,
                                                                    "calib_seqlen": 64}),
                         calib_ids=calib[:4])
    assert kl(sr) < kl(rtn)


def test_bad_options_and_schemes_are_refused(tiny, calib):
    model, _ = tiny
    for opts in ({"iters": -1}, {"batch": 0}, {"lr": 0.0}, {"minmax_lr": float("nan")}):
        with pytest.raises(LowbitError):
            lowbit.quantize(copy.deepcopy(model), QuantConfig(method="signround", scheme=Scheme(4, True, "group", 32),
                                                              options=opts), calib_ids=calib[:2])
    with pytest.raises(LowbitError, match="signround takes"):
        lowbit.quantize(copy.deepcopy(model), QuantConfig(method="signround", scheme=Scheme(4, True, "tensor")),
                        calib_ids=calib[:2])


def test_cli_checkpoint_round_trips(cli, tiny_dir, tmp_path):
    out = tmp_path / "sr"
    code, so, se = cli("quantize", tiny_dir, out, "--method", "signround", "--bits", "3", "--group-size", "32",
                       "--asym", "--round-iters", "5", "--round-batch", "2", "--nsamples", "4", "--calib-seqlen", "32")
    assert code == 0, se
    m, _ = lowbit.load(out)
    assert isinstance(m.model.layers[0].mlp.down_proj, QuantLinear)
