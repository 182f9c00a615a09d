"""Budgeted lowbit checkpoints: exact byte counts, the proxy's sense, plans within budget that every method
honours, checkpoints that record the plan and load back bit-exactly, --plan reuse, bad input refused."""
import json

import pytest
import torch

import lowbit
from lowbit import api
from lowbit.algorithms.budget import (candidate_schemes, parse_candidates, plan_overrides, read_plan,
                                      scheme_label, scheme_nbytes)
from lowbit.calibration.sensitivity import layer_statistics, proxy_cost, spearman
from lowbit.core.config import QuantConfig
from lowbit.core.scheme import Scheme
from lowbit.errors import LowbitError
from lowbit.eval.size import weight_stats
from lowbit.nn.qlinear import QuantLinear

from tests.conftest import make_tiny_llama, make_tokenizer


@pytest.mark.parametrize("shape", [(16, 72), (7, 100), (160, 72)])
@pytest.mark.parametrize("spec", ["2/32/asym", "3/64/asym", "4/128/sym", "5/-1/asym", "8/32/asym", "6/16/sym"])
def test_scheme_nbytes_is_what_quantlinear_stores(shape, spec):
    s = Scheme.parse(spec)
    lin = torch.nn.Linear(shape[1], shape[0], bias=False)
    assert scheme_nbytes(s, *shape) == QuantLinear.from_linear(lin, s).weight_nbytes()
    assert Scheme.parse(scheme_label(s)) == s


def test_candidates_parse():
    c = parse_candidates("2,4/32,128/both")
    assert len(c) == 8 and Scheme.parse("4/128/sym") in c
    for bad in ("x/32", "2/32/maybe", "2/32/asym/x"):
        with pytest.raises(LowbitError):
            parse_candidates(bad)


def test_proxy_is_sensible(calib):
    model = make_tiny_llama()
    st = layer_statistics(model, calib[:4], progress=False)
    name = "model.layers.0.mlp.down_proj"
    W = model.get_submodule(name).weight
    assert st[name].H.shape == (160, 160) and st[name].f.shape == (72,) and (st[name].f >= 0).all()
    costs = {}
    for b in (2, 3, 4, 8):
        s = Scheme.from_cli(b, 32, False)
        D = lowbit.core.quant.dequantize(lowbit.core.quant.quantize(W, s)) - W
        costs[b] = proxy_cost(D, st[name])
    assert costs[2] > costs[3] > costs[4] > costs[8] >= 0
    assert proxy_cost(torch.zeros_like(W), st[name]) == 0
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)


def test_gptq_error_costs_reduce_to_rtn_with_identity_h_and_weigh_gptq_error_otherwise():
    """Differential: with H = I, GPTQ is RTN, so the 'gptq' costs equal the 'rtn' ones; with a correlated H
    they are the proxy of the error GPTQ leaves (checked against gptq_rows on the same sampled rows)."""
    from lowbit.algorithms.budget import _layer_costs, row_sample
    from lowbit.calibration.sensitivity import LayerStats
    from lowbit.core.gptq import gptq_rows
    from lowbit.core.quant import dequantize

    g = torch.Generator().manual_seed(0)
    W = torch.randn(300, 96, generator=g)
    f = torch.rand(300, generator=g) + 0.1
    cands = [Scheme.parse(c) for c in ("2/32/asym", "3/32/asym", "4/64/sym", "8/-1/asym")]
    eye = LayerStats(torch.eye(96), f)
    assert _layer_costs(W, eye, cands, error="gptq") == _layer_costs(W, eye, cands, error="nearest")
    X = torch.randn(512, 96, generator=g) @ torch.randn(96, 96, generator=g)  # correlated inputs
    st = LayerStats(X.T @ X / 512, f)
    got = _layer_costs(W, st, cands, error="gptq", gptq={"percdamp": 0.01, "act_order": True})
    sl, k = row_sample(300)
    for s, c in zip(cands, got):
        qt, _ = gptq_rows(W[sl], st.H, s, percdamp=0.01, act_order=True)
        D = dequantize(qt) - W[sl]
        assert c == pytest.approx(k * proxy_cost(D, LayerStats(st.H, f[sl])), rel=1e-5)
    rtn = _layer_costs(W, st, cands, error="nearest")
    assert sum(got[:2]) < sum(rtn[:2])  # GPTQ lowers the H-weighted error where it matters (2-3 bits)


def test_budget_plan_with_gptq_errors_records_them(calib):
    model, tok = make_tiny_llama(), make_tokenizer()
    cfg = QuantConfig(method="gptq", options={"nsamples": 4, "calib_seqlen": 64})
    plan = api.plan_budget(model, tok, cfg, target_bpw=3.5, calib_ids=calib[:4], progress=False, error="gptq",
                           candidates=candidate_schemes((2, 3, 4), (32,)))
    assert plan["sensitivity"]["error"] == "gptq" and plan["bpw"] <= 3.5
    with pytest.raises(LowbitError, match="budget error"):
        api.plan_budget(model, tok, cfg, target_bpw=3.5, calib_ids=calib[:4], progress=False, error="awq")


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_budget_plan_is_respected_and_round_trips(method, calib, tmp_path):
    model, tok = make_tiny_llama(), make_tokenizer()
    cfg = QuantConfig(method=method, options={"nsamples": 4, "calib_seqlen": 64} if method == "gptq" else {})
    plan = api.plan_budget(model, tok, cfg, target_bpw=3.5, calib_ids=calib[:4], progress=False,
                           candidates=candidate_schemes((2, 3, 4, 8), (32,)))
    assert plan["bytes"] <= plan["budget_bytes"] and plan["bpw"] <= 3.5
    assert plan["exact"] or plan["gap"] >= 0
    choices = {r["choice"] for r in plan["layers"]}
    assert len(choices) > 1  # 3.5 bits is a mixture of the candidates
    api.apply_plan(model, cfg, plan)
    api.quantize(model, cfg, tokenizer=tok, calib_ids=calib[:4])
    st = weight_stats(model)
    assert st["quantized_bytes"] == plan["bytes"] and st["bpw"] <= 3.5
    for r in plan["layers"]:
        assert model.get_submodule(r["name"]).scheme == Scheme.parse(r["choice"])
    out = api.save(model, tok, tmp_path / "ck")
    conf = json.loads((out / "config.json").read_text())["quantization_config"]
    assert conf["budget"]["layers"] == plan["layers"]
    m2, _ = lowbit.load(out)
    x = calib[:2]
    with torch.no_grad():
        assert torch.equal(model(x).logits, m2(x).logits)
    # the checkpoint's config.json is a plan too
    again = read_plan(out / "config.json", "lowbit") if "budget" in json.loads((out / "config.json").read_text()) else None
    assert again is None or again["layers"] == plan["layers"]


def test_target_size_counts_the_float_tensors(calib):
    model, tok = make_tiny_llama(), make_tokenizer()
    cfg = QuantConfig(method="rtn")
    fixed = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "layers" not in n or
                "proj" not in n)
    with pytest.raises(LowbitError, match="float tensors kept alone"):
        api.plan_budget(model, tok, cfg, target_size=fixed // 2, calib_ids=calib[:2], progress=False)
    big = 10**7
    plan = api.plan_budget(model, tok, cfg, target_size=big, calib_ids=calib[:2], progress=False)
    assert plan["target"]["size"] == big and plan["target"]["fixed_bytes"] + plan["bytes"] <= big


def test_kl_validation_and_rescaling(calib):
    model, tok = make_tiny_llama(), make_tokenizer()
    cfg = QuantConfig(method="rtn")
    plan = api.plan_budget(model, tok, cfg, target_bpw=4.0, calib_ids=calib[:6], kl=True, progress=False,
                           candidates=candidate_schemes((2, 4, 8), (32,)))
    v = plan["sensitivity"]["validation"]
    assert v["used"] and -1 <= v["spearman"] <= 1 and len(v["kl"]) == 14
    assert all(k >= 0 for k in v["kl"].values())
    ref = v["reference"]
    i = plan["sensitivity"]["candidates"].index(ref) if ref in plan["sensitivity"]["candidates"] else None
    if i is not None:  # rescaled: the cost at the reference scheme is the measured KL
        for n, c in plan["sensitivity"]["costs"].items():
            assert c[i] == pytest.approx(v["kl"][n], rel=1e-6)


def test_plan_overrides_refuse_unknown_layers():
    plan = {"layers": [{"name": "model.layers.9.mlp.up_proj", "choice": "4/32/asym"}]}
    with pytest.raises(LowbitError, match="not a quantizable layer"):
        plan_overrides(plan, ["model.layers.0.mlp.up_proj"])


def test_cli_budget_then_plan_reuse(cli, tiny_dir, text_file, tmp_path):
    out, plan_file = tmp_path / "b", tmp_path / "plan.json"
    code, so, se = cli("quantize", tiny_dir, out, "--method", "rtn", "--target-bpw", "3.5", "--save-plan", plan_file,
                       "--budget-schemes", "2,3,4,8/32/asym", "--budget-nsamples", "2")
    assert code == 0, se
    assert "bits/weight" in so and "layers:" in so
    plan = json.loads(plan_file.read_text())
    out2 = tmp_path / "b2"
    code, so2, se2 = cli("quantize", tiny_dir, out2, "--method", "rtn", "--plan", plan_file)
    assert code == 0, se2
    a = json.loads((out / "config.json").read_text())["quantization_config"]["layers"]
    b = json.loads((out2 / "config.json").read_text())["quantization_config"]["layers"]
    assert {k: v.get("scheme") for k, v in a.items()} == {k: v.get("scheme") for k, v in b.items()}
    assert plan["bpw"] <= 3.5


@pytest.mark.parametrize("args,msg", [
    (["--target-bpw", "3", "--target-size", "1MB"], "one of"),
    (["--target-size", "lots"], "bad size"),
    (["--target-bpw", "-1"], "target-bpw"),
    (["--target-bpw", "0.5"], "below the smallest"),
    (["--target-bpw", "3", "--budget-error", "awq"], "--budget-error 'awq'"),
])
def test_cli_bad_budget_is_one_line_exit_2(cli, tiny_dir, tmp_path, args, msg):
    out = tmp_path / "x"
    code, _, se = cli("quantize", tiny_dir, out, "--method", "rtn", "--budget-nsamples", "2", *args)
    errors = [line for line in se.splitlines() if "lowbit: error:" in line]
    assert code == 2 and len(errors) == 1 and msg in errors[0] and errors[0].startswith("lowbit: error:")
    assert not out.exists()


def test_cli_bad_plan_file(cli, tiny_dir, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    out = tmp_path / "x"
    code, _, se = cli("quantize", tiny_dir, out, "--plan", bad)
    assert code == 2 and "not a lowbit budget plan" in se and not out.exists()


def test_replan_from_recorded_costs(calib):
    model, tok = make_tiny_llama(), make_tokenizer()
    cfg = QuantConfig(method="rtn")
    cands = candidate_schemes((2, 3, 4, 8), (32,))
    a = api.plan_budget(model, tok, cfg, target_bpw=4.0, calib_ids=calib[:2], progress=False, candidates=cands)
    b = api.plan_budget(model, tok, cfg, target_bpw=3.0, progress=False, reuse=a)
    direct = api.plan_budget(model, tok, cfg, target_bpw=3.0, calib_ids=calib[:2], progress=False, candidates=cands)
    assert b["layers"] == direct["layers"] and b["bpw"] <= 3.0 < a["bpw"] <= 4.0


def test_cli_hand_written_plan_gets_its_bytes_computed(cli, tiny_dir, tmp_path):
    """A plan of names and choices only (written by hand) quantizes; the bytes and bits per weight recorded in
    the checkpoint are computed from the schemes, not taken from the file (a recorded plan cannot misstate them)."""
    out, plan_file = tmp_path / "b", tmp_path / "plan.json"
    code, _, se = cli("quantize", tiny_dir, out, "--method", "rtn", "--target-bpw", "3.5", "--save-plan", plan_file,
                      "--budget-schemes", "2,3,4,8/32/asym", "--budget-nsamples", "2")
    assert code == 0, se
    full = json.loads(plan_file.read_text())
    hand = {"format": full["format"], "kind": "lowbit",
            "layers": [{"name": r["name"], "choice": r["choice"]} for r in full["layers"]]}
    hand["layers"][0]["bytes"] = 1  # a lie about the size: replaced by the true count
    hf = tmp_path / "hand.json"
    hf.write_text(json.dumps(hand))
    out2 = tmp_path / "b2"
    code, so, se = cli("quantize", tiny_dir, out2, "--method", "rtn", "--plan", hf)
    assert code == 0, se
    assert "no recorded costs" in so
    rec = json.loads((out2 / "config.json").read_text())["quantization_config"]["budget"]
    assert [(r["name"], r["choice"], r["bytes"], r["bpw"]) for r in rec["layers"]] == \
        [(r["name"], r["choice"], r["bytes"], r["bpw"]) for r in full["layers"]]
    assert rec["bytes"] == full["bytes"] and rec["bpw"] == full["bpw"] and rec["cost"] is None


@pytest.mark.parametrize("field,value", [("bytes", "many"), ("cost", -1.0), ("bpw", float("nan")),
                                         ("weights", True), ("cost", [1])])
def test_cli_plan_with_bad_numbers_is_refused(cli, tiny_dir, tmp_path, field, value):
    plan = {"format": "lowbit-budget-plan/1", "kind": "lowbit",
            "layers": [{"name": "model.layers.0.mlp.up_proj", "choice": "4/32/asym", field: value}]}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(plan))
    out = tmp_path / "x"
    code, _, se = cli("quantize", tiny_dir, out, "--method", "rtn", "--plan", bad)
    errors = [line for line in se.splitlines() if "lowbit: error:" in line]
    assert code == 2 and len(errors) == 1 and field in errors[0] and not out.exists()


@pytest.mark.parametrize("method,error", [("rtn", "nearest"), ("gptq", "gptq"), ("awq+gptq", "gptq")])
def test_budget_error_auto_follows_the_method(method, error, calib):
    model, tok = make_tiny_llama(), make_tokenizer()
    cfg = QuantConfig(method=method, options={"nsamples": 4, "calib_seqlen": 64} if method != "rtn" else {})
    plan = api.plan_budget(model, tok, cfg, target_bpw=3.5, calib_ids=calib[:4], progress=False,
                           candidates=candidate_schemes((2, 3, 4), (32,)))
    assert plan["sensitivity"]["error"] == error


def test_costs_weigh_the_methods_clip_search():
    """With the method's clip search (clip_grid > 1) the proxy weighs the searched grid's error (rtn: the
    search's codes; gptq: gptq_rows with clip_grid); clip_grid 0 or 1 is min/max, as before."""
    from lowbit.algorithms.budget import _layer_costs
    from lowbit.calibration.sensitivity import LayerStats
    from lowbit.core.gptq import gptq_rows
    from lowbit.core.quant import dequantize, quantize, search_qparams

    g = torch.Generator().manual_seed(3)
    W = torch.randn(24, 64, generator=g)
    X = torch.randn(256, 64, generator=g) * torch.linspace(0.2, 3, 64)
    st = LayerStats(X.T @ X / 256, torch.rand(24, generator=g) + 0.1)
    s = Scheme.parse("3/32/asym")
    plain = _layer_costs(W, st, [s])
    assert _layer_costs(W, st, [s], gptq={"clip_grid": 1}) == plain
    searched = dequantize(quantize(W, s, *search_qparams(W, s, 10))) - W
    assert _layer_costs(W, st, [s], gptq={"clip_grid": 10}) == [pytest.approx(proxy_cost(searched, st), rel=1e-6)]
    qt, _ = gptq_rows(W, st.H, s, clip_grid=10)
    want = proxy_cost(dequantize(qt) - W, st)
    assert _layer_costs(W, st, [s], error="gptq", gptq={"clip_grid": 10}) == [pytest.approx(want, rel=1e-6)]
