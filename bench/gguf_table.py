"""SmolLM2-135M as GGUF (issue 5): every type and mixture, scored by llama.cpp -> JSON on stdout (+ markdown).

    python bench/gguf_table.py [--limit-tokens 16384] [--types Q8_0,Q4_K_M,...] [--calibrated Q4_K_M,Q3_K_M]
                               [--nsamples 64] [--out-dir DIR] [--markdown FILE]

For each type: lowbit writes the file from the float model; llama.cpp (llama-cpp-python) loads it and
scores perplexity on WikiText-2 test windows of 512 tokens (the token ids of transformers' tokenizer,
the same for every file); file bytes and bits per weight of the tensors. The baseline is llama.cpp's
own quantizer (`llama_model_quantize`) applied to lowbit's F32 export of the same weights: where its
tensor data equal lowbit's byte for byte, the ppl is the same by construction and is not re-run.
Calibrated rows: lowbit with --calib (mean x² per input column over `--nsamples` windows of
WikiText-2 *valid*), against llama.cpp's quantizer without an importance matrix (llama-cpp-python
ships no imatrix tool).
"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lowbit  # noqa: E402
from common import log, report  # noqa: E402
from lowbit.core.text import read_text  # noqa: E402
from lowbit.core.tokens import tokenize  # noqa: E402
from lowbit.eval import llama_cpp as L  # noqa: E402
from lowbit.eval.perplexity import windows  # noqa: E402
from lowbit.formats.gguf.export import export_gguf  # noqa: E402
from lowbit.formats.gguf.reader import gguf_table  # noqa: E402

ALL = ["F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_1",
       "Q4_0", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K"]


def llama_quantize(src: str, dst: str, ftype: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize failed for {ftype}")


def same_tensors(a: str, b: str) -> bool:
    import gguf

    ra, rb = gguf.GGUFReader(a), gguf.GGUFReader(b)
    ta = {t.name: t for t in ra.tensors}
    tb = {t.name: t for t in rb.tensors}
    if ta.keys() != tb.keys():
        return False
    return all(ta[n].tensor_type == tb[n].tensor_type and np.array_equal(np.asarray(ta[n].data), np.asarray(tb[n].data))
               for n in ta)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit-tokens", type=int, default=16384)
    ap.add_argument("--types", default=",".join(ALL))
    ap.add_argument("--calibrated", default="Q4_K_M,Q3_K_M,Q2_K")
    ap.add_argument("--gptq", default="Q4_K_M,Q3_K_M", help="calibrated + GPTQ on the stored grid (--gptq)")
    ap.add_argument("--f32-ppl", type=float, help="reuse the F32 export's llama.cpp ppl of an earlier run")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--out-dir", type=Path, default=Path("bench_out/gguf"))
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()
    if not L.available():
        sys.exit("bench/gguf_table.py needs llama-cpp-python (pip install llama-cpp-python)")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    model, tok = lowbit.load("smollm2-135m")
    text, _ = read_text(None)
    wins = windows(tokenize(tok, text), 512, args.limit_tokens)
    log(f"{wins.shape[0]} windows of 512 tokens")

    f32 = str(args.out_dir / "lowbit-F32.gguf")
    export_gguf(model, tok, f32, "F32", overwrite=True, progress=False)
    base = args.f32_ppl if args.f32_ppl is not None else L.perplexity(f32, wins)["ppl"]
    log(f"F32 export: llama.cpp ppl {base:.4f}")

    def row(name, path, seconds, ref_ppl=None):
        _, total = gguf_table(path)
        ppl = L.perplexity(path, wins)["ppl"] if ref_ppl is None else ref_ppl
        r = {"variant": name, "file_bytes": total["file_bytes"], "bpw": total["bpw"], "ppl": ppl,
             "dppl_pct": 100 * (ppl / base - 1), "seconds": round(seconds, 1)}
        log(str(r))
        return r

    rows = []
    for t in [x for x in args.types.split(",") if x]:
        path = str(args.out_dir / f"lowbit-{t}.gguf")
        t0 = time.perf_counter()
        if t != "F32":
            export_gguf(model, tok, path, t, overwrite=True, progress=False)
        else:
            path = f32
        r = row(f"lowbit {t}", path, time.perf_counter() - t0)
        rows.append(r)
        if t in ("F32", "F16", "BF16"):
            continue
        lpath = str(args.out_dir / f"llama.cpp-{t}.gguf")
        t0 = time.perf_counter()
        llama_quantize(f32, lpath, t)
        secs = time.perf_counter() - t0
        ident = same_tensors(path, lpath)
        lr = row(f"llama.cpp {t}", lpath, secs, ref_ppl=r["ppl"] if ident else None)
        lr["identical_to_lowbit"] = ident
        r["vs_llama_cpp_pct"] = 100 * (r["ppl"] / lr["ppl"] - 1)
        rows.append(lr)

    cal = [x for x in args.calibrated.split(",") if x]
    gq = [x for x in args.gptq.split(",") if x]
    if cal or gq:
        import torch

        from lowbit.calibration.data import calibration_ids
        from lowbit.calibration.stats import input_sq_means

        ids, info = calibration_ids(tok, None, nsamples=args.nsamples, seqlen=512, seed=0)
        t0 = time.perf_counter()
        hessians = input_sq_means(model, ids, full=True)  # E[x xᵀ]; its diagonal is the imatrix
        imatrix = {k: torch.diagonal(h).clone() for k, h in hessians.items()}
        stat_s = time.perf_counter() - t0
        log(f"activation statistics: {stat_s:.0f} s")
        for t, kind in [(t, "calibrated") for t in cal] + [(t, "calibrated + GPTQ") for t in gq]:
            path = str(args.out_dir / f"lowbit-{t}-{'gptq' if 'GPTQ' in kind else 'calib'}.gguf")
            t0 = time.perf_counter()
            export_gguf(model, tok, path, t, imatrix=imatrix, hessians=hessians if "GPTQ" in kind else None,
                        overwrite=True, progress=False)
            r = row(f"lowbit {t} {kind}", path, time.perf_counter() - t0 + stat_s)
            ref = next((x for x in rows if x["variant"] == f"llama.cpp {t}"), None)
            if ref is not None:
                r["vs_llama_cpp_pct"] = 100 * (r["ppl"] / ref["ppl"] - 1)
            rows.append(r)

    cols = [("variant", "file", "s"), ("file_bytes", "bytes", ","), ("bpw", "bits/weight", ".3f"),
            ("ppl", "llama.cpp ppl", ".4f"), ("dppl_pct", "Δppl vs F32 %", "+.2f"),
            ("vs_llama_cpp_pct", "vs llama.cpp's quantizer %", "+.2f"), ("seconds", "quantize s", ".1f")]
    report(rows, cols, args.markdown, {"windows": int(wins.shape[0]), "seqlen": 512, "f32_ppl": base,
                                        "calibration": {"nsamples": args.nsamples, "seqlen": 512, "text": "wiki.valid"}})


if __name__ == "__main__":
    main()
