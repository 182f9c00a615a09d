"""The quality frontier (issues 3, 26): every runnable peer and every lowbit method, perplexity vs stored bits
per weight, at each weight setting -> JSON lines on stdout, a markdown table and a plot.

    python bench/peers/run.py --work DIR [--setup] [--nsamples 16] [--limit-tokens 8192] [--limit-tokens2 4096]
        [--settings w4g128,w4g64,w3g128,w2g64] [--peers gptqmodel,llmcompressor,hqq,autoround]
        [--lowbit rtn,gptq,gptq-clip,awq+gptq] [--autoround-iters 200] [--autoround-lr LR]
        [--markdown F.md] [--plot F.png]

The peers are not lowbit dependencies: each lives in its own venv under DIR (made with `--setup`:
`pip install torch==2.13.0` first, so nothing pulls a CUDA build it does not already ask for, then the package,
which may move torch and transformers to the versions it pins). Everyone gets the same float model (lowbit's
safetensors conversion of the embedded SmolLM2), the same calibration token windows (lowbit's: WikiText-2 valid,
seed 0, written to a safetensors file the peers read; HQQ takes none) and is scored by the same code (`ppl.py`)
on the same windows of two texts: WikiText-2 test and a second text (default: the GNU/MPL/Apache licence texts
of /usr/share/common-licenses, legal English no tool calibrates on; its sha256 is printed). Each quantization is
one fresh process, timed from start to saved checkpoint (imports, loading and saving included: what a user
waits for), with its own peak RSS. Bits per weight are counted from what each tool saves (ppl.stored_bpw: every
tensor under a quantized linear's name: codes, scales, zero points, group indices), over the same weights.

Settings: wNgG = N-bit weights, G columns per group. A peer runs the settings it supports: llm-compressor
refuses g128 here (576 columns are not a multiple of 128); GPTQModel, HQQ and AutoRound take all four. The
peers run symmetric (their defaults) except HQQ, whose grid is asymmetric by construction (fp16 scale and zero).
lowbit's variants (LOWBIT below) run at every setting; the block-wise QAT variants (QAT below: `lowbit qat
--init` from a PTQ variant of the same run, training windows of WikiText-2 valid minus its last 10%) at the
bit widths of `--qat-bits`, their wall time counted from the float model (the PTQ start's included). `--results` keeps finished rows in DIR/results.jsonl and
`--resume` reuses those measured on the same token file (the table says so when it does).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import lowbit  # noqa: E402
from common import emit, log, markdown  # noqa: E402
from ppl import scores, stored_bpw  # noqa: E402

# peer -> package, script, the settings it supports (groups, bits), whether it is symmetric as run, notes
PEERS = {
    "gptqmodel": {"package": "gptqmodel", "script": "peer_gptqmodel.py", "groups": (128, 64), "bits": (4, 3, 2),
                  "sym": True, "label": "GPTQModel (GPTQ: damp 0.05, act_group_aware, true_sequential)"},
    "llmcompressor": {"package": "llmcompressor", "script": "peer_llmcompressor.py", "groups": (64,),
                      "bits": (4, 3, 2), "sym": True,
                      "label": "llm-compressor (GPTQModifier: actorder static, damp 0.01)"},
    "hqq": {"package": "hqq", "script": "peer_hqq.py", "groups": (128, 64), "bits": (4, 3, 2), "sym": False,
            "label": "HQQ (calibration-free half-quadratic fit; fp16 scale+zero)"},
    "autoround": {"package": "auto-round", "script": "peer_autoround.py", "groups": (128, 64), "bits": (4, 3, 2),
                  "sym": True, "label": "AutoRound (sign-SGD rounding + clipping, per block)"},
}
# lowbit variant -> quantize flags (the scheme's bits/group come from the setting)
LOWBIT = {
    "rtn": ["--method", "rtn", "--sym"],
    "rtn-asym": ["--method", "rtn", "--asym"],
    "gptq": ["--method", "gptq", "--sym"],
    "gptq-asym": ["--method", "gptq", "--asym"],
    "gptq-bf16": ["--method", "gptq", "--sym", "--calib-dtype", "bfloat16"],  # bf16 autocast forwards
    "gptq-clip": ["--method", "gptq", "--sym", "--clip-grid", "20"],
    "gptq-asym-clip": ["--method", "gptq", "--asym", "--clip-grid", "20"],
    "gptq-clip-natural": ["--method", "gptq", "--sym", "--clip-grid", "20", "--no-act-order"],
    "gptq-asym-clip-natural": ["--method", "gptq", "--asym", "--clip-grid", "20", "--no-act-order"],
    "awq": ["--method", "awq", "--sym"],
    "awq+gptq": ["--method", "awq+gptq", "--sym"],
    "awq+gptq-asym": ["--method", "awq+gptq", "--asym"],
    # lowbit's SignRound with AutoRound's 'light' recipe (50 steps, lr 5e-3, 8 windows a step): same compute
    "signround": ["--method", "signround", "--sym", "--round-iters", "50", "--round-lr", "5e-3"],
    "signround-asym": ["--method", "signround", "--asym", "--round-iters", "50", "--round-lr", "5e-3"],
}
# lowbit's block-wise QAT as a post-training method (`lowbit qat --init`, §8): variant -> the PTQ variant it
# starts from (quantized at the same setting in this run; its wall time is added) and the block-wise learning
# rates (weights, scales) per bit width it runs at, as chosen in docs §8 (4-bit: the 3-bit ones). The
# symmetric one is for 2-bit rows where a peer stores no zero points (llm-compressor's W2 g64: 2.25 bits).
QAT = {
    "gptq-asym+bqat": ("gptq-asym", {2: (3e-3, 3e-4), 3: (1e-3, 1e-4), 4: (1e-3, 1e-4)}),
    "gptq+bqat": ("gptq", {2: (3e-3, 3e-4)}),
    "gptq-asym-clip+bqat": ("gptq-asym-clip", {2: (3e-3, 3e-4), 3: (1e-3, 1e-4), 4: (1e-3, 1e-4)}),
}
SECOND_TEXT = [f"/usr/share/common-licenses/{n}" for n in ("GPL-3", "GFDL-1.3", "LGPL-2.1", "MPL-2.0", "Apache-2.0")]
_CHILD = ("import atexit, sys; atexit.register(lambda: print('PEAK_RSS_KIB', next(int(l.split()[1]) for l in "
          "open('/proc/self/status') if l.startswith('VmHWM:')), file=sys.stderr)); "
          "sys.argv = ['lowbit', *sys.argv[1:]]; from lowbit.cli import main; main()")


def venv_python(work: Path, peer: str) -> Path:
    return work / f"venv-{peer}" / "bin" / "python"


def setup(work: Path, peer: str) -> None:
    py = venv_python(work, peer)
    if py.exists():
        return
    log(f"setting up {peer} in {py.parent.parent} (pip; several minutes)")
    subprocess.run([sys.executable, "-m", "venv", str(py.parent.parent)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", PEERS[peer]["package"]], check=True)


def timed(cmd: list[str], log_path: Path) -> dict:
    """Run cmd; wall seconds, its own peak RSS (the child prints PEAK_RSS_KIB), and stdout."""
    t0 = time.perf_counter()
    with open(log_path, "w") as err:
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"failed ({r.returncode}): {' '.join(cmd)}; see {log_path}")
    peak = [l for l in log_path.read_text().splitlines() if l.startswith("PEAK_RSS_KIB ")]
    return {"wall_s": wall, "peak_rss_bytes": int(peak[-1].split()[1]) * 1024 if peak else None, "stdout": r.stdout}


def last_json(stdout: str) -> dict:
    """The JSON line a peer script prints last (the peers print banners on stdout too)."""
    return json.loads([l for l in stdout.splitlines() if l.startswith("{")][-1])


def versions(py: Path, peer: str) -> str:
    code = (f"import importlib.metadata as m; print(' '.join(f'{{p}}=={{m.version(p)}}' for p in "
            f"({PEERS[peer]['package']!r}, 'torch', 'transformers')))")
    return subprocess.run([str(py), "-c", code], capture_output=True, text=True).stdout.strip()


def parse_setting(s: str) -> tuple[int, int]:
    bits, group = s.lower().removeprefix("w").split("g")
    return int(bits), int(group)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@torch.no_grad()
def dequantize_once(model) -> None:
    """Every lowbit QuantLinear -> a float32 nn.Linear holding its dequantized weight: the numbers its reference
    path computes with when scoring windows (dequantize, then a float matmul), dequantized once instead of on
    every call -- as the peers' checkpoints are scored (their own dequantization, once, float32)."""
    from lowbit.nn.qlinear import QuantLinear

    for name, m in list(model.named_modules()):
        if isinstance(m, QuantLinear):
            w = m.dequantize_weight().float()
            lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=m.bias is not None)
            lin.weight.copy_(w)
            if m.bias is not None:
                lin.bias.copy_(m.bias.float())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, lin)


def frontier_plot(rows: list[dict], path: Path, fp: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    for ax, key, title in ((axes[0], "ppl", "WikiText-2 test"), (axes[1], "ppl2", "second text (licences)")):
        tools = sorted({r["tool"] for r in rows if r.get("bpw") and r.get(key)})
        for t in tools:
            pts = sorted((r["bpw"], r[key]) for r in rows if r["tool"] == t and r.get(key))
            lb = t.startswith("lowbit")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if lb else "s",
                    linestyle="-" if lb else "--", label=t)
        if fp.get(key):
            ax.axhline(fp[key], color="k", linewidth=0.8, label="float32")
        ax.set_yscale("log")
        ax.set_xlabel("stored bits per weight (decoder linears)")
        ax.set_ylabel("perplexity (log scale)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7, loc="upper right")
    fig.suptitle("SmolLM2-135M: perplexity vs stored bits per weight")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--limit-tokens", type=int, default=8192, help="WikiText-2 test tokens scored (512-windows)")
    ap.add_argument("--limit-tokens2", type=int, default=4096, help="second-text tokens scored (512-windows)")
    ap.add_argument("--second-text", default=",".join(SECOND_TEXT), help="comma-separated files, joined")
    ap.add_argument("--settings", default="w4g128,w4g64,w3g128,w2g64")
    ap.add_argument("--peers", default=",".join(PEERS))
    ap.add_argument("--lowbit", default="rtn,gptq,gptq-clip,awq+gptq", help=f"of {', '.join([*LOWBIT, *QAT])}")
    ap.add_argument("--autoround-iters", type=int, default=200)
    ap.add_argument("--autoround-lr", type=float, default=None,
                    help="AutoRound's learning rate (its default: 1/iters; its 'light' recipe: 50 iters, 5e-3)")
    ap.add_argument("--qat-bits", default="2,3", help="bit widths the block-wise QAT variants run at")
    ap.add_argument("--qat-samples", type=int, default=32, help="block-wise QAT: training windows per block")
    ap.add_argument("--qat-epochs", type=int, default=4, help="block-wise QAT: epochs over them")
    ap.add_argument("--setup", action="store_true", help="create the peers' venvs when missing")
    ap.add_argument("--resume", action="store_true", help="reuse rows of DIR/results.jsonl on the same tokens")
    ap.add_argument("--report-only", action="store_true",
                    help="no new runs: the table and plot of the rows in DIR/results.jsonl on the same tokens")
    ap.add_argument("--markdown", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    peers = [p for p in args.peers.split(",") if p]
    variants = [v for v in args.lowbit.split(",") if v]
    for v in variants:
        if v not in LOWBIT and v not in QAT:
            raise SystemExit(f"unknown lowbit variant {v!r}: one of {', '.join([*LOWBIT, *QAT])}")
        if v in QAT and QAT[v][0] not in variants[:variants.index(v)]:
            raise SystemExit(f"{v} starts from {QAT[v][0]}: list that variant before it")
    qat_bits = {int(b) for b in args.qat_bits.split(",") if b}
    settings = [parse_setting(s) for s in args.settings.split(",") if s]
    for p in peers:
        if args.setup:
            setup(work, p)
        elif not venv_python(work, p).exists():
            raise SystemExit(f"no venv for {p} at {venv_python(work, p)}: run with --setup")

    # the float model as a plain HF folder, the calibration windows and the test windows of both texts
    from lowbit.calibration.data import calibration_ids
    from lowbit.core.text import read_text
    from lowbit.core.tokens import tokenize
    from lowbit.eval.perplexity import windows

    model, tok = lowbit.load(args.model)
    hf = work / "float-hf"
    if not (hf / "config.json").exists():
        model.save_pretrained(hf)
        tok.save_pretrained(hf)
    calib, info = calibration_ids(tok, None, nsamples=args.nsamples, seqlen=args.calib_seqlen, seed=0)
    test = windows(tokenize(tok, read_text(None)[0]), 512, args.limit_tokens)
    files = [Path(f) for f in args.second_text.split(",") if f]
    text2 = "\n\n".join(f.read_text() for f in files)
    test2 = windows(tokenize(tok, text2), 512, args.limit_tokens2)
    tokens = work / "tokens.safetensors"
    save_file({"calib": calib.contiguous(), "eval": test.contiguous(), "eval2": test2.contiguous()}, tokens)
    tok_sha = sha256(tokens)
    meta = {"nsamples": args.nsamples, "calib_seqlen": args.calib_seqlen, "eval_windows": list(test.shape),
            "eval2_windows": list(test2.shape), "second_text": [f.name for f in files],
            "second_text_sha256": hashlib.sha256(text2.encode()).hexdigest(), "tokens_sha256": tok_sha,
            "calibration": info, "autoround_iters": args.autoround_iters, "autoround_lr": args.autoround_lr}
    emit({"meta": meta})

    done: dict[tuple, dict] = {}
    results = work / "results.jsonl"
    if (args.resume or args.report_only) and results.exists():
        for line in results.read_text().splitlines():
            r = json.loads(line)
            if r.get("tokens_sha256") == tok_sha:
                done[(r["tool"], r["setting"])] = r

    def record(row: dict) -> None:
        row["tokens_sha256"] = tok_sha
        with open(results, "a") as f:
            f.write(json.dumps(row) + "\n")
        emit(row)

    if ("float32", "—") in done:
        fp = done[("float32", "—")]
    else:
        fp = {"tool": "float32", "setting": "—", "bpw": 32.0, **scores(model, tokens)}
        record(fp)
    del model

    rows: list[dict] = []
    calib_args = ["--nsamples", str(args.nsamples), "--calib-seqlen", str(args.calib_seqlen), "--seed", "0"]
    for bits, group in [] if args.report_only else settings:
        setting = f"W{bits} g{group}"
        for v in variants:
            label = f"lowbit {v}"
            if (label, setting) in done:
                rows.append({**done[(label, setting)], "resumed": True})
                continue
            out = work / f"lowbit-{v.replace('+', '-')}-w{bits}g{group}"
            try:
                if v in QAT:
                    base, lrs = QAT[v]
                    start = next((r for r in rows if r["tool"] == f"lowbit {base}" and r["setting"] == setting
                                  and "ppl" in r and Path(r.get("out", "")).is_dir()), None)
                    if bits not in qat_bits or bits not in lrs:
                        continue
                    if start is None:
                        log(f"{label} at {setting}: no checkpoint of {base} at this setting to start from: skipped")
                        continue
                    lr, slr = lrs[bits]
                    q = timed([sys.executable, "-c", _CHILD, "qat", str(hf), str(out), "--init", start["out"],
                               "--learn-scales", "--steps", "0", "--block-epochs", str(args.qat_epochs),
                               "--block-samples", str(args.qat_samples), "--block-seqlen", str(args.calib_seqlen),
                               "--block-lr", str(lr), "--block-scale-lr", str(slr), "--eval-tokens", "512",
                               "--seed", "0", "--force"], work / f"{out.name}.log")
                    q["qat_wall_s"] = q["wall_s"]
                    q["wall_s"] += start["wall_s"]  # from the float model: the PTQ start, then the training
                    flags = LOWBIT[base]
                else:
                    flags = LOWBIT[v]
                    method = flags[flags.index("--method") + 1]
                    cal = calib_args if method != "rtn" else []
                    q = timed([sys.executable, "-c", _CHILD, "quantize", str(hf), str(out), *flags, "--bits",
                               str(bits), "--group-size", str(group), *cal, "--force"], work / f"{out.name}.log")
            except RuntimeError as err:
                row = {"tool": label, "setting": setting, "error": str(err)}
                record(row)
                rows.append(row)
                continue
            m, _ = lowbit.load(out)
            dequantize_once(m)
            row = {"tool": label, "setting": setting, "sym": "--sym" in flags, **stored_bpw(out, hf),
                   **scores(m, tokens), "wall_s": q["wall_s"], "peak_rss_bytes": q["peak_rss_bytes"],
                   "out": str(out), **({"qat_wall_s": q["qat_wall_s"]} if "qat_wall_s" in q else {})}
            del m
            record(row)
            rows.append(row)

        for p in peers:
            spec = PEERS[p]
            if group not in spec["groups"] or bits not in spec["bits"]:
                continue
            label = p + (f" ({args.autoround_iters} iters{f', lr {args.autoround_lr:g}' if args.autoround_lr else ''})"
                         if p == "autoround" else "")
            if (label, setting) in done:
                rows.append({**done[(label, setting)], "resumed": True})
                continue
            py, script = venv_python(work, p), str(HERE / spec["script"])
            out = work / f"{p}-w{bits}g{group}"
            extra = []
            if p == "autoround":
                extra = ["--iters", str(args.autoround_iters)]
                extra += ["--lr", str(args.autoround_lr)] if args.autoround_lr else []
            try:
                q = timed([str(py), script, "quantize", str(hf), str(out), str(tokens), "--bits", str(bits),
                           "--group-size", str(group), *extra], work / f"{out.name}-quantize.log")
                e = timed([str(py), script, "eval", str(out), str(tokens)], work / f"{out.name}-eval.log")
            except RuntimeError as err:
                row = {"tool": label, "setting": setting, "error": str(err)}
                record(row)
                rows.append(row)
                continue
            row = {"tool": label, "setting": setting, "sym": spec["sym"], **last_json(q["stdout"]),
                   **last_json(e["stdout"]), "wall_s": q["wall_s"], "peak_rss_bytes": q["peak_rss_bytes"],
                   "versions": versions(py, p)}
            record(row)
            rows.append(row)
    if args.report_only:  # the rows recorded so far on these tokens, in the order they were measured
        rows = [{**r, "resumed": True} for k, r in done.items() if k != ("float32", "—")]
    # lowbit's best at each setting against each peer there, at equal or fewer bits per weight
    for bits, group in settings:
        setting = f"W{bits} g{group}"
        here = [r for r in rows if r["setting"] == setting and "ppl" in r]
        for r in here:
            if r["tool"].startswith("lowbit"):
                continue
            mine = [m for m in here if m["tool"].startswith("lowbit") and m["bpw"] <= r["bpw"] + 1e-9]
            if mine:
                best = min(mine, key=lambda m: m["ppl"])
                r["lowbit_best"] = best["tool"]
                r["lowbit_best_ppl"] = best["ppl"]
                r["lowbit_best_bpw"] = best["bpw"]
                r["lowbit_vs_peer_pct"] = 100 * (best["ppl"] / r["ppl"] - 1)
                r["lowbit_best_wall_s"] = best["wall_s"]
    cols = [("setting", "setting", ""), ("tool", "tool", ""), ("bpw", "bits/weight", ".3f"),
            ("ppl", "ppl WikiText-2", ".3f"), ("ppl2", "ppl 2nd text", ".3f"), ("wall_s", "quantize wall s", ".0f"),
            ("peak_rss_bytes", "peak RSS bytes", ","), ("lowbit_best", "lowbit's best at <= bits", ""),
            ("lowbit_vs_peer_pct", "its ppl vs the peer %", "+.2f"), ("lowbit_best_wall_s", "its wall s", ".0f")]
    table = markdown([fp, *rows], cols)
    log(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    if args.plot:
        frontier_plot(rows, args.plot, fp)
    emit({"rows": rows, "float": fp, **meta})


if __name__ == "__main__":
    main()
