"""Round-to-nearest (RTN) weight-only quantization: min/max scales, or with --clip-grid each group's range
searched (clipped) for the least rounding error (core/quant.search_qparams; HQQ's and GPTQ's reference
quantizer's lesson that min/max is not the best range at 2-3 bits), no data."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from tqdm.auto import tqdm

from ..core.config import Options, QuantConfig, option
from ..core.quant import quantize, search_qparams
from ..core.scheme import Scheme
from ..core.state import state_of
from ..errors import LowbitError
from ..models.arch import get_module, select_modules, set_module
from ..nn.qlinear import QuantEmbedding, QuantLinear
from .registry import MethodSpec, register


@dataclass(frozen=True)
class ClipOptions(Options):
    """The clip search of each group's range (rtn; gptq and awq+gptq weigh it by the Hessian diagonal)."""

    clip_grid: int = option(0, "Search each group's range: this many clip factors from 1 down to 0.5, keeping "
                               "the one of least rounding error (gptq, awq+gptq: weighted by the Hessian "
                               "diagonal); 0: min/max, the reference.")

    def check(self) -> None:
        if self.clip_grid < 0:
            raise LowbitError(f"--clip-grid must be >= 0, got {self.clip_grid}")


def quantize_module(mod: nn.Module, scheme: Scheme, clip_grid: int = 0) -> nn.Module:
    if isinstance(mod, nn.Linear):
        if clip_grid > 1:
            w = mod.weight.detach()
            s, z = search_qparams(w, scheme, clip_grid)
            return QuantLinear.from_linear(mod, scheme, qt=quantize(w, scheme, s, z))
        return QuantLinear.from_linear(mod, scheme)
    if isinstance(mod, nn.Embedding):
        return QuantEmbedding.from_embedding(mod, scheme)
    raise TypeError(f"cannot quantize {type(mod).__name__}")


def _float_module(model: nn.Module, name: str) -> nn.Module:
    """The module `name`, its float weights read from disk first when the model is loaded lazily (one
    layer in memory at a time: the quantized module replaces it and the float weights are freed)."""
    lazy = state_of(model).lazy
    if lazy is not None:
        lazy.materialize(model, prefix=name + ".")
    return get_module(model, name)


def replace_linears(model: nn.Module, config: QuantConfig, make, desc: str) -> dict[str, Scheme]:
    """Replace every selected Linear by make(linear, scheme), no data needed; returns {name: scheme}."""
    done: dict[str, Scheme] = {}
    for name in tqdm(select_modules(model, config.include, config.exclude, tuple(config.overrides)), desc=desc, unit="layer", leave=False):
        lin = _float_module(model, name)
        if not isinstance(lin, nn.Linear):
            raise LowbitError(f"{desc} quantizes Linear layers only: {name} is {type(lin).__name__}")
        scheme = config.scheme_for(name)
        set_module(model, name, make(lin, scheme))
        done[name] = scheme
    return done


def rtn(model: nn.Module, config: QuantConfig, ctx=None) -> dict[str, Scheme]:
    names = select_modules(model, config.include, config.exclude, tuple(config.overrides))
    clip_grid = getattr(config.options, "clip_grid", 0)
    sink = state_of(model).sink
    if sink is not None:
        return _rtn_streamed(model, config, names, sink, clip_grid)
    done: dict[str, Scheme] = {}
    for name in tqdm(names, desc="rtn", unit="layer", leave=False):
        scheme = config.scheme_for(name)
        set_module(model, name, quantize_module(_float_module(model, name), scheme, clip_grid))
        done[name] = scheme
    return done


def _rtn_streamed(model: nn.Module, config: QuantConfig, names: list[str], sink, clip_grid: int = 0
                  ) -> dict[str, Scheme]:
    """Block by block, each finished block handed to the sink (formats/stream.py: written, freed; a resumed
    run skips the blocks it has); the layers outside the blocks last."""
    import sys
    import time

    from ..models.arch import find_blocks

    t0 = time.time()
    start, done, _ = sink.resume_point()
    done = dict(done)
    blocks = find_blocks(model)
    in_block = set()
    for i, (bname, block) in enumerate(tqdm(blocks, desc="rtn", unit="block", leave=False)):
        mine = [n for n in names if n.startswith(bname + ".")]
        in_block.update(mine)
        if i < start:
            continue
        quantized = {}
        for name in mine:
            quantized[name] = config.scheme_for(name)
            set_module(model, name, quantize_module(_float_module(model, name), quantized[name], clip_grid))
        lazy = state_of(model).lazy
        if lazy is not None:  # the block's other float tensors (norms) are stored with it
            lazy.materialize(model, prefix=bname + ".")
        done.update(quantized)
        sink.finish_block(i, bname, block, quantized, None)
    print(f"lowbit: rtn: {len(blocks) - start} blocks in {time.time() - t0:.1f}s", file=sys.stderr)
    for name in names:
        if name not in in_block:
            done[name] = config.scheme_for(name)
            set_module(model, name, quantize_module(_float_module(model, name), done[name], clip_grid))
    return done


SPEC = register(MethodSpec(
    name="rtn", run=rtn, options=ClipOptions, help="round to nearest, min/max (or --clip-grid searched) scales, no data",
    streams_blocks=True, streams_output=True,  # one layer at a time
))
