"""`lowbit report`: a folder of runs (lowbit checkpoints, .gguf files, each with its eval JSON) -> one
self-contained HTML page (the PNGs inlined as data URIs, and also written next to it):

  - perplexity vs bits per weight: every run, the Pareto frontier, presets and budgeted runs marked;
  - the per-layer sensitivity heat map of a budgeted run (log10 cost, layers x candidates);
  - the bits per weight each layer got in the budgeted runs.

A run's eval JSON is `<checkpoint>.eval.json` next to the folder, `<checkpoint>/eval.json`, or
`<file>.gguf.eval.json` / `<file>.eval.json` next to the file; it holds at least {"ppl": ...} (what
`lowbit eval --json` prints; a "bpw" there is used for checkpoints). A run without one is listed, unplotted.
"""
from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path

from ..errors import LowbitError


def _eval_json(path: Path) -> dict | None:
    cands = [path.with_name(path.name + ".eval.json"), path.with_suffix(".eval.json"), path / "eval.json"]
    for c in cands:
        if c.is_file():
            try:
                d = json.loads(c.read_text().strip().splitlines()[-1])
            except (json.JSONDecodeError, IndexError, UnicodeDecodeError):
                raise LowbitError(f"{c}: not an eval JSON (lowbit eval --json prints one)") from None
            if not isinstance(d, dict) or not isinstance(d.get("ppl"), (int, float)):
                raise LowbitError(f"{c}: no ppl in it")
            return d
    return None


def _gguf_run(path: Path) -> dict:
    from ..formats.gguf.reader import gguf_table

    rows, total = gguf_table(path)
    plan = None
    try:
        import gguf

        r = gguf.GGUFReader(str(path))
        f = r.fields.get("lowbit.budget")
        if f is not None:
            plan = json.loads(bytes(f.parts[-1]).decode())
    except Exception:
        plan = None
    return {"name": path.name, "kind": "gguf", "bpw": total["bpw"], "bytes": total["file_bytes"], "plan": plan,
            "label": "budgeted" if plan else "preset"}


def _checkpoint_run(path: Path) -> dict | None:
    conf = path / "config.json"
    if not conf.is_file():
        return None
    try:
        qc = json.loads(conf.read_text()).get("quantization_config") or {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if qc.get("quant_method") != "lowbit":
        return None
    plan = qc.get("budget")
    return {"name": path.name, "kind": "checkpoint", "bpw": plan.get("bpw") if plan else None, "plan": plan,
            "label": "budgeted" if plan else "uniform", "method": qc.get("method")}


def collect(folder: str | os.PathLike) -> list[dict]:
    folder = Path(folder)
    if not folder.is_dir():
        raise LowbitError(f"{folder}: not a folder of runs")
    runs = []
    for p in sorted(folder.iterdir()):
        run = None
        if p.is_file() and p.suffix.lower() == ".gguf":
            run = _gguf_run(p)
        elif p.is_dir():
            run = _checkpoint_run(p)
        if run is None:
            continue
        ev = _eval_json(p)
        run["ppl"] = ev.get("ppl") if ev else None
        if ev and ev.get("bpw") is not None and run["kind"] == "checkpoint":
            run["bpw"] = ev["bpw"]
        runs.append(run)
    if not runs:
        raise LowbitError(f"{folder}: no lowbit checkpoints or .gguf files in it")
    return runs


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats in both bits (less) and ppl (less), by bits."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    out, best = [], float("inf")
    for i in order:
        if points[i][1] < best:
            out.append(i)
            best = points[i][1]
    return out


def _plots(runs: list[dict], out_dir: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    files = {}
    scored = [r for r in runs if r.get("ppl") is not None and r.get("bpw") is not None]
    fig, ax = plt.subplots(figsize=(8, 5))
    marks = {"budgeted": ("o", "tab:red"), "preset": ("s", "tab:blue"), "uniform": ("s", "tab:blue")}
    for kind in ("gguf", "checkpoint"):
        for label, (m, c) in marks.items():
            pts = [r for r in scored if r["kind"] == kind and r["label"] == label]
            if pts:
                ax.scatter([r["bpw"] for r in pts], [r["ppl"] for r in pts], marker=m if kind == "gguf" else "^",
                           color=c, label=f"{kind} {label}", zorder=3)
                for r in pts:
                    ax.annotate(r["name"], (r["bpw"], r["ppl"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    if scored:
        idx = pareto([(r["bpw"], r["ppl"]) for r in scored])
        ax.plot([scored[i]["bpw"] for i in idx], [scored[i]["ppl"] for i in idx], "k--", lw=1, label="Pareto frontier")
    ax.set_xlabel("bits per weight")
    ax.set_ylabel("perplexity")
    ax.set_title("perplexity vs bits per weight")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    files["frontier"] = out_dir / "frontier.png"
    fig.tight_layout()
    fig.savefig(files["frontier"], dpi=110)
    plt.close(fig)

    planned = [r for r in runs if r.get("plan") and (r["plan"].get("sensitivity") or {}).get("costs")]
    if planned:
        r = planned[0]
        sens = r["plan"]["sensitivity"]
        names = list(sens["costs"])
        cands = sens.get("candidates") or []
        if isinstance(sens["costs"][names[0]], dict):  # GGUF: {type: cost}
            cands = [c for c in cands if any(c in sens["costs"][n] for n in names)]
            mat = np.array([[sens["costs"][n].get(c, np.nan) for c in cands] for n in names], dtype=float)
        else:
            mat = np.array([sens["costs"][n] for n in names], dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            lm = np.log10(np.where(mat > 0, mat, np.nan))
        fig, ax = plt.subplots(figsize=(8, max(4, len(names) * 0.05)))
        im = ax.imshow(lm, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xticks(range(len(cands)))
        ax.set_xticklabels(cands, rotation=90, fontsize=6)
        step = max(1, len(names) // 40)
        ax.set_yticks(range(0, len(names), step))
        ax.set_yticklabels([names[i] for i in range(0, len(names), step)], fontsize=5)
        fig.colorbar(im, ax=ax, label="log10 sensitivity cost")
        ax.set_title(f"per-layer sensitivity ({r['name']})")
        files["sensitivity"] = out_dir / "sensitivity.png"
        fig.tight_layout()
        fig.savefig(files["sensitivity"], dpi=110)
        plt.close(fig)

    budgeted = [r for r in runs if r.get("plan") and r["plan"].get("layers")]
    if budgeted:
        fig, ax = plt.subplots(figsize=(10, 4))
        for r in budgeted:
            layers = r["plan"]["layers"]
            bits = []
            for row in layers:
                b = row.get("bpw")
                if b is None:  # the GGUF record keeps name and type only
                    from ..formats.gguf.blocks import TYPES

                    t = TYPES[row["choice"]]
                    b = 8 * t.type_size / t.block_size
                bits.append(b)
            ax.plot(range(len(bits)), bits, marker=".", lw=0.8, label=r["name"])
        ax.set_xlabel("layer (in model order)")
        ax.set_ylabel("bits per weight allocated")
        ax.set_title("bits allocated per layer")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        files["allocation"] = out_dir / "allocation.png"
        fig.tight_layout()
        fig.savefig(files["allocation"], dpi=110)
        plt.close(fig)
    return files


def render(folder: str | os.PathLike, out: str | os.PathLike) -> dict:
    """Write the report: `out` (.html) and its PNGs next to it. Returns {"html", "plots", "runs"}."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise LowbitError("lowbit report needs matplotlib (pip install matplotlib)") from None
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise LowbitError(f"{out}: the report is an .html file")
    runs = collect(folder)
    out.parent.mkdir(parents=True, exist_ok=True)
    files = _plots(runs, out.parent)
    rows = []
    for r in sorted(runs, key=lambda r: (r.get("bpw") or 0)):
        ppl = f"{r['ppl']:.4f}" if r.get("ppl") is not None else "-"
        bpw = f"{r['bpw']:.3f}" if r.get("bpw") is not None else "-"
        size = f"{r['bytes']:,}" if r.get("bytes") else "-"
        rows.append(f"<tr><td>{html.escape(r['name'])}</td><td>{r['kind']}</td><td>{r['label']}</td>"
                    f"<td>{bpw}</td><td>{size}</td><td>{ppl}</td></tr>")
    imgs = []
    for key, title in (("frontier", "Perplexity vs bits per weight"), ("sensitivity", "Per-layer sensitivity"),
                       ("allocation", "Bits allocated per layer")):
        if key in files:
            data = base64.b64encode(files[key].read_bytes()).decode()
            imgs.append(f'<h2>{title}</h2><img id="{key}" alt="{title}" src="data:image/png;base64,{data}">')
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>lowbit report</title>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}img{max-width:100%}</style></head><body>"
            f"<h1>lowbit report: {html.escape(str(folder))}</h1>"
            "<table><tr><th>run</th><th>kind</th><th>label</th><th>bits/weight</th><th>file bytes</th><th>ppl</th></tr>"
            + "".join(rows) + "</table>" + "".join(imgs) + "</body></html>")
    out.write_text(page)
    return {"html": str(out), "plots": {k: str(v) for k, v in files.items()}, "runs": len(runs)}
