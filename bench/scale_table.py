"""Quantizing LLaMA-shaped models of real sizes (random bf16 weights, bench/make_llama.py) on this machine:
wall time, peak RSS, bytes read and written, seconds per block; for GPTQ a projection to full calibration.

    nice -n 10 python bench/scale_table.py --shapes 1b,8b,13b --methods rtn,gptq [--nsamples 4 --calib-seqlen 512]
        [--workdir /work/runs/scale] [--keep]

Per shape: the model is written (unless --workdir already holds it), then `lowbit quantize MODEL OUT --method M
--bits 4 --group-size 128 --sym --dtype auto` runs in a child process (bench/measured_run.py records it), the
output is deleted, and (without --keep) the model too, before the next shape: disk is shared. One JSON line per
run; the memory bound of the issue is computed beside each GPTQ run: the largest block's float32 size + the
calibration activations (inputs and outputs of one block: 2 x nsamples x seqlen x hidden x 4 bytes) + 2 GiB.
Projection of GPTQ to 128 x 2048 calibration tokens: seconds per block = a + b x tokens, with b, the cost per
calibration token of one block, taken from two 1b runs (nsamples and 4 x nsamples) and scaled by the block's
parameter count (forward and xᵀx work grow with it), a (the sweep, independent of the tokens) from the run
itself. Attention's seqlen² term is not in it (about +8% of a block's forward at 2048 tokens for 8b).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from common import emit, folder_bytes
from make_llama import SHAPES, config

HERE = Path(__file__).resolve().parent


def block_params(cfg: dict) -> int:
    h, inter, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_key_value_heads"]
    hd = h // cfg["num_attention_heads"]
    return 2 * h * h + 2 * kv * hd * h + 3 * h * inter + 2 * h


def measured(args: list[str], rec: Path) -> dict:
    cmd = [sys.executable, str(HERE / "measured_run.py"), str(rec), "--", *args]
    subprocess.run(cmd, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return json.loads(rec.read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="1b,8b,13b")
    ap.add_argument("--methods", default="rtn,gptq")
    ap.add_argument("--nsamples", type=int, default=4)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--workdir", type=Path, default=Path("/work/runs/scale"))
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--layers", type=int, default=None,
                    help="write each shape with this many decoder blocks (full-size blocks and embeddings); the "
                         "full model's block phase is projected as seconds per block x its layers")
    ap.add_argument("--per-token-s", type=float, default=None,
                    help="seconds per calibration token of a 1b block (from an earlier run's fit), else measured")
    a = ap.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)
    per_token_1b = a.per_token_s
    for shape in a.shapes.split(","):
        cfg = config(shape, a.layers)
        full_layers = config(shape)["num_hidden_layers"]
        model = a.workdir / (f"llama-{shape}" + (f"-{a.layers}l" if a.layers else ""))
        if not (model / "config.json").is_file():
            r = subprocess.run([sys.executable, str(HERE / "make_llama.py"), shape, str(model)]
                               + (["--layers", str(a.layers)] if a.layers else []), check=True,
                               capture_output=True, text=True)
            emit({"made": json.loads(r.stdout.strip().splitlines()[-1])})
        bp = block_params(cfg)
        for method in a.methods.split(","):
            sizes = [a.nsamples] + ([4 * a.nsamples] if method == "gptq" and shape == "1b" and per_token_1b is None
                                    else [])
            runs = []
            for ns in sizes:
                out = a.workdir / f"out-{shape}-{method}"
                shutil.rmtree(out, ignore_errors=True)
                args = ["quantize", str(model), str(out), "--method", method, "--bits", "4", "--group-size", "128",
                        "--sym", "--dtype", "auto", "--force"]
                if method != "rtn":
                    args += ["--nsamples", str(ns), "--calib-seqlen", str(a.calib_seqlen)]
                rec = measured(args, a.workdir / f"rec-{shape}-{method}-{ns}.json")
                rec.update({"shape": shape, "method": method, "nsamples": ns if method != "rtn" else None,
                            "calib_seqlen": a.calib_seqlen if method != "rtn" else None,
                            "layers": cfg["num_hidden_layers"], "model_bytes": folder_bytes(model),
                            "out_bytes": folder_bytes(out) if out.exists() else None,
                            "block_params": bp, "largest_block_f32_bytes": 4 * bp})
                line = rec.get("blocks_line") or ""
                try:
                    rec["block_phase_s"] = float(line.rsplit(" in ", 1)[1].rstrip("s"))
                except (IndexError, ValueError):
                    rec["block_phase_s"] = rec["wall_s"]
                rec["s_per_block"] = round(rec["block_phase_s"] / cfg["num_hidden_layers"], 2)
                rec["full_layers"] = full_layers
                rec["full_model_bytes_bf16"] = 2 * (full_layers * bp + (1 if cfg["tie_word_embeddings"] else 2)
                                                    * cfg["vocab_size"] * cfg["hidden_size"] + cfg["hidden_size"])
                rec["full_block_phase_projected_s"] = round(rec["s_per_block"] * full_layers, 1)
                if method != "rtn":
                    act = 2 * ns * a.calib_seqlen * cfg["hidden_size"] * 4
                    rec["calib_activation_bytes"] = act
                    rec["bound_bytes"] = 4 * bp + act + (2 << 30)
                    rec["within_bound"] = rec["peak_rss_bytes"] <= rec["bound_bytes"]
                runs.append(rec)
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(a.workdir / f".{out.name}.lowbit-resume", ignore_errors=True)
            if method == "gptq" and shape == "1b" and len(runs) == 2:
                t1, t2 = runs[0]["s_per_block"], runs[1]["s_per_block"]
                per_token_1b = max(0.0, (t2 - t1) / ((sizes[1] - sizes[0]) * a.calib_seqlen))
            if method == "gptq" and per_token_1b is not None:
                b = per_token_1b * bp / block_params(config("1b"))  # the 1b fit, scaled by block size
                rec = runs[0]
                sweep = max(0.0, rec["s_per_block"] - b * a.nsamples * a.calib_seqlen)
                full = sweep + b * 128 * 2048
                rec["projection_128x2048"] = {"per_token_s_per_block": b, "sweep_s_per_block": round(sweep, 2),
                                              "s_per_block": round(full, 1),
                                              "hours": round(full * full_layers / 3600, 2),
                                              "calib_activation_bytes": 2 * 128 * 2048 * cfg["hidden_size"] * 4}
            for rec in runs:
                emit(rec)
        if not a.keep:
            shutil.rmtree(model, ignore_errors=True)


if __name__ == "__main__":
    main()
