"""What the peer scripts share. Perplexity exactly as lowbit.evaluate computes it, re-stated in plain torch
because this file runs inside the peers' own venvs, where lowbit is not installed: every peer's model (and
lowbit's, in run.py) is scored by this same code on the same token windows."""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F


@torch.inference_mode()
def perplexity(model, windows: torch.Tensor) -> float:
    """windows: [n, seqlen] token ids; every next-token prediction inside a window is scored."""
    nll, count = 0.0, 0
    for w in windows:
        x = w.unsqueeze(0)
        target = x[:, 1:].reshape(-1)
        logp = F.log_softmax(model(x).logits[:, :-1].float().flatten(0, 1), dim=-1)
        nll += float(F.nll_loss(logp, target, reduction="sum"))
        count += target.numel()
    return math.exp(nll / count)


def peak_rss_line() -> str:
    """This process's peak RSS in KiB: VmHWM, which exec resets (getrusage's ru_maxrss keeps the high-water mark
    of the process that spawned it, so a child of a big parent would report the parent's peak)."""
    with open("/proc/self/status") as f:
        kib = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))
    return f"PEAK_RSS_KIB {kib}"


def peer_args(default_group: int) -> argparse.Namespace:
    """The command line every peer script takes: `quantize MODEL_DIR OUT TOKENS` or `eval OUT TOKENS`."""
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["quantize", "eval"])
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=default_group)
    ap.add_argument("--asym", action="store_true")
    ap.add_argument("--batch", type=int, default=8)
    return ap.parse_args()


def linear_numels(float_dir: str) -> dict[str, int]:
    """{module prefix ('model.layers.0.self_attn.q_proj.'): weight count} of every decoder-block linear of the
    float model (2-D '.weight' tensors inside model.layers): the weights every tool quantizes."""
    import glob

    from safetensors import safe_open

    out = {}
    for path in glob.glob(f"{float_dir}/*.safetensors"):
        with safe_open(path, "pt") as f:
            for k in f.keys():
                shape = f.get_slice(k).get_shape()
                if ".layers." in k and k.endswith(".weight") and len(shape) == 2:
                    out[k[: -len("weight")]] = shape[0] * shape[1]
    return out


_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
          "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def stored_bpw(out_dir: str, float_dir: str) -> dict:
    """Bits per weight of the quantized linears as the checkpoint stores them: every tensor saved under a
    quantized linear's name (codes, scales, zero points, group indices, shapes: all counted) in bits, over
    the float weights those linears hold. Tensors outside the decoder-block linears (embeddings, norms) are
    left out: every tool keeps them in float."""
    import glob

    from safetensors import safe_open

    numels = linear_numels(float_dir)
    prefixes = tuple(numels)
    nbytes = 0
    for path in glob.glob(f"{out_dir}/*.safetensors"):
        with safe_open(path, "pt") as f:
            for k in f.keys():
                if k.startswith(prefixes):
                    s = f.get_slice(k)
                    n = 1
                    for d in s.get_shape():
                        n *= d
                    nbytes += n * _BYTES[s.get_dtype()]
    return {"bpw": 8 * nbytes / sum(numels.values()), "quantized_weights": sum(numels.values())}


def scores(model, tokens_path: str) -> dict:
    """Perplexity on every evaluation set of the token file: 'eval' (WikiText-2 test) -> ppl, 'eval2' (the
    second text) -> ppl2."""
    from safetensors.torch import load_file

    t = load_file(tokens_path)
    out = {"ppl": perplexity(model, t["eval"])}
    if "eval2" in t:
        out["ppl2"] = perplexity(model, t["eval2"])
    return out
