"""Budgeted GGUF: the planned file size is the written file's size to the byte, within the target; every
tensor has its planned type; the plan is in the metadata; --plan reuses it; bad input refused."""
from __future__ import annotations

import json

import pytest
import torch
from gguf import GGUFReader

from lowbit import api
from lowbit.formats.gguf.blocks import TYPES
from lowbit.formats.gguf.budget import PLAN_KEY, candidates_for, tensor_nbytes

from tests.conftest import TEXT, make_tokenizer
from tests.formats.gguf.test_export import gguf_llama


@pytest.fixture(scope="module")
def model_tok():
    return gguf_llama(), make_tokenizer()


def _ids(tok):
    ids = tok(TEXT, add_special_tokens=False, return_tensors="pt").input_ids[0]
    return ids[: 4 * 64].reshape(4, 64)


def test_candidates_respect_row_divisibility():
    assert "Q4_K" not in candidates_for(576) and "Q4_1" in candidates_for(576)
    assert "Q4_K" in candidates_for(1536) and "F16" in candidates_for(576)
    assert tensor_nbytes("Q4_0", (3, 32)) == 64  # 3 x 18 bytes, padded to 32


@pytest.mark.parametrize("calibrated", [False, True])
def test_planned_size_is_the_file_size(model_tok, tmp_path, calibrated):
    model, tok = model_tok
    ids = _ids(tok)
    plan, stats = api.plan_gguf(model, tok, ids, target_bpw=6.0, calibrated=calibrated, progress=False,
                                allowed=("Q2_K", "Q4_0", "Q4_K", "Q8_0"))
    target = plan["fixed_bytes"] + plan["budget_bytes"]
    assert plan["file_bytes"] <= target
    out = tmp_path / "b.gguf"
    res = api.export_gguf_planned(model, tok, out, plan, ids if calibrated else None, stats, overwrite=False)
    size = out.stat().st_size
    assert size <= target and size == plan["file_bytes"], (size, plan["file_bytes"], target)
    r = GGUFReader(str(out))
    types = {t.name: t.tensor_type.name for t in r.tensors}
    for row in plan["layers"]:
        assert types[row["name"]] == row["choice"]
    kinds = {row["choice"] for row in plan["layers"]}
    assert len(kinds) > 1
    recorded = json.loads(bytes(r.fields[PLAN_KEY].parts[-1]).decode())
    assert recorded["layers"] == [{"name": x["name"], "choice": x["choice"]} for x in plan["layers"]]
    assert res["calibrated"] == calibrated
    # every candidate of every tensor was costed; the plan takes the cheapest where the budget is loose
    costs = plan["sensitivity"]["costs"]
    assert set(costs) == {row["name"] for row in plan["layers"]}
    assert all(c["Q8_0"] <= c["Q2_K"] for c in costs.values())


def test_cli_export_budget_and_plan_reuse(cli, tiny_dir, tmp_path):
    # tiny_dir's hidden size (72) takes no block type but F16: every tensor F16 (the only candidate)
    out, plan = tmp_path / "a.gguf", tmp_path / "p.json"
    code, so, se = cli("export-gguf", tiny_dir, out, "--target-size", "10MB", "--save-plan", plan,
                       "--budget-nsamples", "2")
    assert code == 0, se
    p = json.loads(plan.read_text())
    assert out.stat().st_size == p["file_bytes"] <= 10_000_000
    out2 = tmp_path / "b.gguf"
    code, so, se = cli("export-gguf", tiny_dir, out2, "--plan", plan)
    assert code == 0, se
    assert out2.read_bytes() == out.read_bytes()
    # a plan of names and types only (written by hand) exports too
    hand = tmp_path / "hand.json"
    hand.write_text(json.dumps({"format": p["format"], "kind": "gguf",
                                "layers": [{"name": r["name"], "choice": r["choice"]} for r in p["layers"]]}))
    code, so, se = cli("export-gguf", tiny_dir, tmp_path / "c.gguf", "--plan", hand)
    assert code == 0, se
    assert "no recorded costs" in so


def test_budgeted_wide_model_writes_its_plan(cli, tmp_path):
    """A plan of mostly F16 with some quantized tensors is written as planned (the F16 file type used to
    ignore per-tensor types: every tensor F16, the file over its target). --budget-fill is recorded and the
    file lies in [fill x target, target]; a fraction outside [0, 1] is refused. (The solver's fill itself:
    tests/core/test_budget_solver.py.)"""
    from tests.conftest import make_tokenizer
    from tests.golden.cases import make_wide_llama

    wide = tmp_path / "wide"
    make_wide_llama().save_pretrained(wide)
    make_tokenizer().save_pretrained(wide)
    out, plan = tmp_path / "a.gguf", tmp_path / "a.json"
    code, so, se = cli("export-gguf", wide, out, "--target-size", "2MB", "--budget-nsamples", "2",
                       "--budget-fill", "0.99", "--save-plan", plan)
    assert code == 0, se
    p = json.loads(plan.read_text())
    kinds = {r["choice"] for r in p["layers"]}
    assert "F16" in kinds and kinds - {"F16"}  # a mixture
    assert out.stat().st_size == p["file_bytes"] and 0.99 * 2_000_000 <= p["file_bytes"] <= 2_000_000
    assert p["target"]["fill"] == 0.99 and p["cost"] >= p["lower_bound"]
    code, so, se = cli("export-gguf", wide, tmp_path / "c.gguf", "--target-size", "2MB", "--budget-fill", "1.5")
    assert code == 2 and "--budget-fill" in se and not (tmp_path / "c.gguf").exists()


def test_tensor_type_applies_to_float_file_types(cli, tmp_path):
    """--tensor-type overrides an F16 file's tensors too."""
    from tests.conftest import make_tokenizer
    from tests.golden.cases import make_wide_llama

    wide = tmp_path / "wide"
    make_wide_llama().save_pretrained(wide)
    make_tokenizer().save_pretrained(wide)
    code, so, se = cli("export-gguf", wide, tmp_path / "a.gguf", "--type", "F16", "--tensor-type", "ffn_down=Q8_0")
    assert code == 0, se
    assert "Q8_0 x2" in so


@pytest.mark.parametrize("args,msg", [
    (["--target-size", "1kB"], "header"),
    (["--target-size", "10MB", "--tensor-type", "attn_v=Q8_0"], "do not combine"),
    (["--target-size", "10MB", "--target-bpw", "4"], "one of"),
])
def test_cli_export_bad_budget(cli, tiny_dir, tmp_path, args, msg):
    out = tmp_path / "x.gguf"
    code, _, se = cli("export-gguf", tiny_dir, out, "--budget-nsamples", "2", *args)
    errors = [line for line in se.splitlines() if "lowbit: error:" in line]
    assert code == 2 and len(errors) == 1 and msg in errors[0], se[-500:]
    assert not out.exists()
