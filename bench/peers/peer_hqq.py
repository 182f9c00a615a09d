"""HQQ (half-quadratic quantization, calibration-free), run inside its own venv by bench/peers/run.py.

    python peer_hqq.py quantize MODEL_DIR OUT TOKENS.safetensors --bits 4 --group-size 64
    python peer_hqq.py eval OUT TOKENS.safetensors
hqq's BaseQuantizeConfig defaults otherwise (axis 1, its proximal optimizer on, zero rounded at 4 bits, scale and
zero in the compute dtype: float16, hqq's default). It takes no calibration data (the token file is only read
for the evaluation windows). Bits per weight: every tensor of each HQQLinear's state as serialized (packed
codes, scale, zero, shape metadata), over the float weights, computed here from the quantized modules."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ppl import linear_numels, peak_rss_line, peer_args, scores  # noqa: E402


def hqq_bytes(model) -> int:
    from hqq.core.quantize import HQQLinear

    total = 0
    for m in model.modules():
        if isinstance(m, HQQLinear):
            for v in m.state_dict().values():
                if torch.is_tensor(v):
                    total += v.numel() * v.element_size()
    return total


@torch.no_grad()
def to_float_linears(model) -> None:
    """Every HQQLinear -> a float32 nn.Linear holding hqq's own dequantized weight."""
    from hqq.core.quantize import HQQLinear

    for name, m in list(model.named_modules()):
        if isinstance(m, HQQLinear):
            w = m.dequantize().float().reshape(m.meta["shape"])
            lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=m.bias is not None)
            lin.weight.copy_(w)
            if m.bias is not None:
                lin.bias.copy_(m.bias.float())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, lin)


def main() -> None:
    a = peer_args(default_group=64)
    from hqq.core.quantize import BaseQuantizeConfig
    from hqq.models.hf.base import AutoHQQHFModel
    from transformers import AutoModelForCausalLM

    if a.cmd == "quantize":
        model_dir, out, tokens = a.paths
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float16)
        cfg = BaseQuantizeConfig(nbits=a.bits, group_size=a.group_size)
        AutoHQQHFModel.quantize_model(model, quant_config=cfg, compute_dtype=torch.float16, device="cpu")
        AutoHQQHFModel.save_quantized(model, out)
        numel = sum(linear_numels(model_dir).values())
        print(json.dumps({"bpw": 8 * hqq_bytes(model) / numel, "quantized_weights": numel}))
    else:
        out, tokens = a.paths
        model = AutoHQQHFModel.from_quantized(out, device="cpu", compute_dtype=torch.float16)
        to_float_linears(model)
        model.float()
        print(json.dumps(scores(model, tokens)))
    print(peak_rss_line(), file=sys.stderr)


if __name__ == "__main__":
    main()
