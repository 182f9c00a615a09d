"""GPTQModel, run inside its own venv by bench/peers/run.py.

    python peer_gptqmodel.py quantize MODEL_DIR OUT TOKENS.safetensors --bits 4 --group-size 128 [--asym] [--batch 8]
    python peer_gptqmodel.py eval OUT TOKENS.safetensors
Its defaults otherwise (damp 0.05, act_group_aware, true_sequential)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ppl import peak_rss_line, perplexity  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["quantize", "eval"])
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--asym", action="store_true")
    ap.add_argument("--batch", type=int, default=8)
    a = ap.parse_args()
    import gptqmodel
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig

    # GPTQModel 7.7 asks for 2 model-loader workers under a CPU pool of (cores + 1) // 2 = 1 on a 2-core machine
    # and refuses to start ("Virtual pool 'model_loader:cpu' requests 2 workers but parent 'cpu' only has 1"):
    # cap the loader pool at the CPU pool, leaving everything else at its defaults.
    pool = gptqmodel.DeviceThreadPool

    def capped_pool(*args, workers=None, **kw):
        if workers and "model_loader:cpu" in workers:
            workers = {**workers, "model_loader:cpu": min(workers["model_loader:cpu"], workers.get("cpu", 1))}
        return pool(*args, workers=workers, **kw)

    gptqmodel.DeviceThreadPool = capped_pool

    if a.cmd == "quantize":
        model_dir, out, tokens = a.paths
        calib = load_file(tokens)["calib"]
        data = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in calib]
        cfg = QuantizeConfig(bits=a.bits, group_size=a.group_size, sym=not a.asym)
        model = GPTQModel.load(model_dir, cfg, device="cpu")
        model.quantize(data, batch_size=a.batch)
        model.save(out)
    else:
        out, tokens = a.paths
        model = GPTQModel.load(out, device="cpu", backend=BACKEND.TORCH)
        print(json.dumps({"ppl": perplexity(model, load_file(tokens)["eval"])}))
    print(peak_rss_line(), file=sys.stderr)


if __name__ == "__main__":
    main()
