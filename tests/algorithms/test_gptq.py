import copy

import pytest
import torch

import lowbit
from lowbit import QuantConfig, Scheme
from lowbit.core.gptq import Hessian, gptq_quantize
from lowbit.core.quant import dequantize, quantize
from lowbit.errors import LowbitError
from tests.conftest import TEXT

SCHEMES = [Scheme(4, True, "group", 32), Scheme(3, False, "group", 20), Scheme(8, True, "channel"),
           Scheme(2, False, "tensor"), Scheme(4, False, "group", 128)]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.describe())
@pytest.mark.parametrize("act_order", [False, True])
def test_identity_hessian_is_rtn(scheme, act_order):
    """With H = I no error is propagated (off-diagonals are 0): GPTQ reduces to RTN exactly."""
    W = torch.randn(16, 72)
    qt, _ = gptq_quantize(W, torch.eye(72), scheme, act_order=act_order)
    ref = quantize(W, scheme)
    assert torch.equal(qt.codes, ref.codes) and torch.equal(qt.scale, ref.scale)
    assert (qt.zero is None and ref.zero is None) or torch.equal(qt.zero, ref.zero)


def _correlated_inputs(n=2048, d=96, seed=0):
    """Activations like an LLM's: mostly a few shared directions, channels of very different scale."""
    g = torch.Generator().manual_seed(seed)
    low_rank = torch.randn(n, d // 8, generator=g) @ torch.randn(d // 8, d, generator=g)
    return (low_rank + 0.1 * torch.randn(n, d, generator=g)) * torch.linspace(0.2, 3, d)


@pytest.mark.parametrize("scheme", [Scheme(3, False, "group", 32), Scheme(4, True, "group", 40), Scheme(2, False, "channel")],
                         ids=lambda s: s.describe())
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_layer_output(scheme, act_order):
    X = _correlated_inputs()
    W = torch.randn(48, X.shape[1])
    h = Hessian(X.shape[1])
    h.add(X[:1000])
    h.add(X[1000:])
    assert torch.allclose(h.H, 2 * X.T @ X / X.shape[0], rtol=1e-4, atol=1e-3)
    qt, loss = gptq_quantize(W, h.H, scheme, act_order=act_order)
    err_gptq = (X @ (dequantize(qt) - W).T).pow(2).mean()
    err_rtn = (X @ (dequantize(quantize(W, scheme)) - W).T).pow(2).mean()
    assert loss > 0 and err_gptq < 0.8 * err_rtn


def test_dead_columns():
    X = _correlated_inputs(512, 64)
    X[:, 5] = 0
    h = Hessian(64)
    h.add(X)
    qt, _ = gptq_quantize(torch.randn(8, 64), h.H, Scheme(4, True, "group", 16))
    assert torch.isfinite(dequantize(qt)).all()
    assert (dequantize(qt)[:, 5] == 0).all()


@pytest.mark.parametrize("opts", [{}, {"act_order": False}, {"true_sequential": False}])
def test_gptq_on_tiny_model_beats_rtn_and_round_trips(tiny, calib, tmp_path, opts):
    model, tok = tiny
    x = calib[:2]
    ref = model(x).logits
    scheme = Scheme(3, False, "group", 32)  # hidden 72: groups of 32, 32, 8
    rtn = lowbit.quantize(copy.deepcopy(model), QuantConfig(scheme=scheme))
    g = lowbit.quantize(copy.deepcopy(model), QuantConfig(method="gptq", scheme=scheme, options=opts), calib_ids=calib)
    assert (g(x).logits - ref).pow(2).mean() < (rtn(x).logits - ref).pow(2).mean()
    before = g(x).logits
    lowbit.save(g, tok, tmp_path / "g")
    loaded, _ = lowbit.load(tmp_path / "g")
    assert torch.equal(loaded(x).logits, before)


def test_calibration_refuses_test_text(tiny):
    from lowbit.calibration.data import calibration_ids
    from lowbit.core.text import TEST_TEXT

    _, tok = tiny
    with pytest.raises(LowbitError, match="test text"):
        calibration_ids(tok, TEST_TEXT, nsamples=2, seqlen=16)


def test_calibration_windows_are_seeded(tiny, text_file):
    from lowbit.calibration.data import calibration_ids

    _, tok = tiny
    a, info = calibration_ids(tok, text_file, nsamples=4, seqlen=16, seed=3)
    b, _ = calibration_ids(tok, text_file, nsamples=4, seqlen=16, seed=3)
    c, _ = calibration_ids(tok, text_file, nsamples=4, seqlen=16, seed=4)
    assert a.shape == (4, 16) and torch.equal(a, b) and not torch.equal(a, c)
    assert info["nsamples"] == 4 and info["seed"] == 3


def test_block_statistics_pass_shares_and_stops_early(tiny, calib):
    """observe_inputs stops each batch after the last listed module's input and every linear still sees every
    batch; linears reading one tensor (q, k, v) share its xᵀx and get the same H as separate accumulation."""
    from lowbit.calibration.sequential import capture_block_inputs, observe_inputs
    from lowbit.core.gptq import Hessians
    from lowbit.models.arch import block_linears, find_blocks

    model, _ = tiny
    name, block = find_blocks(model)[0]
    linears = dict(block_linears(model, name, block))
    inputs, kw = capture_block_inputs(model, block, calib)
    shared, separate, calls = Hessians(linears), {n: Hessian(m.in_features) for n, m in linears.items()}, []
    ran = []
    handle = block.mlp.down_proj.register_forward_hook(lambda *a: ran.append(1))

    def observe(n, x):
        calls.append(n)
        shared.observe(n, x)
        separate[n].add(x)

    try:
        observe_inputs(block, linears, inputs, kw, observe, batch=2)
    finally:
        handle.remove()
    batches = (len(inputs) + 1) // 2
    assert sorted(calls) == sorted(list(linears) * batches)
    assert len(ran) == 1  # down_proj's matmul ran on the first batch only (learning the order)
    for n in linears:
        torch.testing.assert_close(shared[n].H, separate[n].H, rtol=1e-5, atol=1e-6)
    q, k = (n for n in linears if n.endswith(("q_proj", "k_proj")))
    assert torch.equal(shared[q].H, shared[k].H)


def test_transposed_sweep_matches_the_textbook_loop():
    """gptq_quantize sweeps W's transpose for speed; the textbook loop on W (written out here) gives the same
    codes: the per-column arithmetic is the same (the lazy block update's sums may round differently, so a
    rare near-tie may differ)."""
    X = _correlated_inputs(1024, 96)
    H = 2 * X.T @ X / X.shape[0]
    W = torch.randn(40, 96)
    scheme = Scheme(4, True, "group", 32)
    qt, _ = gptq_quantize(W, H, scheme, blocksize=32)
    # textbook GPTQ (Frantar et al., Algorithm 1) with groups fitted when the sweep reaches them
    from lowbit.core.gptq import _group_params, inverse_hessian_factor
    from lowbit.core.quant import compute_qparams  # noqa: F401

    Wr = W.clone()
    Hinv = inverse_hessian_factor(H.clone(), 0.01)
    Q = torch.zeros_like(Wr, dtype=torch.int32)
    for i1 in range(0, 96, 32):
        W1, Err1 = Wr[:, i1:i1 + 32].clone(), torch.zeros(40, 32)
        Hinv1 = Hinv[i1:i1 + 32, i1:i1 + 32]
        s, _ = _group_params(W1, scheme)
        for i in range(32):
            q = torch.round(W1[:, i] / s[:, 0].float()).clamp(scheme.qmin, scheme.qmax)
            Q[:, i1 + i] = q.int()
            err = (W1[:, i] - q * s[:, 0].float()) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        Wr[:, i1 + 32:] -= Err1 @ Hinv[i1:i1 + 32, i1 + 32:]
    assert (qt.codes.int() != Q).float().mean() < 0.002


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
def test_stacked_sweep_equals_one_sweep_per_linear(act_order, symmetric):
    """Linears that read one input (q, k, v) share H; gptq_linears sweeps them stacked by rows. Rows never
    interact, so codes, params and losses equal one gptq_quantize per linear."""
    from lowbit.algorithms.gptq import GptqOptions, gptq_linears
    from lowbit.core.gptq import Hessians
    from lowbit.core.config import QuantConfig

    torch.manual_seed(0)
    scheme = Scheme(3, symmetric, "group", 24)
    linears = {n: torch.nn.Linear(72, out, bias=False) for n, out in (("q", 40), ("k", 16), ("v", 16))}
    linears["o"] = torch.nn.Linear(72, 8, bias=False)
    hess = Hessians(linears)
    for _ in range(2):
        x = torch.randn(64, 72) * torch.linspace(0.1, 3, 72)
        for n in ("q", "k", "v"):
            hess.observe(n, x)
        hess.observe("o", x.clone())  # another tensor: its own H, not stacked with the others
    assert hess.shared(list(linears)) == [["q", "k", "v"], ["o"]]
    config = QuantConfig(method="gptq", scheme=scheme, options=GptqOptions(act_order=act_order))
    Hs = {n: hess[n].H.clone() for n in linears}
    got = gptq_linears(linears, hess, config, config.options)
    assert all(hess[n]._H is None for n in linears)  # each H handed to its sweep: nothing kept
    for n, lin in linears.items():
        want, loss = gptq_quantize(lin.weight, Hs[n], scheme, act_order=act_order)
        qt, got_loss = got[n]
        assert torch.equal(qt.codes, want.codes) and torch.equal(qt.scale, want.scale)
        assert (qt.zero is None) == (want.zero is None) and (qt.zero is None or torch.equal(qt.zero, want.zero))
        assert qt.shape == want.shape
        assert got_loss == pytest.approx(loss, rel=1e-5)


def _codes(model):
    from lowbit.nn.qlinear import QuantLinear

    return {n: (m.qweight.clone(), m.scales.clone()) for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.mark.parametrize("act_order", [False, True])
def test_staged_pass_equals_a_statistics_pass_per_group(tiny, calib, monkeypatch, act_order):
    """True-sequential GPTQ in one staged pass (worker threads taking turns) gives the very same codes and
    block outputs as one statistics pass per group (q/k/v, o, gate/up, down) followed by an output pass."""
    import lowbit.algorithms.gptq as gptq_mod
    import lowbit.calibration.sequential as seq

    model, _ = tiny
    monkeypatch.setattr(seq, "BATCH", 3)  # 8 samples: batches of 3, 3, 2 -> three workers
    monkeypatch.setattr(seq, "PARK_MIN", 0)  # waiting workers park every input in the temporary file
    monkeypatch.setattr(seq, "PARK_BUDGET", 0)
    cfg = QuantConfig(method="gptq", scheme=Scheme(4, True, "group", 32), options={"act_order": act_order})
    calls = []
    real = seq.run_block_staged
    monkeypatch.setattr(gptq_mod, "run_block_staged", lambda *a, **k: calls.append(1) or real(*a, **k))
    staged = lowbit.quantize(copy.deepcopy(model), cfg, calib_ids=calib)
    assert len(calls) == 2  # both blocks ran staged
    monkeypatch.setattr(gptq_mod, "probe_groups", lambda *a: None)  # as for a block with data-dependent calls
    multi = lowbit.quantize(copy.deepcopy(model), cfg, calib_ids=calib)
    a, b = _codes(staged), _codes(multi)
    assert a.keys() == b.keys() and len(a) == 14
    for n in a:
        assert torch.equal(a[n][0], b[n][0]) and torch.equal(a[n][1], b[n][1]), n
    x = calib[:2]
    assert torch.equal(staged(x).logits, multi(x).logits)


class _Block(torch.nn.Module):
    """Calls a then b, or b then a for inputs whose first element is negative (data-dependent order)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

    def forward(self, x):
        if x.flatten()[0] < 0:
            return self.a(self.b(x))
        return self.b(self.a(x))


def _samples(signs):
    return [torch.full((1, 2, 4), float(s)) for s in signs]


def test_staged_pass_refuses_data_dependent_order_without_hanging():
    from lowbit.calibration.sequential import Irregular, probe_groups, run_block_staged

    block = _Block()
    mods = {"a": block.a, "b": block.b}
    assert probe_groups(block, mods, _samples([1])[0], {}) == [["a"], ["b"]]
    seen = []
    with pytest.raises(Irregular):
        run_block_staged(block, mods, [["a"], ["b"]], _samples([1, 1, -1, 1]), {}, lambda n, x: seen.append(n),
                         lambda names: None, batch=1)
    outs = run_block_staged(block, mods, [["a"], ["b"]], _samples([1, 2, 3]), {}, lambda n, x: seen.append(n),
                            lambda names: seen.append(tuple(names)), batch=1)
    assert len(outs) == 3 and torch.equal(outs[1], block(_samples([2])[0]))


def test_staged_pass_hands_errors_to_the_caller():
    from lowbit.calibration.sequential import run_block_staged

    block = _Block()

    def boom(names):
        raise RuntimeError("quantizer failed")

    with pytest.raises(RuntimeError, match="quantizer failed"):
        run_block_staged(block, {"a": block.a, "b": block.b}, [["a"], ["b"]], _samples([1, 2, 3]), {},
                         lambda n, x: None, boom, batch=1)


@pytest.mark.parametrize("n", [5, 288, 300, 1536])
def test_gram_is_xtx_and_exactly_symmetric(n):
    from lowbit.core.gptq import gram

    x = torch.randn(700, n, generator=torch.Generator().manual_seed(n))
    g = gram(x)
    torch.testing.assert_close(g, x.T @ x, rtol=1e-5, atol=1e-3)
    assert torch.equal(g, g.T)


def test_lazy_model_falls_back_after_groups_were_dropped(tiny_dir, calib, monkeypatch):
    """A lazily loaded model drops float copies as groups finish; a block that turns out irregular late (here:
    at its third group) is read again from the file and quantized the slow way, to the codes of a run that
    took the slow path from the start."""
    import lowbit.algorithms.gptq as gptq_mod
    from lowbit import api
    from lowbit.calibration.sequential import Irregular

    cfg = lambda: QuantConfig(method="gptq", scheme=Scheme(4, True, "group", 32))  # noqa: E731
    real = gptq_mod.run_block_staged

    def late_irregular(*a, **k):
        on_group, n = a[6], [0]

        def wrapped(names):
            n[0] += 1
            if n[0] == 3:
                raise Irregular("late")
            on_group(names)
        return real(*a[:6], wrapped, *a[7:], **k)

    monkeypatch.setattr(gptq_mod, "run_block_staged", late_irregular)
    m, _ = api.load(tiny_dir, lazy=True)
    api.quantize(m, cfg(), calib_ids=calib)
    monkeypatch.setattr(gptq_mod, "probe_groups", lambda *a: None)  # the slow path from the start
    ref, _ = api.load(tiny_dir, lazy=True)
    api.quantize(ref, cfg(), calib_ids=calib)
    a, b = _codes(m), _codes(ref)
    assert a.keys() == b.keys() and len(a) == 14
    for n in a:
        assert torch.equal(a[n][0], b[n][0]) and torch.equal(a[n][1], b[n][1]), n


def test_bf16_calibration_forwards_keep_float32_statistics(tiny, calib):
    """--calib-dtype bfloat16: the block forwards run under bf16 autocast, the Hessians and the sweep in float32
    (a Hessian accumulated in bf16 is not positive-definite and would stop the run): codes close to float32's."""
    model, _ = tiny
    out, logits = {}, {}
    for dt in ("float32", "bfloat16"):
        cfg = QuantConfig(method="gptq", scheme=Scheme(4, True, "group", 32), options={"calib_dtype": dt})
        q = lowbit.quantize(copy.deepcopy(model), cfg, calib_ids=calib)
        out[dt], logits[dt] = _codes(q), q(calib[:2]).logits
    a, b = out["float32"], out["bfloat16"]
    assert a.keys() == b.keys() and len(a) == 14
    differ = sum(int((a[n][0] != b[n][0]).sum()) for n in a) / sum(a[n][0].numel() for n in a)
    assert 0 < differ < 0.4  # packed bytes (two codes each) that differ: rounding flips, not another model
    la, lb = logits["float32"], logits["bfloat16"]
    assert (la - lb).abs().max() < 0.1 * la.abs().max()
    with pytest.raises(LowbitError, match="calib-dtype"):
        cfg = QuantConfig(method="gptq", scheme=Scheme(4, True, "group", 32), options={"calib_dtype": "float16"})
        lowbit.quantize(copy.deepcopy(model), cfg, calib_ids=calib)
