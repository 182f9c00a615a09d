"""Per-input-column statistics of every linear layer, gathered on calibration text in one float pass.

``input_sq_means`` is what llama.cpp calls an importance matrix ("imatrix"): for each linear, the
mean of x_j² over all calibration tokens, per input column j. The squared error a weight w_ij adds
to the layer's output is, on average, proportional to it; quantizers weight their errors by it.
"""
from __future__ import annotations

import sys

import torch
from torch import nn
from tqdm.auto import tqdm


@torch.no_grad()
def input_sq_means(model: nn.Module, ids: torch.Tensor, batch: int = 4, progress: bool = True,
                   full: bool = False) -> dict[str, torch.Tensor]:
    """Module name -> mean x² per input column, over the [N, T] calibration windows ``ids``
    (``full``: the whole second-moment matrix E[x xᵀ], [in, in], whose diagonal that is — GPTQ's H/2).

    With tied embeddings the output matrix is the token embedding: its statistics are also filed
    under the embedding's name (llama.cpp's imatrix records them for token_embd in that case)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook(name):
        def fn(mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            s = x.T @ x if full else (x * x).sum(dim=0)
            if name in sums:
                sums[name] += s
            else:
                sums[name] = s
            counts[name] = counts.get(name, 0) + x.shape[0]
        return fn

    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) or hasattr(mod, "dequantize_weight") and hasattr(mod, "in_features"):
            hooks.append(mod.register_forward_pre_hook(hook(name)))
    try:
        for i in tqdm(range(0, ids.shape[0], batch), desc="activation statistics", unit="batch",
                      file=sys.stderr, disable=not progress):
            model(ids[i:i + batch])
    finally:
        for h in hooks:
            h.remove()
    out = {n: sums[n] / counts[n] for n in sums}
    if getattr(model.config, "tie_word_embeddings", False):
        emb = model.get_input_embeddings()
        head = model.get_output_embeddings()
        names = {id(m): n for n, m in model.named_modules()}
        if head is not None and names.get(id(head)) in out and id(emb) in names:
            out[names[id(emb)]] = out[names[id(head)]]
    return out
