"""LLM.int8() (Dettmers et al. 2022): vector-wise int8 with mixed-precision outlier decomposition.

Weights: int8, one scale per output channel (the paper's "column-wise" scales of
W [in, out]); memory is half of FP16. At run time, every input column holding
some |x| >= threshold (6.0 by default) is multiplied in float with the matching
dequantized weight columns; the remaining columns are quantized per token
(row-wise) and multiplied in int8. The module counts the outlier columns it saw
(nn/int8.py: Int8OutlierLinear). No calibration data is needed.
"""
from __future__ import annotations

from torch import nn

from ..core.config import QuantConfig
from ..core.registry import register_method
from ..core.scheme import Scheme
from ..nn.int8 import Int8OutlierLinear
from .rtn import replace_linears
from .smoothquant import act_from_options


@register_method("llm-int8")
def llm_int8(model: nn.Module, config: QuantConfig, ctx=None) -> dict[str, Scheme]:
    o = config.options
    act = act_from_options({**o, "act": "dynamic"})  # per token, at run time (act_bits, act_symmetric as w8a8)
    threshold = float(o.get("threshold", 6.0))
    return replace_linears(model, config, lambda lin, scheme: Int8OutlierLinear.from_linear(
        lin, scheme, act=act, threshold=threshold), desc="llm-int8")
