"""Reference path: dequantize the packed weight (float32), then F.linear."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def qlinear_forward(module, x: torch.Tensor) -> torch.Tensor:
    w = module.dequantize_weight().to(x.dtype)
    bias = module.bias.to(x.dtype) if module.bias is not None else None
    return F.linear(x, w, bias)
