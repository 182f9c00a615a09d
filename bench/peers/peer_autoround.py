"""AutoRound (Intel's auto-round: sign-gradient learned rounding and weight clipping, block by block), run inside
its own venv by bench/peers/run.py.

    python peer_autoround.py quantize MODEL_DIR OUT TOKENS.safetensors --bits 4 --group-size 128 [--asym]
                             [--iters 200] [--batch 8]
    python peer_autoround.py eval OUT TOKENS.safetensors
Its defaults otherwise (symmetric, lr 1/iters, minmax lr = lr, sign-SGD over every decoder block); the
calibration windows are the shared token file's (handed over as token ids, its seqlen and count), not its
default pile-10k download. float32 on the CPU. Saved in its "auto_round" format (GPTQ-style packed int32 codes,
fp16 scales, packed zero points), which transformers loads with auto-round installed."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ppl import peak_rss_line, peer_args, scores, stored_bpw  # noqa: E402


@torch.no_grad()
def to_float_linears(model) -> int:
    """Every quantized linear -> a float32 nn.Linear holding the weight auto-round's own kernel computes with
    (its forward on the identity matrix: W x for x = I gives Wᵀ columns), so scoring does not re-run the
    kernel per token. Returns how many were replaced."""
    n = 0
    for name, m in list(model.named_modules()):
        if isinstance(m, torch.nn.Linear) or not (hasattr(m, "qweight") and hasattr(m, "scales")):
            continue
        k = m.infeatures if hasattr(m, "infeatures") else m.in_features
        eye = torch.eye(k, dtype=m.scales.dtype)
        bias = getattr(m, "bias", None)
        w = m(eye).float()  # [in, out] = I Wᵀ + b
        if bias is not None:
            w = w - bias.float()
        lin = torch.nn.Linear(k, w.shape[1], bias=bias is not None)
        lin.weight.copy_(w.T)
        if bias is not None:
            lin.bias.copy_(bias.float())
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, lin)
        n += 1
    return n


def main() -> None:
    extra = [a for a in sys.argv if a.startswith("--iters")]
    iters = 200
    if extra:
        i = sys.argv.index(extra[0])
        iters = int(extra[0].split("=", 1)[1]) if "=" in extra[0] else int(sys.argv[i + 1])
        del sys.argv[i: i + (1 if "=" in extra[0] else 2)]
    a = peer_args(default_group=128)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if a.cmd == "quantize":
        from auto_round import AutoRound

        model_dir, out, tokens = a.paths
        calib = load_file(tokens)["calib"]
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(model_dir)
        batches = list(calib.split(a.batch))
        ar = AutoRound(model, tok, bits=a.bits, group_size=a.group_size, sym=not a.asym, dataset=batches,
                       iters=iters, nsamples=calib.shape[0], seqlen=calib.shape[1], batch_size=a.batch,
                       device_map="cpu", amp=False, enable_torch_compile=False)
        ar.quantize_and_save(out, format="auto_round")
        print(json.dumps({**stored_bpw(out, model_dir), "iters": iters}))
    else:
        out, tokens = a.paths
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, device_map="cpu")
        n = to_float_linears(model)
        model.float()
        print(json.dumps({**scores(model, tokens), "dequantized_linears": n}))
    print(peak_rss_line(), file=sys.stderr)


if __name__ == "__main__":
    main()
