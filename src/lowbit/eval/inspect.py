"""Per-layer report of a model: what each layer is stored as."""
from __future__ import annotations

from torch import nn

from ..models.arch import select_modules
from ..nn.qlinear import QUANT_MODULES
from .size import weight_stats


def layer_table(model: nn.Module) -> tuple[list[dict], dict]:
    rows = []
    q = [(n, m) for n, m in model.named_modules() if isinstance(m, QUANT_MODULES)]
    if q:
        for name, m in q:
            s = m.scheme
            rows.append({
                "name": name, "shape": "x".join(map(str, m._shape)), "bits": s.bits,
                "group": s.group_size if s.granularity == "group" else ("chan" if s.granularity == "channel" else "tens"),
                "sym": "yes" if s.symmetric else "no", "bytes": m.weight_nbytes(),
                "bpw": 8 * m.weight_nbytes() / m.n_weights(), "rel_error": m.rel_error,
            })
    else:
        for name in select_modules(model):
            w = model.get_submodule(name).weight
            nb = w.numel() * w.element_size()
            rows.append({"name": name, "shape": "x".join(map(str, w.shape)), "bits": 8 * w.element_size(),
                         "group": "-", "sym": "-", "bytes": nb, "bpw": 8.0 * w.element_size(), "rel_error": None})
    st = weight_stats(model)
    return rows, {"bytes": st["quantized_bytes"], "bpw": st["bpw"], "model_bytes": st["model_bytes"]}
