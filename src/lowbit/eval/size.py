"""Bits per weight and bytes of what was quantized."""
from __future__ import annotations

from torch import nn

from ..models.arch import select_modules
from ..nn.qlinear import QUANT_MODULES


def weight_stats(model: nn.Module) -> dict:
    """bpw and bytes of the quantized modules (codes + scales + zeros, and once each the tensors several
    modules share, such as W8A8's rotation factors).

    For a float model: the same figures for the layers lowbit would quantize by
    default (the decoder blocks' linears) at their stored dtype.
    """
    q = [m for m in model.modules() if isinstance(m, QUANT_MODULES)]
    if q:
        nbytes = sum(m.weight_nbytes() for m in q)
        shared = {t.untyped_storage().data_ptr(): t.numel() * t.element_size()
                  for m in q for t in getattr(m, "shared_tensors", tuple)()}
        nbytes += sum(shared.values())
        nweights = sum(m.n_weights() for m in q)
    else:
        mods = [model.get_submodule(n) for n in select_modules(model)]
        nbytes = sum(m.weight.numel() * m.weight.element_size() for m in mods)
        nweights = sum(m.weight.numel() for m in mods)
    seen, model_bytes = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            model_bytes += t.numel() * t.element_size()
    return {
        "bpw": round(8 * nbytes / nweights, 4) if nweights else None,
        "quantized_bytes": nbytes,
        "quantized_weights": nweights,
        "model_bytes": model_bytes,
    }
