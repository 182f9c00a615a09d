"""AWQ+GPTQ: AWQ's activation-aware scales and clipping (awq.py), then GPTQ's error-compensating sweep
(gptq.py) instead of rounding to nearest, on every block's linears together after its scale search."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..core.config import QuantConfig
from ..core.scheme import Scheme
from .awq import AwqOptions, run_awq
from .gptq import GptqSweepOptions
from .registry import MethodSpec, register


@dataclass(frozen=True)
class AwqGptqOptions(AwqOptions, GptqSweepOptions):
    """AWQ's options (calibration included) and GPTQ's sweep settings (no true-sequential order: a block's
    linears are quantized together, after its scale search)."""


def awq_gptq(model: nn.Module, config: QuantConfig, ctx) -> dict[str, Scheme]:
    return run_awq(model, config, ctx, use_gptq=True)


SPEC = register(MethodSpec(
    name="awq+gptq", run=awq_gptq, options=AwqGptqOptions, help="AWQ's scales, then GPTQ instead of rounding",
    calibration=True, streams_blocks=True, streams_output=True,  # layer-sequential: one block at a time
))
