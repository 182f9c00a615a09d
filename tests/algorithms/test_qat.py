"""QAT: the STE's gradients, a training step that lowers the loss, exact conversion, exact resume."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lowbit.algorithms.qat import FakeQuantLinear, TrainConfig, batch_at, convert, loss_fn, prepare, train
from lowbit.core.config import QuantConfig
from lowbit.core.quant import dequantize, quantize
from lowbit.core.scheme import Scheme
from lowbit.nn.qlinear import QuantLinear

from tests.conftest import TEXT

W3 = Scheme(bits=3, symmetric=True, granularity="group", group_size=32)
W2A = Scheme(bits=2, symmetric=False, granularity="group", group_size=32)


def lin(rows=8, cols=72, seed=0):
    torch.manual_seed(seed)
    m = nn.Linear(cols, rows, bias=True)
    return m


@pytest.mark.parametrize("scheme", [W3, W2A])
def test_forward_is_rtn_and_gradient_is_clipped_identity(scheme):
    l = lin()
    fq = FakeQuantLinear.from_linear(l, scheme)
    w_hat = fq.quantized_weight()
    assert torch.equal(w_hat, dequantize(quantize(l.weight.detach(), scheme)))
    # push some weights far outside the grid: their codes clamp
    with torch.no_grad():
        fq.weight[0, :4] = 100.0
        fq.weight[1, :4] = -100.0
    w_hat = fq.quantized_weight()
    g = torch.randn_like(w_hat)
    (w_hat * g).sum().backward()
    s = fq._scale().detach()
    from lowbit.core.quant import grouped, ungrouped
    v = grouped(fq.weight.detach(), scheme) / s.unsqueeze(-1)
    z = 0 if fq.zero is None else torch.round(fq.zero.detach()).unsqueeze(-1)
    raw = torch.round(v) + z
    inside = ungrouped((raw >= scheme.qmin) & (raw <= scheme.qmax), 8, 72)
    assert not inside[0, :4].any() and not inside[1, :4].any() and inside.float().mean() > 0.9
    assert torch.equal(fq.weight.grad == 0, (g * inside) == 0)
    assert torch.allclose(fq.weight.grad, g * inside, rtol=1e-6, atol=0)  # (g·s)/s: float rounding only


def test_scale_gradient_is_lsq():
    l = lin(cols=64)  # whole groups (a padded last group would count its padding in this sum)
    fq = FakeQuantLinear.from_linear(l, W3, learn_scale=True)
    fq.quantized_weight().sum().backward()
    from lowbit.core.quant import grouped
    s = fq.scale.detach().half().float().unsqueeze(-1)
    v = grouped(fq.weight.detach(), W3) / s
    q = torch.round(v).clamp(W3.qmin, W3.qmax)
    inside = (torch.round(v) >= W3.qmin) & (torch.round(v) <= W3.qmax)
    want = torch.where(inside, torch.round(v) - v, q).sum(-1)  # d/ds of sum(ŵ)
    assert torch.allclose(fq.scale.grad, want, atol=1e-4)


@pytest.mark.parametrize("scheme", [W3, W2A])
def test_convert_gives_the_same_weights_and_logits(tiny, scheme):
    model, _ = tiny
    student = copy.deepcopy(model)
    prepare(student, QuantConfig(method="qat", scheme=scheme), learn_scale=True, learn_zero=True)
    # move weights and scales off their initial values, as training would
    with torch.no_grad():
        for m in student.modules():
            if isinstance(m, FakeQuantLinear):
                m.weight.add_(torch.randn_like(m.weight) * 0.01)
                m.scale.mul_(1.07)
                if m.zero is not None:
                    m.zero.add_(0.4)
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fake = student(ids).logits
        fqs = {n: m.quantized_weight() for n, m in student.named_modules() if isinstance(m, FakeQuantLinear)}
    convert(student, QuantConfig(method="qat", scheme=scheme))
    for n, m in student.named_modules():
        if n in fqs:
            assert isinstance(m, QuantLinear)
            assert torch.equal(m.dequantize_weight(), fqs[n]), n
    real = student(ids).logits
    assert torch.allclose(real, fake, atol=1e-5, rtol=0)


def test_init_from_a_ptq_model_starts_where_it_ended(tiny):
    import lowbit

    model, tok = tiny
    ptq = copy.deepcopy(model)
    lowbit.quantize(ptq, QuantConfig(method="rtn", scheme=W2A))
    ids = torch.randint(0, 320, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ptq(ids).logits
    prepare(ptq, QuantConfig(method="qat", scheme=W3))  # the checkpoint's scheme wins
    assert all(m.scheme == W2A for m in ptq.modules() if isinstance(m, FakeQuantLinear))
    with torch.no_grad():
        assert torch.allclose(ptq(ids).logits, want, atol=1e-5, rtol=0)


def _ids(tok):
    return tok(TEXT, add_special_tokens=False, return_tensors="pt").input_ids[0]


@pytest.mark.parametrize("distill", [False, True])
def test_a_training_step_lowers_the_loss(tiny, distill):
    model, tok = tiny
    student = copy.deepcopy(model)
    prepare(student, QuantConfig(method="qat", scheme=W2A))
    # Adam's first step moves every weight by ~lr: small against this model's W2 g32 grid (~0.03)
    cfg = TrainConfig(steps=1, lr=3e-4, batch=2, seqlen=32, warmup=1, distill=distill)
    x = batch_at(_ids(tok), cfg, 0)
    with torch.no_grad():
        before = float(loss_fn(student, model, x, distill))
    train(student, model if distill else None, _ids(tok), cfg, progress=False)
    with torch.no_grad():
        after = float(loss_fn(student, model, x, distill))
    assert after < before


def test_resume_continues_exactly(tiny, tmp_path):
    model, tok = tiny
    ids = _ids(tok)
    cfg = TrainConfig(steps=4, lr=3e-3, batch=2, seqlen=32, save_every=2, distill=True)

    def student():
        s = copy.deepcopy(model)
        prepare(s, QuantConfig(method="qat", scheme=W2A), learn_scale=True)
        return s

    a = student()
    train(a, model, ids, cfg, state_dir=tmp_path / "a", progress=False)

    b = student()
    half = TrainConfig(**{**cfg.__dict__, "steps": 4})
    # an interrupted run: only the first 2 steps happen, the state is saved at step 2
    calls = {"n": 0}

    def stop_after_two(rec):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(b, model, ids, half, state_dir=tmp_path / "b", progress=False, log=stop_after_two)
    c = student()  # a fresh process: same starting point, then --resume
    train(c, model, ids, half, state_dir=tmp_path / "b", resume=True, progress=False)
    for (n, p), (_, q) in zip(a.named_parameters(), c.named_parameters()):
        assert torch.equal(p, q), n


def test_cli_qat_end_to_end(cli, tiny_dir, tmp_path, text_file):
    import json

    out = tmp_path / "qat"
    code, stdout, err = cli("qat", str(tiny_dir), str(out), "--bits", "2", "--group-size", "32", "--asym",
                            "--train-text", str(text_file), "--steps", "3", "--seqlen", "32", "--batch", "2",
                            "--lr", "1e-3", "--distill", "--eval-tokens", "256")
    assert code == 0, err
    res = json.loads(stdout.strip().splitlines()[-1])
    assert res["steps"] == 3 and res["heldout_ppl_after"] > 0
    import lowbit

    m, _ = lowbit.load(out)
    assert any(isinstance(x, QuantLinear) for x in m.modules())
    code, _, err = cli("qat", str(tiny_dir), str(tmp_path / "q2"), "--train-text",
                       str(__import__("lowbit").core.text.TEST_TEXT), "--steps", "1")
    assert code == 2 and "test text" in err and not (tmp_path / "q2").exists()


def _blockwise_student(model, scheme=W2A):
    s = copy.deepcopy(model)
    prepare(s, QuantConfig(method="qat", scheme=scheme), learn_scale=True)
    return s


def test_blockwise_phase_lowers_every_blocks_error(tiny):
    from lowbit.algorithms.qat import BlockConfig, train_blockwise

    model, tok = tiny
    student = _blockwise_student(model)
    hist = train_blockwise(student, model, _ids(tok), BlockConfig(epochs=4, lr=3e-3, scale_lr=3e-4, nsamples=8,
                                                                  seqlen=32), progress=False)
    assert [h["block"] for h in hist] == ["model.layers.0", "model.layers.1"]
    assert all(h["mse_after"] < h["mse_before"] for h in hist), hist
    assert all(not p.requires_grad or isinstance(m, FakeQuantLinear)
               for m in student.modules() for p in m.parameters(recurse=False))  # norms, embeddings: frozen


def test_blockwise_resume_continues_exactly(tiny, tmp_path, monkeypatch):
    import lowbit.algorithms.qat as qat

    model, tok = tiny
    cfg = qat.BlockConfig(epochs=2, lr=3e-3, nsamples=4, seqlen=32)
    a = _blockwise_student(model)
    qat.train_blockwise(a, model, _ids(tok), cfg, progress=False)

    real = qat._train_one_block
    calls = {"n": 0}

    def interrupted(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # during the second block
        return real(*args, **kw)

    b = _blockwise_student(model)
    monkeypatch.setattr(qat, "_train_one_block", interrupted)
    with pytest.raises(KeyboardInterrupt):
        qat.train_blockwise(b, model, _ids(tok), cfg, state_dir=tmp_path, progress=False)
    monkeypatch.setattr(qat, "_train_one_block", real)
    c = _blockwise_student(model)  # a fresh process
    hist = qat.train_blockwise(c, model, _ids(tok), cfg, state_dir=tmp_path, resume=True, progress=False)
    assert len(hist) == 2
    for (n, p), (_, q) in zip(a.named_parameters(), c.named_parameters()):
        assert torch.equal(p, q), n
    with pytest.raises(Exception, match="other options"):
        qat.train_blockwise(_blockwise_student(model), model, _ids(tok), qat.BlockConfig(epochs=3, nsamples=4, seqlen=32),
                            state_dir=tmp_path, resume=True, progress=False)


def test_cli_blockwise_only(cli, tiny_dir, tmp_path, text_file):
    import json

    out = tmp_path / "bq"
    code, stdout, err = cli("qat", str(tiny_dir), str(out), "--bits", "2", "--group-size", "32", "--asym",
                            "--train-text", str(text_file), "--steps", "0", "--block-epochs", "1",
                            "--block-samples", "4", "--block-seqlen", "32", "--learn-scales", "--eval-tokens", "256")
    assert code == 0, err
    res = json.loads(stdout.strip().splitlines()[-1])
    assert res["steps"] == 0 and res["block_epochs"] == 1 and len(res["block_mse"]) == 2
    code, _, err = cli("qat", str(tiny_dir), str(tmp_path / "b2"), "--steps", "0")
    assert code == 2 and "--block-epochs" in err
