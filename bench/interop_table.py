"""lowbit's exports in the engines that serve them, and a peer's checkpoint in lowbit (issue 21) -> JSON.

    python bench/interop_table.py --work /work/runs [--windows 8] [--settings gptq,awq] [--clients ...]
                                  [--llmcompressor] [--nsamples 128]

Settings (the embedded SmolLM2-135M): "gptq" = lowbit GPTQ W4 g64 symmetric, "awq" = lowbit AWQ W4 g64
asymmetric; each lowbit checkpoint (WORK/smol-<setting>-w4g64, made with `lowbit quantize` when missing) is
exported to compressed-tensors and to GPTQ format (float tensors in float32, so every client sees the same
numbers), and each export is scored on the same token ids (the first --windows windows of 512 tokens of
WikiText-2 test) by lowbit (reading the export back), transformers, vLLM and GPTQModel, each in its own venv
(bench/interop_setup.sh). Every client reports perplexity over every next-token prediction, its greedy
continuation of one prompt (compared with lowbit's: leading tokens that agree) and decode tokens/s.
--llmcompressor: llm-compressor's oneshot GPTQ W4A16 (g64 sym, --nsamples windows of WikiText-2 valid) on the
same float model, then its folder scored by transformers and by lowbit.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE / "peers")]

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import lowbit  # noqa: E402
from common import emit, log  # noqa: E402
from interop_client import hf_scores  # noqa: E402

SETTINGS = {"gptq": ["--method", "gptq", "--sym"], "awq": ["--method", "awq", "--asym"]}
CLIENTS = {  # client -> (venv, formats it reads)
    "transformers": ("llmcompressor", ("compressed-tensors",)),
    "transformers-gptq": ("gptqmodel", ("gptq",)),
    "vllm": ("vllm", ("compressed-tensors", "gptq")),
    "gptqmodel": ("gptqmodel", ("gptq",)),
}


def lowbit_cli(*args: str, log_path: Path) -> None:
    with open(log_path, "w") as err:
        r = subprocess.run([sys.executable, "-m", "lowbit", *args], stdout=err, stderr=subprocess.STDOUT, text=True)
    if r.returncode:
        raise SystemExit(f"lowbit {' '.join(args)} failed; see {log_path}")


def client(work: Path, name: str, model: Path, tokens: Path, new_tokens: int) -> dict:
    venv, _ = CLIENTS[name]
    py = work / f"venv-{venv}" / "bin" / "python"
    if not py.exists():
        return {"error": f"no venv {py.parent.parent}: run bench/interop_setup.sh"}
    kind = "transformers" if name.startswith("transformers") else name
    logp = work / f"{model.name}-{name}.log"
    t0 = time.perf_counter()
    with open(logp, "w") as err:
        r = subprocess.run([str(py), str(HERE / "interop_client.py"), kind, str(model), str(tokens),
                            "--new-tokens", str(new_tokens)], stdout=subprocess.PIPE, stderr=err, text=True)
    lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
    if r.returncode or not lines:
        tail = [l for l in logp.read_text().splitlines() if l.strip()][-1:] or ["?"]
        return {"error": f"exit {r.returncode}: {tail[0][:300]} (log {logp})"}
    return {**json.loads(lines[-1]), "wall_s": time.perf_counter() - t0}


def agree(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/work/runs"))
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--settings", default="gptq,awq")
    ap.add_argument("--clients", default=",".join(CLIENTS))
    ap.add_argument("--nsamples", type=int, default=128, help="calibration windows (lowbit and llm-compressor)")
    ap.add_argument("--llmcompressor", action="store_true")
    args = ap.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    from lowbit.calibration.data import calibration_ids
    from lowbit.core.text import read_text
    from lowbit.core.tokens import tokenize
    from lowbit.eval.perplexity import windows

    model, tok = lowbit.load("smollm2-135m")
    ev = windows(tokenize(tok, read_text(None)[0]), args.seqlen, args.windows * args.seqlen)
    prompt = tok("The capital of France is", return_tensors="pt").input_ids
    calib, _ = calibration_ids(tok, None, nsamples=args.nsamples, seqlen=512, seed=0)
    tokens = work / "interop-tokens.safetensors"
    save_file({"eval": ev.contiguous(), "prompt": prompt.contiguous(), "calib": calib.contiguous()}, tokens)
    hf = work / "float-hf"
    if not (hf / "config.json").exists():
        model.save_pretrained(hf)
        tok.save_pretrained(hf)
    del model
    meta = {"windows": int(ev.shape[0]), "seqlen": int(ev.shape[1]), "new_tokens": args.new_tokens,
            "threads": torch.get_num_threads(), "prompt": "The capital of France is"}
    emit({"meta": meta})
    rows = []
    clients = [c for c in args.clients.split(",") if c]
    for setting in [s for s in args.settings.split(",") if s]:
        ckpt = work / f"smol-{setting}-w4g64"
        if not (ckpt / "config.json").exists():
            log(f"quantizing {ckpt.name} (lowbit {setting}, {args.nsamples} windows)")
            lowbit_cli("quantize", "smollm2-135m", str(ckpt), "--bits", "4", "--group-size", "64",
                       *SETTINGS[setting], "--nsamples", str(args.nsamples), "--force", log_path=work / f"{ckpt.name}.log")
        m, _ = lowbit.load(ckpt)
        base = {"setting": f"{setting} W4 g64", "format": "lowbit checkpoint", "client": "lowbit",
                **hf_scores(m, {"eval": ev, "prompt": prompt}, args.new_tokens)}
        del m
        rows.append(base)
        emit(base)
        for fmt in ("compressed-tensors", "gptq"):
            out = work / f"{ckpt.name}-{fmt}"
            try:
                m, t = lowbit.load(ckpt)
                lowbit.api.export(m, t, out, fmt, dtype="float32", overwrite=True)
            except lowbit.errors.LowbitError as e:
                row = {"setting": base["setting"], "format": fmt, "client": "lowbit export", "error": str(e)}
                rows.append(row)
                emit(row)
                continue
            m, _ = lowbit.load(out)
            row = {"setting": base["setting"], "format": fmt, "client": "lowbit (reads the export)",
                   **hf_scores(m, {"eval": ev, "prompt": prompt}, args.new_tokens)}
            del m
            for r in [row] + [{"setting": base["setting"], "format": fmt, "client": c,
                               **client(work, c, out, tokens, args.new_tokens)}
                              for c in clients if fmt in CLIENTS[c][1]]:
                if "ppl" in r:
                    r["ppl_vs_lowbit_pct"] = 100 * (r["ppl"] / base["ppl"] - 1)
                    r["greedy_agree"] = agree(r["greedy"], base["greedy"])
                rows.append(r)
                emit(r)
    if args.llmcompressor:
        py = work / "venv-llmcompressor" / "bin" / "python"
        out = work / "llmcompressor-w4g64"
        t0 = time.perf_counter()
        with open(work / "llmcompressor-quantize.log", "w") as err:
            r = subprocess.run([str(py), str(HERE / "peers" / "peer_llmcompressor.py"), "quantize", str(hf), str(out),
                                str(tokens), "--bits", "4", "--group-size", "64"], stdout=err, stderr=subprocess.STDOUT)
        if r.returncode:
            rows.append({"setting": "llm-compressor W4A16 g64", "error": f"oneshot failed ({work}/llmcompressor-quantize.log)"})
        else:
            tr = {"setting": "llm-compressor W4A16 g64", "format": "compressed-tensors", "client": "transformers",
                  **client(work, "transformers", out, tokens, args.new_tokens), "oneshot_s": time.perf_counter() - t0}
            m, _ = lowbit.load(out)
            lb = {"setting": "llm-compressor W4A16 g64", "format": "compressed-tensors", "client": "lowbit",
                  **hf_scores(m, {"eval": ev, "prompt": prompt}, args.new_tokens)}
            if "ppl" in tr:
                lb["ppl_vs_transformers_pct"] = 100 * (lb["ppl"] / tr["ppl"] - 1)
                lb["greedy_agree"] = agree(lb["greedy"], tr["greedy"])
            rows += [tr, lb]
            emit(tr)
            emit(lb)
    print(json.dumps({"meta": meta, "rows": [{k: v for k, v in r.items() if k != "greedy"} for r in rows]}, indent=1))


if __name__ == "__main__":
    main()
