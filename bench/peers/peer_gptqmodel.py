"""GPTQModel, run inside its own venv by bench/peers/run.py.

    python peer_gptqmodel.py quantize MODEL_DIR OUT TOKENS.safetensors --bits 4 --group-size 128 [--asym] [--batch 8]
    python peer_gptqmodel.py eval OUT TOKENS.safetensors
Its defaults otherwise (damp 0.05, act_group_aware, true_sequential)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ppl import peak_rss_line, peer_args, scores, stored_bpw  # noqa: E402


@torch.no_grad()
def dequantize_once(model) -> None:
    """Replace every GPTQ linear by a float32 nn.Linear holding its dequantized weight (GPTQModel's own
    dequantize_weight): the same numbers, without re-dequantizing on every call."""
    for name, m in list(model.model.named_modules()):
        if not hasattr(m, "dequantize_weight") or not hasattr(m, "qweight"):
            continue
        w = m.dequantize_weight().float().T.contiguous()  # GPTQModel's layout is [in, out]
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=m.bias is not None)
        lin.weight.copy_(w)
        if m.bias is not None:
            lin.bias.copy_(m.bias.float())
        parent, _, child = name.rpartition(".")
        setattr(model.model.get_submodule(parent) if parent else model.model, child, lin)


def main() -> None:
    a = peer_args(default_group=128)
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
        # float32, as lowbit and llm-compressor compute: on CPU GPTQModel defaults to bfloat16, which runs ~40x
        # slower than float32 on a CPU without bf16 instructions (this one: AVX2)
        model = GPTQModel.load(model_dir, cfg, device="cpu", dtype=torch.float32)
        model.quantize(data, batch_size=a.batch)
        model.save(out)
        print(json.dumps(stored_bpw(out, model_dir)))
    else:
        out, tokens = a.paths
        # its CPU kernel takes float16/bfloat16 only: float16 (its scales' own type), dequantized once, then the
        # whole model in float32 like the others
        model = GPTQModel.load(out, device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
        dequantize_once(model)
        model.model.float()
        print(json.dumps(scores(model, tokens)))
    print(peak_rss_line(), file=sys.stderr)


if __name__ == "__main__":
    main()
