"""lowbit's GPTQ side by side with GPTQModel and llm-compressor (issue 3) -> JSON lines on stdout + a table.

    python bench/peers/run.py --work DIR [--nsamples 128] [--limit-tokens 32768] [--peers gptqmodel,llmcompressor]

The peers are not lowbit dependencies: each lives in its own venv under DIR (made with `--setup`:
`pip install torch==2.13.0` first, so nothing pulls a CUDA build it does not already ask for, then the package,
which may move torch and transformers to the versions it pins). Everyone gets the same float model (lowbit's
safetensors conversion of the embedded SmolLM2), the same calibration token windows (lowbit's: WikiText-2 valid,
seed 0, written to a safetensors file the peers read) and is scored by the same code (`ppl.py`) on the same
WikiText-2 test windows. Each quantization is one fresh process, timed from start to saved checkpoint (imports,
loading and saving included: what a user waits for), with its own peak RSS.

Settings: GPTQModel W4 g128 symmetric (its defaults otherwise: damp 0.05, act_group_aware, true_sequential);
llm-compressor W4 g64 symmetric (it refuses g128 here: 576 is not a multiple of 128; actorder "static");
lowbit at each of those settings with --act-order (its default; static groups: the peers' column order), and
with --plain also with --no-act-order.
"""
from __future__ import annotations

import argparse
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
from common import emit, log, report  # noqa: E402
from ppl import perplexity  # noqa: E402

PEERS = {
    "gptqmodel": {"package": "gptqmodel", "script": "peer_gptqmodel.py", "group": 128},
    "llmcompressor": {"package": "llmcompressor", "script": "peer_llmcompressor.py", "group": 64},
}
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
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}; see {log_path}")
    peak = [l for l in log_path.read_text().splitlines() if l.startswith("PEAK_RSS_KIB ")]
    return {"wall_s": wall, "peak_rss_bytes": int(peak[-1].split()[1]) * 1024 if peak else None, "stdout": r.stdout}


def last_json(stdout: str) -> dict:
    """The JSON line a peer script prints last (the peers print banners on stdout too)."""
    return json.loads([l for l in stdout.splitlines() if l.startswith("{")][-1])


def versions(py: Path, peer: str) -> str:
    code = (f"import importlib.metadata as m; print(' '.join(f'{{p}}=={{m.version(p)}}' for p in "
            f"({PEERS[peer]['package']!r}, 'torch', 'transformers')))")
    return subprocess.run([str(py), "-c", code], capture_output=True, text=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--limit-tokens", type=int, default=32768)
    ap.add_argument("--peers", default=",".join(PEERS))
    ap.add_argument("--plain", action="store_true", help="also lowbit with --no-act-order")
    ap.add_argument("--setup", action="store_true", help="create the peers' venvs when missing")
    ap.add_argument("--markdown", type=Path, default=None)
    args = ap.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    peers = [p for p in args.peers.split(",") if p]
    for p in peers:
        if args.setup:
            setup(work, p)
        elif not venv_python(work, p).exists():
            raise SystemExit(f"no venv for {p} at {venv_python(work, p)}: run with --setup")

    # the float model as a plain HF folder, the calibration windows and the test windows
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
    tokens = work / "tokens.safetensors"
    save_file({"calib": calib.contiguous(), "eval": test.contiguous()}, tokens)
    fp = perplexity(model, test)
    rows = [{"tool": "float32", "setting": "—", "ppl": fp}]
    emit(rows[0])
    del model

    calib_args = ["--nsamples", str(args.nsamples), "--calib-seqlen", str(args.calib_seqlen), "--seed", "0"]
    for p in peers:
        g = PEERS[p]["group"]
        setting = f"W4 g{g} sym"
        py = venv_python(work, p)
        script = str(HERE / PEERS[p]["script"])
        out = work / f"{p}-w4g{g}"
        q = timed([str(py), script, "quantize", str(hf), str(out), str(tokens), "--bits", "4", "--group-size", str(g)],
                  work / f"{p}-quantize.log")
        e = timed([str(py), script, "eval", str(out), str(tokens)], work / f"{p}-eval.log")
        peer_row = {"tool": p, "versions": versions(py, p), "setting": setting, "ppl": last_json(e["stdout"])["ppl"],
                    "wall_s": q["wall_s"], "peak_rss_bytes": q["peak_rss_bytes"]}
        rows.append(peer_row)
        emit(peer_row)
        for extra, label in ((["--act-order"], "lowbit --act-order"),) + (((["--no-act-order"], "lowbit --no-act-order")),) * args.plain:
            out = work / f"lowbit-w4g{g}{'-ao' if extra else ''}"
            q = timed([sys.executable, "-c", _CHILD, "quantize", str(hf), str(out), "--method", "gptq", "--bits", "4",
                       "--group-size", str(g), "--sym", *extra, *calib_args, "--force"], work / f"{out.name}.log")
            m, _ = lowbit.load(out)
            ppl = perplexity(m, test)
            row = {"tool": label, "setting": setting, "ppl": ppl, "wall_s": q["wall_s"],
                   "peak_rss_bytes": q["peak_rss_bytes"], "vs": p,
                   "ppl_vs_peer_pct": 100 * (ppl / peer_row["ppl"] - 1), "wall_vs_peer": q["wall_s"] / peer_row["wall_s"]}
            rows.append(row)
            emit(row)
            del m
    report(rows, [("tool", "tool", ""), ("setting", "setting", ""), ("ppl", "ppl", ".3f"),
                  ("ppl_vs_peer_pct", "ppl vs peer %", "+.2f"), ("wall_s", "quantize wall s", ".0f"),
                  ("wall_vs_peer", "wall / peer's", ".2f"), ("peak_rss_bytes", "peak RSS bytes", ",")],
           args.markdown, {"nsamples": args.nsamples, "calib_seqlen": args.calib_seqlen,
                           "limit_tokens": args.limit_tokens, "calibration": info})


if __name__ == "__main__":
    main()
