"""Behaviour unchanged: every method's output on the tiny model equals the recorded golden checkpoints.

Each case runs `lowbit ...` in-process (tests/golden/cases.py) and compares the sha256 of every output
tensor with tests/golden/golden.json, exactly. Cases whose bits are float-order independent (RTN, the
elementwise int8 weights, GGUF's F16/Q8_0/Q4_0/Q5_0 without calibration) are asserted on any machine;
the others only where torch's version and the CPU flags equal the recorded environment, and are
skipped elsewhere with the difference named. To re-record after a deliberate change of results:
``python -m tests.golden.record``.
"""
from __future__ import annotations

import json

import pytest

from tests.golden import cases as G

GOLDEN = json.loads(G.GOLDEN.read_text())
CASES = G.cases()
MISMATCH = G.environment_mismatch(GOLDEN["environment"])
RERECORD = "re-record with `python -m tests.golden.record` if the change is intended"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return G.build_inputs(tmp_path_factory.mktemp("golden-inputs"))


@pytest.fixture(scope="module")
def inputs_match(inputs):
    """None if the input models and tokenizer are the recorded ones, else a description of the difference."""
    got = G.input_hashes(inputs)
    if got == GOLDEN["inputs"]:
        return None
    parts = [f"{k}:\n{G.diff(GOLDEN['inputs'].get(k, {}), got.get(k, {}))}"
             for k in sorted(set(got) | set(GOLDEN["inputs"])) if got.get(k) != GOLDEN["inputs"].get(k)]
    return "\n".join(parts)


def test_case_list_is_recorded():
    """The cases in the code are the recorded ones, with the same command lines."""
    recorded = {n: (c["argv"], c["portable"], c["kind"]) for n, c in GOLDEN["cases"].items()}
    current = {c.name: (list(c.argv), c.portable, c.kind) for c in CASES}
    assert GOLDEN["format"] == G.FORMAT
    assert current == recorded, f"tests/golden/cases.py and golden.json disagree: {RERECORD}"


def test_inputs(inputs_match):
    """The models and the tokenizer ids are built bit for bit as recorded (on any machine: exact values)."""
    assert inputs_match is None, f"the golden inputs differ from the recorded ones:\n{inputs_match}"


def _param(case: G.Case):
    marks = [pytest.mark.slow] if case.slow else []
    return pytest.param(case, id=case.name, marks=marks)


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_golden(case: G.Case, inputs, inputs_match, tmp_path):
    rec = GOLDEN["cases"].get(case.name)
    assert rec is not None, f"{case.name} was never recorded: {RERECORD}"
    if not case.portable and MISMATCH:
        pytest.skip(f"{case.name} is float-order dependent (matmuls, reductions, Cholesky or training) and its "
                    f"hashes hold only on the recording environment: {MISMATCH}")
    assert inputs_match is None, f"the golden inputs differ (see test_inputs), so {case.name} cannot match"
    got = G.run_case(case, inputs, tmp_path)
    where = f" (environment: {MISMATCH}; this case is meant to be portable)" if MISMATCH else ""
    assert got == rec["tensors"], (f"{case.name}: output tensors differ from the golden record{where}:\n"
                                   f"{G.diff(rec['tensors'], got)}\n{RERECORD}")
