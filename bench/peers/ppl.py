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
