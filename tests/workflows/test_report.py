"""lowbit report: a folder of runs -> HTML with the three plots inlined; rendered by headless Chromium when
it is installed (Debian: apt-get install chromium), skipped with a notice otherwise."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from lowbit import api
from lowbit.algorithms.budget import candidate_schemes
from lowbit.core.config import QuantConfig
from lowbit.core.scheme import Scheme
from lowbit.workflows.report import collect, pareto

from tests.conftest import make_tiny_llama, make_tokenizer

pytest.importorskip("matplotlib")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture()
def runs(tmp_path, calib):
    d = tmp_path / "runs"
    d.mkdir()
    tok = make_tokenizer()
    for name, bits in (("w4", 4), ("w2", 2)):
        m = make_tiny_llama()
        api.quantize(m, QuantConfig(method="rtn", scheme=Scheme.from_cli(bits, 32, False)))
        api.save(m, tok, d / name)
        res = api.evaluate(m, tok, text="the quick brown fox " * 50, seqlen=32, progress=False)
        (d / f"{name}.eval.json").write_text(json.dumps(res))
    m = make_tiny_llama()
    cfg = QuantConfig(method="rtn")
    plan = api.plan_budget(m, tok, cfg, target_bpw=3.5, calib_ids=calib[:2], progress=False,
                           candidates=candidate_schemes((2, 4, 8), (32,)))
    api.apply_plan(m, cfg, plan)
    api.quantize(m, cfg)
    api.save(m, tok, d / "budget-3.5")
    res = api.evaluate(m, tok, text="the quick brown fox " * 50, seqlen=32, progress=False)
    (d / "budget-3.5" / "eval.json").write_text(json.dumps(res))
    return d


def test_pareto():
    pts = [(2, 10.0), (3, 8.0), (3.5, 9.0), (4, 7.0), (5, 7.5)]
    assert pareto(pts) == [0, 1, 3]


def test_report_renders(cli, runs, tmp_path):
    got = collect(runs)
    assert {r["label"] for r in got} == {"uniform", "budgeted"} and all(r["ppl"] for r in got)
    out = tmp_path / "rep" / "report.html"
    code, so, se = cli("report", runs, "--out", out)
    assert code == 0, se
    page = out.read_text()
    for key in ("frontier", "sensitivity", "allocation"):
        assert f'id="{key}"' in page and (out.parent / f"{key}.png").stat().st_size > 1000
    assert page.count("data:image/png;base64,") == 3
    if CHROMIUM is None:
        pytest.skip("headless rendering skipped: no Chromium (apt-get install chromium)")
    shot = tmp_path / "shot.png"
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", out.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    for key in ("frontier", "sensitivity", "allocation"):
        assert f'id="{key}"' in dom
    # the images decode: their natural width is set once Chromium has loaded them
    js = ("<script>window.onload=()=>{document.title=[...document.images].map(i=>i.naturalWidth).join(',')}"
          "</script>")
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", js + "</body>"))
    dom2 = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                           "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120).stdout
    title = dom2.split("<title>")[1].split("</title>")[0]
    widths = [int(w) for w in title.split(",")]
    assert len(widths) == 3 and all(w > 100 for w in widths)
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1200,2400", out.as_uri()], capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 10_000


def test_report_bad_input(cli, tmp_path):
    code, _, se = cli("report", tmp_path / "nope", "--out", tmp_path / "r.html")
    assert code == 2 and "not a folder of runs" in se
    (tmp_path / "empty").mkdir()
    code, _, se = cli("report", tmp_path / "empty", "--out", tmp_path / "r.html")
    assert code == 2 and "no lowbit checkpoints" in se and not (tmp_path / "r.html").exists()
    code, _, se = cli("report", tmp_path / "empty", "--out", tmp_path / "r.txt")
    assert code == 2 and ".html" in se
