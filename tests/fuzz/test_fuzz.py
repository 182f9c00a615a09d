"""The fast fuzz subset: FUZZ_CASES (default 120) structured mutations of the tiny model's checkpoint, GGUF files,
Hugging Face folder, texts and outputs, each run through the real CLI in a forked subprocess (tests/fuzz/
forkserver.py) with a 2 GB memory cap and a timeout, and judged (tests/fuzz/campaign.py). bench/fuzz.py runs
the long campaign.

A case fails on any problem (a signal, a traceback, an exit code other than 0 and 2, a timeout, a peak RSS
over the cap, a leftover file, a silent load of other weights, more or less than one `lowbit: error:` line,
OUT replaced or refused against --force's rules). No case is an expected failure.
"""
from __future__ import annotations

import os
import time

import pytest

from tests.fuzz.campaign import Campaign, summarize

N = int(os.environ.get("FUZZ_CASES", "120"))
SEED = int(os.environ.get("FUZZ_SEED", "0"))


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    c = Campaign(tmp_path_factory.mktemp("fuzz"), jobs=2, timeout=30).start()
    yield c
    c.close()


@pytest.fixture(scope="module")
def results(campaign):
    t0 = time.time()
    res = campaign.run(campaign.make_cases(N, SEED))
    summary = summarize(res, time.time() - t0)
    print(f"\nfuzz: {summary['cases']} cases in {summary['seconds']} s; exits {summary['exits']}; "
          f"failures {summary['failures']} {summary['failures_by_area']}")
    return {r["id"]: r for r in res}


def test_fork_server_enforces_timeout_and_memory_cap(campaign):
    """The harness itself: a child past its timeout is killed (a hang), one past its memory cap cannot
    allocate (its exit is not 0 or 2), and the peak RSS comes back."""
    s = campaign.seeds
    argv = ["eval", "ckpt", "--text", str(s / "text.txt"), "--seqlen", "32", "--limit-tokens", "96"]
    ok, slow, small = (campaign._req(argv, s, tag) for tag in ("h-ok", "h-slow", "h-small"))
    slow["timeout"] = 0.05
    small["mem_cap"] = 1 << 20
    got = {r["id"]: r for r in campaign.server.run_many([{**ok, "id": 1}, {**slow, "id": 2}, {**small, "id": 3}])}
    assert got[1]["code"] == 0 and not got[1]["timed_out"] and got[1]["peak_rss"] > 50 << 20
    assert got[2]["timed_out"] and got[2]["signal"] == 9
    assert got[3]["code"] not in (0, 2) or got[3]["signal"] is not None


@pytest.mark.parametrize("i", range(N))
def test_case(results, i):
    r = next(v for k, v in results.items() if k.startswith(f"{SEED}-{i:05d}-"))
    if not r["problems"]:
        return
    detail = f"{r['target']} {r['command']} [{r['mutation']}]: {r['problems']}; {r['error']}\n{r['stderr_tail']}"
    pytest.fail(detail)
