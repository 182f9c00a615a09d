"""The kinds of quantized modules, by the name a checkpoint's layer table records for each.

    "linear"     QuantLinear        packed codes, computed by kernels/ (nn/qlinear.py)
    "embedding"  QuantEmbedding     packed rows, looked up (nn/qlinear.py)
    "w8a8"       W8A8Linear         int8 weights x int8 activations (nn/int8.py)
    "llm-int8"   Int8OutlierLinear  LLM.int8(): W8A8 plus float outlier columns (nn/int8.py)

Every class has `kind`, `entry()` (what else rebuilds it) and `from_entry(entry, old, scheme)` (an empty
module in place of the float one); formats/checkpoint.py saves and loads through this table only.
"""
from __future__ import annotations

from .int8 import Int8OutlierLinear, W8A8Linear
from .qlinear import QuantEmbedding, QuantLinear

MODULE_KINDS = {cls.kind: cls for cls in (QuantLinear, QuantEmbedding, W8A8Linear, Int8OutlierLinear)}
