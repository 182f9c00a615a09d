"""Reference path: dequantize the packed weight (float32), then F.linear."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def qlinear_forward(module, x: torch.Tensor) -> torch.Tensor:
    w = getattr(module, "_dequantized", None)  # set by nn.qlinear.dequantized_weights() for repeated calls
    w = (module.dequantize_weight() if w is None else w).to(x.dtype)
    bias = module.bias.to(x.dtype) if module.bias is not None else None
    return F.linear(x, w, bias)
