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

from torch import nn

from ..core.config import QuantConfig
from ..core.scheme import Scheme
from ..nn.int8 import Int8OutlierLinear
from .registry import register_method
from .rtn import replace_linears
from .smoothquant import act_from_options


@register_method("llm-int8")
def llm_int8(model: nn.Module, config: QuantConfig, ctx=None) -> dict[str, Scheme]:
    o = config.options
    # per token, at run time; act_bits and act_symmetric as in w8a8, but zeropoint (asymmetric) by default
    act = act_from_options({"act_symmetric": False, **o, "act": "dynamic"})
    threshold = float(o.get("threshold", 6.0))
    return replace_linears(model, config, lambda lin, scheme: Int8OutlierLinear.from_linear(
        lin, scheme, act=act, threshold=threshold), desc="llm-int8")
