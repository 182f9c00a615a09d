"""Activation outliers: what every linear's input looks like on calibration text.

Per linear (its input x [tokens, K]):
    max_abs      max |x| over all tokens and dimensions
    median_abs   median |x| (over an even stride of the tokens, every dimension)
    ratio        max_abs / median_abs
    outlier dims the input dimensions j with |x_tj| >= threshold for some token t, each
                 with the share of tokens in which it fires
Across layers, a dimension that reaches the threshold in at least 6% of the tokens
in at least 25% of the layers (of its input width) is one of the "emergent outlier
features" of Dettmers et al. (2022).
"""
from __future__ import annotations

import sys

import torch
from torch import nn
from tqdm.auto import tqdm

from ..models.arch import short_name
from ..nn.qlinear import QuantLinear

MEDIAN_TOKENS = 2048  # tokens per layer kept for the median
FEATURE_TOKEN_SHARE = 0.06  # Dettmers et al.: an outlier feature fires in >= 6% of the sequence
FEATURE_LAYER_SHARE = 0.25  # ... in >= 25% of the layers


@torch.inference_mode()
def activation_outliers(model: nn.Module, ids: torch.Tensor, threshold: float = 6.0, top: int = 8,
                        batch: int = 4, progress: bool = True) -> dict:
    """ids [nsamples, seqlen] -> {"layers": [...], "features": [...], "threshold", "tokens"}.

    features: per input width, up to 50 dimensions that reach the threshold in >= 6% of the tokens of
    some layer, ranked by the share of layers where they do; "emergent" marks >= 25% of the layers."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear))}
    n_tok = ids.numel()
    stride = max(1, n_tok // MEDIAN_TOKENS)
    st = {n: {"max": 0.0, "count": torch.zeros(m.in_features, dtype=torch.long), "sample": []}
          for n, m in linears.items()}

    def hook(name):
        def fn(mod, inp, out):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).float().abs()
            s = st[name]
            s["max"] = max(s["max"], float(x.max()))
            s["count"] += (x >= threshold).sum(dim=0)
            s["sample"].append(x[::stride].clone())
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in linears.items()]
    try:
        for i in tqdm(range(0, ids.shape[0], batch), desc="activations", unit="batch", file=sys.stderr,
                      disable=not progress, leave=False):
            model(ids[i: i + batch], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    layers = []
    for n, s in st.items():
        med = float(torch.cat(s["sample"]).median()) if s["sample"] else 0.0
        share = s["count"].double() / n_tok
        dims = share.nonzero().flatten()
        order = dims[share[dims].argsort(descending=True)]
        layers.append({
            "name": n, "max_abs": s["max"], "median_abs": med,
            "ratio": s["max"] / med if med > 0 else float("inf"),
            "n_outlier_dims": int(dims.numel()),
            "outlier_dims": [{"dim": int(d), "share": round(float(share[d]), 5)} for d in order[:top]],
            "_share": share,
        })
    # emergent features: the same dimension index across layers of the same input width
    features = []
    by_width: dict[int, list[dict]] = {}
    for l in layers:
        by_width.setdefault(l["_share"].numel(), []).append(l)
    for width, ls in by_width.items():
        if len(ls) < 4:
            continue
        hit = torch.stack([(l["_share"] >= FEATURE_TOKEN_SHARE) for l in ls]).double()  # [layers, width]
        frac_layers = hit.mean(0)
        mean_share = torch.stack([l["_share"] for l in ls]).mean(0)
        ranked = sorted((frac_layers > 0).nonzero().flatten().tolist(),
                        key=lambda d: (-float(frac_layers[d]), -float(mean_share[d])))
        for d in ranked[:50]:
            features.append({"width": width, "dim": d, "layers_frac": round(float(frac_layers[d]), 3),
                             "mean_token_share": round(float(mean_share[d]), 5),
                             "emergent": bool(frac_layers[d] >= FEATURE_LAYER_SHARE)})
    features.sort(key=lambda f: (-f["layers_frac"], -f["mean_token_share"]))
    for f in features:  # the token share of this dimension in every layer of its width (0 elsewhere)
        f["shares"] = [round(float(l["_share"][f["dim"]]), 5) if l["_share"].numel() == f["width"] else 0.0
                       for l in layers]
    for l in layers:
        l.pop("_share")
    return {"threshold": threshold, "tokens": int(n_tok), "layers": layers, "features": features}


def plot_outliers(result: dict, path, top_dims: int = 12) -> None:
    """PNG: per-layer max and median |x| (log scale); top outlier dimensions' token share per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = result["layers"]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(14, 9), gridspec_kw={"height_ratios": [1, 1.2]})
    xs = range(len(layers))
    a1.semilogy(xs, [max(l["max_abs"], 1e-6) for l in layers], ".-", label="max |x|")
    a1.semilogy(xs, [max(l["median_abs"], 1e-6) for l in layers], ".-", label="median |x|")
    a1.axhline(result["threshold"], color="gray", ls="--", lw=0.8, label=f"threshold {result['threshold']:g}")
    a1.set_title(f"Input of every linear ({result['tokens']} calibration tokens)")
    a1.set_xlabel("linear layer (model order)")
    a1.legend(loc="upper left", fontsize=8)
    ticks = list(range(0, len(layers), max(1, len(layers) // 20)))
    a1.set_xticks(ticks, [short_name(layers[i]["name"]) for i in ticks], rotation=60, fontsize=6)
    feats = [f for f in result["features"]][:top_dims]
    if feats:
        width = feats[0]["width"]
        feats = [f for f in feats if f["width"] == width]
        grid = torch.tensor([f["shares"] for f in feats])
        im = a2.imshow(grid.numpy(), aspect="auto", cmap="magma", interpolation="nearest")
        a2.set_yticks(range(len(feats)), [f"dim {f['dim']}" for f in feats], fontsize=7)
        a2.set_xlabel("linear layer (model order)")
        a2.set_title(f"Share of tokens with |x| >= {result['threshold']:g} in the top outlier dimensions (input width {width})")
        fig.colorbar(im, ax=a2, fraction=0.02)
    else:
        a2.text(0.5, 0.5, "no dimension reaches the threshold in 6% of the tokens of any layer", ha="center", va="center")
        a2.set_axis_off()
    fig.tight_layout()
    from ..core.io import atomic_path

    try:
        with atomic_path(path, overwrite=True, is_dir=False, kind="png") as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
