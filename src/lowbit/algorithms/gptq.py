"""GPTQ (Frantar et al. 2022) as a method: the math (H, the column sweep: core/gptq.py) run inside the
layer-sequential calibration pipeline.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration.sequential import Irregular, layer_sequential, observe_inputs, probe_groups, run_block_staged
from ..core.config import QuantConfig, option
from ..core.gptq import Hessians, gptq_rows
from ..core.quant import QTensor
from ..core.scheme import Scheme
from ..core.state import state_of
from ..errors import LowbitError
from ..kernels.native import gptq_cols_kernel
from ..models.arch import block_linears, sequential_groups, set_module
from ..nn.qlinear import QuantLinear
from .registry import CalibOptions, ForwardOptions, MethodSpec, register
from .rtn import ClipOptions


@dataclass(frozen=True)
class GptqSweepOptions(ClipOptions):
    """The GPTQ sweep's settings (gptq, and awq+gptq after its scale search)."""

    blocksize: int = option(128, "Columns per lazy-update block of the GPTQ sweep.")
    percdamp: float = option(0.01, "GPTQ dampening, as a fraction of the mean Hessian diagonal.")
    # act-order by default: on SmolLM2 at W4 g128 sym it gives a lower perplexity than natural order (README)
    act_order: bool = option(True, "Quantize columns by descending Hessian diagonal, with static groups; "
                                   "--no-act-order: natural order, each group fitted when reached.")

    def check(self) -> None:
        if self.blocksize < 1:
            raise LowbitError(f"--blocksize must be >= 1, got {self.blocksize}")
        if not self.percdamp >= 0:
            raise LowbitError(f"--percdamp must be >= 0 (a fraction of the mean Hessian diagonal), got {self.percdamp}")


@dataclass(frozen=True)
class GptqOptions(CalibOptions, ForwardOptions, GptqSweepOptions):
    true_sequential: bool = option(True, "Quantize q/k/v, o, gate/up, down in turn inside a block, each from "
                                         "inputs through the ones before it; --no-true-sequential: every linear "
                                         "from the float block's inputs.")


def _split_rows(qt: QTensor, sizes: list[int]) -> list[QTensor]:
    """A row-stacked QTensor (per-row params) back into its parts."""
    out, r = [], 0
    for n in sizes:
        out.append(QTensor(codes=qt.codes[r:r + n].contiguous(), scale=qt.scale[r:r + n].contiguous(),
                           zero=qt.zero[r:r + n].contiguous() if qt.zero is not None else None,
                           scheme=qt.scheme, shape=torch.Size((n, qt.shape[1]))))
        r += n
    return out


def gptq_linears(linears: dict[str, nn.Module], hess: Hessians, config: QuantConfig, opts: GptqSweepOptions
                 ) -> dict[str, tuple[QTensor, float]]:
    """GPTQ each linear with its H; linears with the same H and scheme (q/k/v, gate/up) in one stacked sweep:
    the same codes as one sweep each, one Cholesky and one column loop instead of several. Each H is handed
    to its sweep (hess forgets it: memory is one n x n matrix per sweep, freed when it is done)."""
    out = {}
    hess.drop_cache()  # the inputs are all observed
    for same_h in hess.shared(list(linears)):
        by_scheme: dict[tuple, tuple[Scheme, list[str]]] = {}
        for n in same_h:
            scheme = config.scheme_for(n)
            key = (scheme,) if scheme.granularity != "tensor" else (scheme, n)  # a tensor scale spans one weight
            by_scheme.setdefault(key, (scheme, []))[1].append(n)
        for scheme, names in by_scheme.values():
            for n in names[1:]:
                hess[n].forget()  # shared with names[0] (or an equal copy)
            H, alone = hess.take(names[0])  # handed to the sweep (factored in its memory when large and alone)
            qt, row_loss = gptq_rows([linears[n].weight for n in names], H, scheme, opts.blocksize, opts.percdamp,
                                     opts.act_order, opts.clip_grid, consume=alone,
                                     cols_kernel=gptq_cols_kernel() if H.device.type == "cpu"
                                     and linears[names[0]].weight.device.type == "cpu" else None)
            del H
            sizes = [linears[n].out_features for n in names]
            parts = _split_rows(qt, sizes) if len(names) > 1 else [qt]
            for n, part, loss in zip(names, parts, row_loss.split(sizes)):
                out[n] = (part, float(loss.sum()))
    return out


def _on_meta(w: torch.Tensor) -> nn.Parameter:
    """A weight's placeholder without memory (its shape and dtype kept)."""
    return nn.Parameter(torch.empty(w.shape, dtype=w.dtype, device="meta"), requires_grad=False)


def gptq_block(model: nn.Module, config: QuantConfig, selected: set[str], staged: bool = True):
    """process_block for the sequential pipeline: GPTQ every selected linear of the block.

    true_sequential (the default): q/k/v, then o, gate/up, down, each group's H gathered from inputs computed
    with the groups before it already quantized -- in one staged pass over the samples that also yields the
    block's outputs (calibration/sequential.run_block_staged), or, for a block whose calls depend on the data,
    in one statistics pass per group. Otherwise every H comes from the float block, in one pass."""
    opts: GptqOptions = config.options

    def quantize_group(names: list[str], linears, hess) -> dict[str, QuantLinear]:
        hess.reduce(names)  # data-parallel calibration: the statistics of every rank's samples (core/dist.py)
        results = gptq_linears({n: linears[n] for n in names}, hess, config, opts)
        out = {}
        for n in names:
            qt, loss = results[n]
            q = out[n] = QuantLinear.from_linear(linears[n], config.scheme_for(n), qt=qt)
            q.calib_loss = loss
            tqdm.write(f"lowbit: gptq {n}: loss {loss:.4g}, rel. weight error {q.rel_error:.4f}", file=sys.stderr)
        return out

    probed: dict = {}  # block class -> its groups, by relative name: blocks of one class share their forward

    def run_staged(block_name, block, linears, inputs, kw):
        if not linears:
            return None
        prefix = block_name + "."
        rel = tuple(sorted(n[len(prefix):] for n in linears))
        key = (type(block), rel)
        if key not in probed:  # (a block that then calls them otherwise raises Irregular: the slow path)
            g = probe_groups(block, linears, inputs[0], kw)
            probed[key] = [[n[len(prefix):] for n in grp] for grp in g] if g is not None else None
        if probed[key] is None:
            return None
        groups = [[prefix + r for r in grp] for grp in probed[key]]
        hess, quantized, floats = Hessians(linears), {}, {}
        # a lazily loaded model (models/lazy.py) keeps no float copies: a linear's float weight is dropped once
        # it is quantized (read again from the file if the block turns out irregular), and the dequantized
        # weights of a group once every batch has gone past it (at the next group). Else the floats stay.
        lazy = state_of(model).lazy
        used: list[str] = []  # the group before the current one: no batch calls it again
        like: dict[str, tuple[torch.dtype, torch.device]] = {}  # the float weights' dtype and device (compute)

        def on_group(names: list[str]) -> None:
            if lazy is not None:  # every batch waits at this group: the one before is behind them all
                for n in used:
                    linears[n].weight = _on_meta(linears[n].weight)
                used[:] = names
            for n, q in quantize_group(names, linears, hess).items():
                like[n] = (linears[n].weight.dtype, linears[n].weight.device)
                quantized[n], floats[n] = q, (None if lazy is not None else linears[n].weight)
                linears[n].weight = nn.Parameter(q.dequantize_weight(), requires_grad=False)  # what q computes

        try:
            outputs = run_block_staged(block, linears, groups, inputs, kw, hess.observe, on_group,
                                           observe_group=hess.observe_group)
        except Irregular:
            outputs = None
        finally:
            for n, w in floats.items():
                if w is not None:
                    linears[n].weight = w
        if outputs is None and lazy is not None and floats:  # the slow path needs the float weights again
            for n in floats:
                linears[n].weight = _on_meta(linears[n].weight)
            lazy.materialize(model, prefix)
            for n, (dt, dv) in ((n, like[n]) for n in floats):
                linears[n].weight = nn.Parameter(linears[n].weight.to(dv, dt), requires_grad=False)
        return (quantized, outputs) if outputs is not None else None

    def process(block_name: str, block: nn.Module, inputs, kw):
        linears = {n: m for n, m in block_linears(model, block_name, block) if n in selected}
        result = run_staged(block_name, block, linears, inputs, kw) if opts.true_sequential and staged else None
        if result is not None:
            quantized, outputs = result
            for n, q in quantized.items():
                set_module(model, n, q)
            return {n: q.scheme for n, q in quantized.items()}, outputs
        groups = sequential_groups(model, list(linears)) if opts.true_sequential else [list(linears)]
        done = {}
        for names in groups:
            hess = Hessians({n: linears[n] for n in names})
            observe_inputs(block, {n: linears[n] for n in names}, inputs, kw, hess.observe)
            for n, q in quantize_group(names, linears, hess).items():
                set_module(model, n, q)
                done[n] = q.scheme
        return done

    return process


def gptq(model: nn.Module, config: QuantConfig, ctx) -> dict[str, Scheme]:
    from ..models.arch import select_modules

    selected = set(select_modules(model, config.include, config.exclude, tuple(config.overrides)))
    return layer_sequential(model, ctx.calib_ids(), gptq_block(model, config, selected), desc="gptq",
                            forward_dtype=config.options.calib_dtype)


SPEC = register(MethodSpec(
    name="gptq", run=gptq, options=GptqOptions, help="error-compensating rounding from calibration Hessians",
    calibration=True, streams_blocks=True, streams_output=True,  # layer-sequential: one block at a time
))
