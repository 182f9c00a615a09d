"""SmoothQuant (Xiao et al. 2022): smoothing folded into the model, and the calibrated path of W8A8 (w8a8.py).

SmoothQuant moves activation outliers into the weights: for every input channel j
of a group of linears fed by one op (data mappings in models/arch.py),

    s_j = max|X_j|^α / max|W_:j|^(1-α)        (max|W| over all the group's weights)

then the feeding op (a norm, or the rows of a linear) is divided by s and the
linears' input columns multiplied by s: the float model is unchanged and
max|X_j / s_j| = max|X_j|^(1-α) max|W_j|^(1-α) is flatter across channels.
"""
from __future__ import annotations

import sys

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration.sequential import layer_sequential, observe_inputs
from ..core.config import QuantConfig
from ..core.scheme import Scheme
from ..errors import LowbitError
from ..models.arch import block_linears, scale_mappings, select_modules, set_module
from .awq import apply_scale


def smooth_factors(x_amax: torch.Tensor, w_amax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^α / max|W_j|^(1-α); channels never active (max|X_j| = 0) keep s = 1."""
    if not 0.0 <= alpha <= 1.0:
        raise LowbitError(f"SmoothQuant alpha must be in [0, 1], got {alpha}")
    s = x_amax.float().clamp(min=1e-5).pow(alpha) / w_amax.float().clamp(min=1e-5).pow(1 - alpha)
    s = torch.where(x_amax > 0, s, torch.ones_like(s))
    return s.clamp(min=1e-5)


@torch.no_grad()
def smooth_block(model: nn.Module, block: nn.Module, block_name: str, amax: dict[str, torch.Tensor],
                 alpha: float) -> None:
    """Fold smoothing factors into every mapping of this block whose linears all have statistics.
    `amax` (per-channel max |x| of each linear's input) is updated to the smoothed inputs."""
    for prev, rel in scale_mappings(model, block):
        names = [f"{block_name}.{r}" for r in rel]
        if not all(n in amax for n in names):
            continue
        lins = [block.get_submodule(r) for r in rel]
        w_amax = torch.stack([l.weight.detach().abs().amax(dim=0).float() for l in lins]).amax(dim=0)
        s = smooth_factors(amax[names[0]], w_amax, alpha)
        apply_scale(prev, lins, s)
        for n in names:
            amax[n] = amax[n] / s


def channel_amax(block: nn.Module, linears: dict[str, nn.Module], inputs, kw) -> dict[str, torch.Tensor]:
    """Run the block once: per input channel max |x| of every listed linear."""
    amax = {n: torch.zeros(m.in_features) for n, m in linears.items()}

    def observe(n: str, x: torch.Tensor) -> None:
        amax[n] = torch.maximum(amax[n], x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float())

    observe_inputs(block, linears, inputs, kw, observe)
    return amax


def calibrated_linears(model: nn.Module, config: QuantConfig, ctx, make, alpha: float | None, desc: str
                       ) -> dict[str, Scheme]:
    """Layer-sequential: per-channel max |x| of every selected linear's input, smoothing, then `make`."""
    selected = set(select_modules(model, config.include, config.exclude, tuple(config.overrides)))
    ids = ctx.calib_ids()

    def process(block_name: str, block: nn.Module, inputs, kw) -> dict[str, Scheme]:
        linears = {n: m for n, m in block_linears(model, block_name, block) if n in selected}
        amax = channel_amax(block, linears, inputs, kw)
        if alpha is not None:
            smooth_block(model, block, block_name, amax, alpha)
        done = {}
        for n, lin in linears.items():
            scheme = config.scheme_for(n)
            set_module(model, n, make(lin, scheme, float(amax[n].max())))
            done[n] = scheme
        tqdm.write(f"lowbit: {desc} {block_name}: max|x| per linear "
                   + " ".join(f"{n.rsplit('.', 1)[-1]}={float(a.max()):.3g}" for n, a in amax.items()), file=sys.stderr)
        return done

    done = layer_sequential(model, ids, process, desc=desc)
    rest = sorted(selected - set(done))
    if rest:
        raise LowbitError(f"{desc}: calibrated activation quantization covers decoder-block linears only; "
                          f"exclude {rest[0]}")
    return done


@torch.no_grad()
def smooth(model: nn.Module, ids: torch.Tensor, alpha: float = 0.5) -> nn.Module:
    """SmoothQuant's smoothing alone, in float (nothing is quantized): the model computes the same function."""

    def process(block_name: str, block: nn.Module, inputs, kw) -> dict:
        amax = channel_amax(block, dict(block_linears(model, block_name, block)), inputs, kw)
        smooth_block(model, block, block_name, amax, alpha)
        return {}

    layer_sequential(model, ids, process, desc="smooth")
    return model
