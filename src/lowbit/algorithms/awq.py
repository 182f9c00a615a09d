"""AWQ (Lin et al. 2023): activation-aware scaling before quantization.

Per input channel j of a group of linears fed by the same op, s_j = mean|x_j|^α
(normalized by sqrt(max s · min s)); the linears' weights are multiplied by s
and the feeding op (a norm, or the rows of a linear) divided by s, so the float
model computes the same function while salient input channels get a finer grid.
α is chosen from a grid on [0, 1) by the output MSE of the layers against the
float ones. Then, optionally, the weight range of every group is clipped where
that lowers the output error, and the layers are quantized with RTN or GPTQ
(`awq+gptq`).

Both searches score a candidate weight by its output MSE on every calibration token, computed from
H = 2/n Σ x xᵀ (the matrix GPTQ uses, gathered once per input) rather than by running the tokens
through the layer for every candidate: d H dᵀ for the weight error d, exactly the same number.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration.sequential import layer_sequential, observe_inputs
from ..core.config import QuantConfig, option
from ..core.gptq import Hessians
from ..core.quant import compute_qparams, grouped, ungrouped
from ..core.scheme import Scheme
from ..errors import LowbitError
from ..models.arch import awq_clips, block_linears, scale_mappings, select_modules, set_module
from ..nn.qlinear import QuantLinear
from .gptq import gptq_linears
from .registry import CalibOptions, ForwardOptions, MethodSpec, register


@dataclass(frozen=True)
class AwqOptions(CalibOptions, ForwardOptions):
    awq_grid: int = option(20, "Points of the scale search's alpha grid on [0, 1).")
    awq_clip: bool = option(True, "Then search each group's clipped weight range where it lowers the output "
                                  "error; --no-awq-clip: keep min/max.")

    def check(self) -> None:
        if self.awq_grid < 1:
            raise LowbitError(f"--awq-grid must be >= 1, got {self.awq_grid}")


def rtn_dequant(W: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """W -> dequantize(quantize(W)) in float32 (same grid and the same float operations as the stored one,
    in place on one grouped copy: the searches call it for every candidate)."""
    W2 = W.float()
    s, z = compute_qparams(W2, scheme)
    s = s.float().unsqueeze(-1)
    q = grouped(W2, scheme).div(s).round_()
    if z is not None:
        zf = z.float().unsqueeze(-1)
        q.add_(zf).clamp_(scheme.qmin, scheme.qmax).sub_(zf)
    else:
        q.clamp_(scheme.qmin, scheme.qmax)
    return ungrouped(q.mul_(s), *W2.shape)


class AbsMeans:
    """mean |x| per input channel of every observed linear, over every calibration token (linears that read
    the same tensor, like q/k/v, share the pass)."""

    def __init__(self, linears: dict[str, nn.Module]) -> None:
        self.sums = {n: torch.zeros(m.in_features, dtype=torch.float64, device=m.weight.device)
                     for n, m in linears.items()}
        self.counts = dict.fromkeys(linears, 0)
        self._last: tuple[torch.Tensor, torch.Tensor, int] | None = None

    def observe(self, name: str, x: torch.Tensor) -> None:
        if self._last is None or self._last[0] is not x:
            x2 = x.reshape(-1, x.shape[-1])  # Σ |x| per column without an |x| copy (25 MB for down_proj's input)
            self._last = (x, torch.linalg.vector_norm(x2.float(), 1, dim=0).double(), x2.shape[0])
        self.sums[name] += self._last[1]
        self.counts[name] += self._last[2]

    def __getitem__(self, name: str) -> torch.Tensor:
        return (self.sums[name] / max(self.counts[name], 1)).float()

    def reduce(self) -> None:
        """Sums and counts over every data-parallel rank (core/dist.py; no-op in one process)."""
        from ..core import dist

        if dist.world_size() == 1:
            return
        for n in self.sums:
            dist.all_reduce_sum(self.sums[n])
            self.counts[n] = dist.all_reduce_count(self.counts[n], self.sums[n].device)


def output_mse(d: torch.Tensor, H: torch.Tensor) -> float:
    """Mean over tokens and outputs of (x dᵀ)², from H = 2/n Σ x xᵀ: Σ_o d_o (H/2) d_oᵀ / out.

    d: [out, in], a weight's error. The same number as running the calibration tokens through the
    layer, without touching them: [out, in] x [in, in] instead of [tokens, in] x [in, out]."""
    return float(((d @ H) * d).sum()) / (2 * d.shape[0])


@torch.no_grad()
def search_scale(H: torch.Tensor, mean_abs: torch.Tensor, linears: list[nn.Linear], schemes: list[Scheme],
                 n_grid: int = 20) -> tuple[torch.Tensor, float, float]:
    """Best s over α in {0, 1/n_grid, ..., (n_grid-1)/n_grid}: (s, α, loss). α = 0 gives s = 1.

    loss = Σ over the linears of the output MSE of Q(W s)/s against W on the calibration tokens (whose
    H = 2/n Σ x xᵀ they share)."""
    Ws = [l.weight.float() for l in linears]
    H = H.float()
    best = (torch.ones_like(mean_abs), 0.0, math.inf)
    for i in range(n_grid):
        alpha = i / n_grid
        s = mean_abs.clamp(min=1e-4).pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        loss = sum(output_mse(rtn_dequant(W * s, sch) / s - W, H) for W, sch in zip(Ws, schemes))
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
def search_clip(H: torch.Tensor, W: torch.Tensor, scheme: Scheme, n_grid: int = 20, max_shrink: float = 0.5
                ) -> torch.Tensor:
    """Clip each group's range to r·[min, max] with r in [1 - max_shrink, 1] minimizing the group's output error.

    A group's error is its share of the output MSE on the calibration tokens, from the diagonal block of
    H = 2/n Σ x xᵀ over the group's columns: d_g H_gg d_gᵀ. Returns the clipped weight. Works on the
    scheme's groups ([out, G, g] view)."""
    if scheme.granularity == "tensor":
        return W
    Wf = W.float()
    rows, cols = Wf.shape
    wg = grouped(Wf, scheme)  # [out, G, g]
    n_groups, g = wg.shape[1], wg.shape[2]
    Hp = torch.zeros(n_groups * g, n_groups * g, device=W.device)  # padded columns (copies of the last one) carry no error
    Hp[:cols, :cols] = H.float()
    Hb = Hp.reshape(n_groups, g, n_groups, g).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # [G, g, g] diagonal blocks

    def group_err(wq: torch.Tensor) -> torch.Tensor:  # [out, cols] -> [out, G]
        d = torch.zeros(rows, n_groups * g, device=W.device)
        d[:, :cols] = wq - Wf
        d = d.reshape(rows, n_groups, g).transpose(0, 1)  # [G, out, g]
        return (torch.bmm(d, Hb) * d).sum(-1).T

    hi0, lo0 = wg.amax(-1), wg.amin(-1)
    best_err = torch.full(hi0.shape, math.inf, device=hi0.device)
    best_hi, best_lo = hi0.clone(), lo0.clone()
    for i in range(int(max_shrink * n_grid)):
        r = 1 - i / n_grid
        hi, lo = hi0 * r, lo0 * r
        if scheme.symmetric:
            m = torch.maximum(hi.abs(), lo.abs())
            hi, lo = m, -m
        wc = torch.maximum(torch.minimum(wg, hi.unsqueeze(-1)), lo.unsqueeze(-1))
        # quantize every group of the clipped weight with its own min/max grid
        err = group_err(rtn_dequant(ungrouped(wc, rows, cols), scheme))  # [out, G]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_hi = torch.where(better, hi, best_hi)
        best_lo = torch.where(better, lo, best_lo)
    wc = torch.maximum(torch.minimum(wg, best_hi.unsqueeze(-1)), best_lo.unsqueeze(-1))
    return ungrouped(wc, rows, cols).to(W.dtype)


def awq_block(model: nn.Module, config: QuantConfig, selected: set[str], use_gptq: bool):
    """use_gptq: config.options also holds GPTQ's sweep settings (awq_gptq.AwqGptqOptions)."""
    opts: AwqOptions = config.options

    def process(block_name: str, block: nn.Module, inputs, kw) -> dict[str, Scheme]:
        linears = {n: m for n, m in block_linears(model, block_name, block) if n in selected}
        means = AbsMeans(linears)
        hess = Hessians(linears)  # H = 2/n Σ x xᵀ: the searches' output errors, then GPTQ's (rescaled below)

        def observe(n: str, x: torch.Tensor) -> None:
            means.observe(n, x)
            hess.observe(n, x)

        observe_inputs(block, linears, inputs, kw, observe)
        means.reduce()  # data-parallel calibration: every rank's samples (core/dist.py)
        hess.reduce(list(linears))
        # 1. activation-aware scales, folded into the op that feeds each group of linears
        for prev, rel_names in scale_mappings(model, block):
            names = [f"{block_name}.{r}" for r in rel_names]
            if not all(n in linears for n in names):
                continue
            lins = [linears[n] for n in names]
            s, alpha, loss = search_scale(hess[names[0]].H, means[names[0]], lins,
                                          [config.scheme_for(n) for n in names], opts.awq_grid)
            apply_scale(prev, lins, s)
            for n in hess.distinct(names):  # their inputs are now x / s, so H = 2/n Σ x xᵀ becomes H / (s sᵀ)
                hess[n].H.div_(torch.outer(s, s).to(hess[n].H.dtype))
            tqdm.write(f"lowbit: awq {block_name}: {'+'.join(r.rsplit('.', 1)[-1] for r in rel_names)} "
                       f"alpha {alpha:.2f} loss {loss:.4g}", file=sys.stderr)
        # 2. clipping search, then quantization
        for n, lin in linears.items():
            if opts.awq_clip and awq_clips(model, n):  # as the reference: q/k are not clipped
                lin.weight.copy_(search_clip(hess[n].H, lin.weight, config.scheme_for(n)))
        qts = gptq_linears(linears, hess, config, opts) if use_gptq else {}
        done = {}
        for n, lin in linears.items():
            scheme = config.scheme_for(n)
            set_module(model, n, QuantLinear.from_linear(lin, scheme, qt=qts[n][0] if n in qts else None))
            done[n] = scheme
        return done

    return process


def run_awq(model: nn.Module, config: QuantConfig, ctx, use_gptq: bool) -> dict[str, Scheme]:
    ids = ctx.calib_ids()
    selected = set(select_modules(model, config.include, config.exclude, tuple(config.overrides)))
    proc = awq_block(model, config, selected, use_gptq)
    return layer_sequential(model, ids, proc, desc="awq+gptq" if use_gptq else "awq",
                            forward_dtype=config.options.calib_dtype)


def awq(model: nn.Module, config: QuantConfig, ctx) -> dict[str, Scheme]:
    return run_awq(model, config, ctx, use_gptq=False)


SPEC = register(MethodSpec(
    name="awq", run=awq, options=AwqOptions, help="activation-aware scales and clipping, then rounding to nearest",
    calibration=True, streams_blocks=True, streams_output=True,  # layer-sequential: one block at a time
))
