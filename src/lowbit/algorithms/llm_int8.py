"""LLM.int8() (Dettmers et al. 2022): vector-wise int8 with mixed-precision outlier decomposition.

Weights: int8, one scale per output channel (the paper's "column-wise" scales of
W [in, out]); memory is half of FP16. At run time, every input column holding
some |x| >= threshold (6.0 by default) is multiplied in float with the matching
dequantized weight columns; the remaining columns are quantized per token
(row-wise) and multiplied in int8. The module counts the outlier columns it saw
(nn/int8.py: Int8OutlierLinear). No calibration data is needed.

The per-token grid is the paper's "zeropoint" one by default (a scale and a zero
point per row of X: Table 1's "Zeropoint LLM.int8() (vector-wise + decomp)", its
most accurate variant); act_symmetric=True (CLI --act-sym) gives "absmax
LLM.int8()", the variant bitsandbytes implements. On the CPU kernels here the
zero point is one more term of the same int8 GEMM (kernels/int8.py), not a
second matmul, so it costs about nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..core.config import QuantConfig, option, option_like
from ..core.scheme import Scheme
from ..errors import LowbitError
from ..nn.int8 import Int8OutlierLinear
from .registry import INT8_WEIGHTS, MethodSpec, register
from .rtn import replace_linears
from .w8a8 import ActOptions, act_quant


@dataclass(frozen=True)
class LlmInt8Options(ActOptions):
    # per token, at run time; act_bits and act_symmetric as in w8a8, but zeropoint (asymmetric) by default
    act_symmetric: bool = option_like(ActOptions, "act_symmetric", False)
    threshold: float = option(6.0, "|x| at which an input column is an outlier (multiplied in float).")

    def check(self) -> None:
        if not self.threshold > 0:
            raise LowbitError(f"--threshold must be > 0, got {self.threshold}")


def llm_int8(model: nn.Module, config: QuantConfig, ctx=None) -> dict[str, Scheme]:
    o: LlmInt8Options = config.options
    act = act_quant("dynamic", o.act_bits, o.act_symmetric)
    return replace_linears(model, config, lambda lin, scheme: Int8OutlierLinear.from_linear(
        lin, scheme, act=act, threshold=o.threshold), desc="llm-int8")


SPEC = register(MethodSpec(
    name="llm-int8", run=llm_int8, options=LlmInt8Options,
    help="int8 weights and activations, outlier input columns in float",
    default_scheme=Scheme(bits=8, symmetric=True, granularity="channel", group_size=None), schemes=INT8_WEIGHTS,
    streams_blocks=True,  # one layer at a time
))
