"""How much each weight tensor's quantization error costs the model, measured on calibration text.

The proxy (`proxy_cost`): a second-order model of the loss. A linear y = W x whose weight moves by D adds
δy_t = D x_t at every token; with the output-side Fisher F (E[g gᵀ] of g = ∂loss/∂y, kept diagonal: f per
output row) and the input second moment H = E[x xᵀ],

    cost(D) = Σ_j f_j · D_j H D_jᵀ        (≈ twice the expected increase of the per-token loss)

— the Hessian-weighted output error of GPTQ (H), weighted per output row by how much the loss reacts to
that output (f), which makes the costs of different layers comparable. An embedding row v is used with
frequency p_v: cost = Σ_v p_v Σ_j f_j D_vj². A tied embedding/head pays both.
Both statistics come from one forward and backward pass over the calibration windows (`layer_statistics`).

The real measure (`kl_cost`): the mean per-token KL(float ‖ model) of the whole model's next-token
distributions when only the given tensors are replaced by their quantized values, on held-out windows.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm


@dataclass
class LayerStats:
    H: torch.Tensor | None  # [in, in] E[x xᵀ] (linears)
    f: torch.Tensor  # [out] E[(∂loss/∂y_j)²] per token
    p: torch.Tensor | None = None  # [rows] token frequencies (embeddings)
    tokens: int = 0


def layer_statistics(model: nn.Module, ids: torch.Tensor, names: list[str] | None = None, batch: int = 2,
                     progress: bool = True) -> dict[str, LayerStats]:
    """{module name: LayerStats} for the Linear and Embedding modules named (default: all of them), from one
    forward and backward pass (loss: the summed next-token cross entropy) over the [N, T] windows `ids`."""
    mods = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))
            and (names is None or n in names)}
    H: dict[str, torch.Tensor] = {}
    f: dict[str, torch.Tensor] = {}
    p: dict[str, torch.Tensor] = {}
    count: dict[str, int] = {}
    hooks = []

    def fwd(name):
        def fn(mod, args, out):
            x = args[0].detach()
            if isinstance(mod, nn.Embedding):
                c = torch.bincount(x.reshape(-1), minlength=mod.num_embeddings).float()
                p[name] = p[name] + c if name in p else c
            else:
                x2 = x.reshape(-1, x.shape[-1]).float()
                s = x2.T @ x2
                H[name] = H[name] + s if name in H else s
            count[name] = count.get(name, 0) + x.numel() // (1 if isinstance(mod, nn.Embedding) else x.shape[-1])
            if not out.requires_grad:
                out = out.detach().requires_grad_(True)

            def gfn(g):
                g2 = g.detach().reshape(-1, g.shape[-1]).float().pow(2).sum(0)
                f[name] = f[name] + g2 if name in f else g2
            out.register_hook(gfn)
            return out
        return fn

    for n, m in mods.items():
        hooks.append(m.register_forward_hook(fwd(n)))
    emb = model.get_input_embeddings()
    if not any(m is emb for m in mods.values()):  # the graph starts at the embeddings' output
        hooks.append(emb.register_forward_hook(lambda mod, a, out: out.detach().requires_grad_(True)))
    try:
        with torch.enable_grad():
            for i in tqdm(range(0, ids.shape[0], batch), desc="sensitivity statistics", unit="batch",
                          file=sys.stderr, disable=not progress):
                x = ids[i:i + batch]
                logits = model(x).logits
                loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                   x[:, 1:].reshape(-1), reduction="sum")
                loss.backward()
                del logits, loss
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for n, m in mods.items():
        if n not in count:
            continue
        t = count[n]
        if isinstance(m, nn.Embedding):
            out[n] = LayerStats(None, f[n] / t, p[n] / t, t)
        else:
            out[n] = LayerStats(H[n] / t, f[n] / t, None, t)
    return out


def proxy_cost(D: torch.Tensor, stats: LayerStats, embedding: bool = False) -> float:
    """Σ_j f_j D_j H D_jᵀ for a linear's weight error D [out, in]; for an embedding's D [rows, dim]:
    Σ_v p_v Σ_j f_j D_vj²."""
    D = D.float()
    if embedding:
        return float((stats.p @ (D * D)) @ stats.f)
    return float(((D @ stats.H) * D).sum(1) @ stats.f)


@torch.no_grad()
def float_logprobs(model: nn.Module, ids: torch.Tensor, batch: int = 2) -> torch.Tensor:
    return torch.cat([torch.log_softmax(model(ids[i:i + batch]).logits.float(), -1)
                      for i in range(0, ids.shape[0], batch)])


@torch.no_grad()
def kl_cost(model: nn.Module, ids: torch.Tensor, ref_logp: torch.Tensor, replace: dict[str, torch.Tensor],
            batch: int = 2) -> float:
    """Mean per-token KL(float ‖ model) with the parameters named in `replace` ({param name: tensor})
    swapped in, then restored."""
    params = dict(model.named_parameters())
    saved = {}
    for n, t in replace.items():
        saved[n] = params[n].data
        params[n].data = t.to(saved[n].dtype).reshape(saved[n].shape)
    try:
        kl = 0.0
        for i in range(0, ids.shape[0], batch):
            lp = torch.log_softmax(model(ids[i:i + batch]).logits.float(), -1)
            ref = ref_logp[i:i + batch]
            kl += float((ref.exp() * (ref - lp)).sum())
        return kl / (ids.shape[0] * ids.shape[1])
    finally:
        for n, t in saved.items():
            params[n].data = t


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(v):
        t = torch.tensor(v, dtype=torch.float64)
        order = torch.argsort(t)
        r = torch.empty_like(t)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        for val in torch.unique(t):  # ties: average rank
            m = t == val
            if m.sum() > 1:
                r[m] = r[m].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra @ rb) / den) if den > 0 else 0.0
