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
from tqdm.auto import tqdm

from ..core.config import QuantConfig
from ..core.registry import register_method
from ..core.scheme import Scheme
from ..errors import LowbitError
from ..models.arch import get_module, select_modules, set_module
from ..nn.int8 import ActQuant, Int8OutlierLinear


@register_method("llm-int8")
def llm_int8(model: nn.Module, config: QuantConfig, ctx=None) -> dict[str, Scheme]:
    o = config.options
    act = ActQuant(granularity="token", static=False, bits=int(o.get("act_bits", 8)))
    threshold = float(o.get("threshold", 6.0))
    done: dict[str, Scheme] = {}
    for name in tqdm(select_modules(model, config.include, config.exclude), desc="llm-int8", unit="layer", leave=False):
        lin = get_module(model, name)
        if not isinstance(lin, nn.Linear):
            raise LowbitError(f"llm-int8 quantizes Linear layers only: {name} is {type(lin).__name__}")
        scheme = config.scheme_for(name)
        set_module(model, name, Int8OutlierLinear.from_linear(lin, scheme, act=act, threshold=threshold))
        done[name] = scheme
    return done
