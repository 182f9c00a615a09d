"""AWQ (Lin et al. 2023): activation-aware scaling before quantization.

Per input channel j of a group of linears fed by the same op, s_j = mean|x_j|^α
(normalized by sqrt(max s · min s)); the linears' weights are multiplied by s
and the feeding op (a norm, or the rows of a linear) divided by s, so the float
model computes the same function while salient input channels get a finer grid.
α is chosen from a grid on [0, 1) by the output MSE of the layers against the
float ones. Then, optionally, the weight range of every group is clipped where
that lowers the output error, and the layers are quantized with RTN or GPTQ
(`awq+gptq`).
"""
from __future__ import annotations

import math
import sys

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration.sequential import layer_sequential, observe_inputs
from ..core.config import QuantConfig
from ..core.quant import compute_qparams, dequantize_grouped, grouped, quantize_codes, ungrouped
from ..core.registry import register_method
from ..core.scheme import Scheme
from ..models.arch import block_linears, scale_mappings, select_modules, set_module
from ..nn.qlinear import QuantLinear
from .gptq import Hessians, gptq_linears, gptq_options


def rtn_dequant(W: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """W -> dequantize(quantize(W)) in float32 (same grid as the stored one)."""
    W2 = W.float()
    s, z = compute_qparams(W2, scheme)
    xg = grouped(W2, scheme)
    return ungrouped(dequantize_grouped(quantize_codes(xg, s, z, scheme), s, z), *W2.shape)


class InputStats:
    """mean |x| per channel over all tokens, plus an evenly strided sample of the tokens."""

    def __init__(self, n: int, stride: int) -> None:
        self.abs_sum = torch.zeros(n, dtype=torch.float64)
        self.count = 0
        self.stride = stride
        self.samples: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.abs_sum += x.abs().sum(0).double()
        self.count += x.shape[0]
        self.samples.append(x[:: self.stride].clone())

    @property
    def mean_abs(self) -> torch.Tensor:
        return (self.abs_sum / max(self.count, 1)).float()

    @property
    def x(self) -> torch.Tensor:
        return torch.cat(self.samples)


@torch.no_grad()
def search_scale(x: torch.Tensor, mean_abs: torch.Tensor, linears: list[nn.Linear], schemes: list[Scheme],
                 n_grid: int = 20) -> tuple[torch.Tensor, float, float]:
    """Best s over α in {0, 1/n_grid, ..., (n_grid-1)/n_grid}: (s, α, loss). α = 0 gives s = 1."""
    refs = [x @ l.weight.float().T for l in linears]
    best = (torch.ones_like(mean_abs), 0.0, math.inf)
    for i in range(n_grid):
        alpha = i / n_grid
        s = mean_abs.clamp(min=1e-4).pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        loss = 0.0
        for l, sch, ref in zip(linears, schemes, refs):
            wq = rtn_dequant(l.weight.float() * s, sch) / s
            loss += float((x @ wq.T - ref).pow(2).mean())
        if loss < best[2]:
            best = (s, alpha, loss)
    return best


@torch.no_grad()
def apply_scale(prev: nn.Module, linears: list[nn.Linear], s: torch.Tensor) -> None:
    """Fold s: prev's output channels / s, the linears' input columns * s (the float function is unchanged)."""
    if isinstance(prev, nn.Linear):
        prev.weight.div_(s.view(-1, 1).to(prev.weight.dtype))
        if prev.bias is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
    else:  # a norm with an elementwise weight (LayerNorm, RMSNorm)
        prev.weight.div_(s.to(prev.weight.dtype))
        if getattr(prev, "bias", None) is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
    for l in linears:
        l.weight.mul_(s.view(1, -1).to(l.weight.dtype))


@torch.no_grad()
def search_clip(x: torch.Tensor, W: torch.Tensor, scheme: Scheme, n_grid: int = 20, max_shrink: float = 0.5,
                n_tokens: int = 512) -> torch.Tensor:
    """Clip each group's range to r·[min, max] with r in [1 - max_shrink, 1] minimizing the group's output error.

    Returns the clipped weight. Works on the scheme's groups ([out, G, g] view)."""
    if scheme.granularity == "tensor":
        return W
    x = x[:: max(1, x.shape[0] // n_tokens)][:n_tokens].float()  # [T, in]
    Wf = W.float()
    rows, cols = Wf.shape
    wg = grouped(Wf, scheme)  # [out, G, g]
    xg = grouped(x, scheme)  # [T, G, g] (same column padding)
    ref = torch.einsum("tgk,ogk->tog", xg, wg)  # per-group partial outputs
    hi0, lo0 = wg.amax(-1), wg.amin(-1)
    best_err = torch.full(hi0.shape, math.inf)
    best_hi, best_lo = hi0.clone(), lo0.clone()
    for i in range(int(max_shrink * n_grid)):
        r = 1 - i / n_grid
        hi, lo = hi0 * r, lo0 * r
        if scheme.symmetric:
            m = torch.maximum(hi.abs(), lo.abs())
            hi, lo = m, -m
        wc = torch.maximum(torch.minimum(wg, hi.unsqueeze(-1)), lo.unsqueeze(-1))
        # quantize every group of the clipped weight with its own min/max grid
        wq = grouped(rtn_dequant(ungrouped(wc, rows, cols), scheme), scheme)
        err = (torch.einsum("tgk,ogk->tog", xg, wq) - ref).pow(2).mean(0)  # [out, G]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_hi = torch.where(better, hi, best_hi)
        best_lo = torch.where(better, lo, best_lo)
    wc = torch.maximum(torch.minimum(wg, best_hi.unsqueeze(-1)), best_lo.unsqueeze(-1))
    return ungrouped(wc, rows, cols).to(W.dtype)


def awq_options(config: QuantConfig) -> dict:
    o = {"awq_grid": 20, "awq_clip": True, "awq_tokens": 4096}
    o.update({k: v for k, v in config.options.items() if k in o})
    return o


def awq_block(model: nn.Module, config: QuantConfig, selected: set[str], n_tokens_total: int, use_gptq: bool):
    opts = awq_options(config)
    stride = max(1, n_tokens_total // opts["awq_tokens"])
    gopts = gptq_options(config)

    def process(block_name: str, block: nn.Module, inputs, kw) -> dict[str, Scheme]:
        linears = {n: m for n, m in block_linears(model, block_name, block) if n in selected}
        stats = {n: InputStats(m.in_features, stride) for n, m in linears.items()}
        hess = Hessians(linears) if use_gptq else None  # GPTQ's H from the same pass (rescaled below)

        def observe(n: str, x: torch.Tensor) -> None:
            stats[n].add(x)
            if hess is not None:
                hess.observe(n, x)

        observe_inputs(block, linears, inputs, kw, observe)
        # 1. activation-aware scales, folded into the op that feeds each group of linears
        for prev, rel_names in scale_mappings(model, block):
            names = [f"{block_name}.{r}" for r in rel_names]
            if not all(n in linears for n in names):
                continue
            st = stats[names[0]]
            lins = [linears[n] for n in names]
            s, alpha, loss = search_scale(st.x, st.mean_abs, lins, [config.scheme_for(n) for n in names], opts["awq_grid"])
            apply_scale(prev, lins, s)
            for n in names:  # their inputs are now x / s, so H = 2/n Σ x xᵀ becomes H / (s sᵀ)
                stats[n].samples = [t / s for t in stats[n].samples]
                if hess is not None:
                    hess[n].H.div_(torch.outer(s, s).to(hess[n].H.dtype))
            tqdm.write(f"lowbit: awq {block_name}: {'+'.join(r.rsplit('.', 1)[-1] for r in rel_names)} "
                       f"alpha {alpha:.2f} loss {loss:.4g}", file=sys.stderr)
        # 2. clipping search, then quantization
        for n, lin in linears.items():
            if opts["awq_clip"] and not n.endswith(("q_proj", "k_proj")):  # as the reference: q/k are not clipped
                lin.weight.copy_(search_clip(stats[n].x, lin.weight, config.scheme_for(n)))
        qts = gptq_linears(linears, hess, config, gopts) if use_gptq else {}
        done = {}
        for n, lin in linears.items():
            scheme = config.scheme_for(n)
            set_module(model, n, QuantLinear.from_linear(lin, scheme, qt=qts[n][0] if n in qts else None))
            done[n] = scheme
        return done

    return process


def _run(model: nn.Module, config: QuantConfig, ctx, use_gptq: bool) -> dict[str, Scheme]:
    ids = ctx.calib_ids()
    selected = set(select_modules(model, config.include, config.exclude, tuple(config.overrides)))
    proc = awq_block(model, config, selected, ids.numel(), use_gptq)
    return layer_sequential(model, ids, proc, desc="awq+gptq" if use_gptq else "awq")


@register_method("awq")
def awq(model: nn.Module, config: QuantConfig, ctx) -> dict[str, Scheme]:
    return _run(model, config, ctx, use_gptq=False)


@register_method("awq+gptq")
def awq_gptq(model: nn.Module, config: QuantConfig, ctx) -> dict[str, Scheme]:
    return _run(model, config, ctx, use_gptq=True)
