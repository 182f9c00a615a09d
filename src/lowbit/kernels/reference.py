"""Reference path: dequantize the packed weight (float32), then F.linear; and the base of the kernel kinds."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def qlinear_forward(module, x: torch.Tensor) -> torch.Tensor:
    w = getattr(module, "_dequantized", None)  # set by nn.qlinear.dequantized_weights() for repeated calls
    w = (module.dequantize_weight() if w is None else w).to(x.dtype)
    bias = module.bias.to(x.dtype) if module.bias is not None else None
    return F.linear(x, w, bias)


class Kernel:
    """A compute path of QuantLinear, chosen once per module (kernels.choose_kernel, kept in module.kstate),
    then called: forward(module, x) -> [..., N]. This base is the reference path; a fast kind (int4.py,
    w8.py) runs x with at most `max_rows` rows through its own packed copy of the weight
    (module.kstate.packed, built on first use) and larger inputs through the reference. Kinds compare equal
    when they would pack alike, so modules of one kind can be packed together (runtime/decoder.py)."""

    name = "reference"

    def forward(self, module, x: torch.Tensor) -> torch.Tensor:
        return qlinear_forward(module, x)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


REFERENCE = Kernel()
