"""Quantized modules that hold packed codes, not float weights.

Buffers of a QuantLinear (out = out_features, in = in_features, G = groups per row):
    qweight  uint8 [out, ceil(in/8)*bits]   packed unsigned codes u = Q - qmin (core.packing)
    scales   [R, G] scheme.scale_dtype      R = 1 for per-tensor, else out
    qzeros   uint8 [ceil(R*G/8)*bits]       packed zero points (asymmetric only): the [R, G] table row-major as
                                            one packed row (core.packing.pack_zero_points); checkpoints written
                                            before it stored [R, ceil(G/8)*bits] (`legacy_zero_layout`)
The weight is x̂ = s * (u - z_u) with z_u = z (asymmetric) or -qmin (symmetric),
which equals the textbook s * (Q - z).

Every kind of quantized module names itself (`kind`: the layer kind a checkpoint records) and says what
else a checkpoint needs to rebuild it (`entry()`, read back by `from_entry`); nn/kinds.py is the table.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..core.packing import (pack, pack_zero_points, packed_row_bytes, unpack, unpack_zero_point_rows,
                            unpack_zero_points, zero_points_nbytes)
from ..core.quant import QTensor, grouped, quantize, ungrouped
from ..core.scheme import Scheme
from ..kernels.state import KernelState


class _PackedWeight(nn.Module):
    """Shared storage and dequantization for QuantLinear and QuantEmbedding."""

    def _init_buffers(self, rows: int, cols: int, scheme: Scheme, device=None) -> None:
        self.scheme = scheme
        self.kstate = KernelState()  # the kernels' choices and copies of the weight: built on first use
        self.rel_error: float | None = None  # ||W - Ŵ|| / ||W||, set when quantized from floats
        n_groups = 1 if scheme.granularity == "tensor" else scheme.n_groups(cols)
        r = 1 if scheme.granularity == "tensor" else rows
        self.register_buffer("qweight", torch.zeros(rows, packed_row_bytes(cols, scheme.bits), dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(r, n_groups, dtype=scheme.torch_scale_dtype, device=device))
        if scheme.symmetric:
            self.qzeros = None
        else:
            self.register_buffer("qzeros", torch.zeros(zero_points_nbytes(r, n_groups, scheme.bits), dtype=torch.uint8, device=device))

    def legacy_zero_layout(self) -> None:
        """Make qzeros the shape older checkpoints stored ([R, ceil(G/8)*bits], one packed row per row) so one
        loads into it; `from_legacy_zero_layout` repacks it after loading."""
        if self.qzeros is not None:
            r, g = self.scales.shape
            self.qzeros = torch.zeros(r, packed_row_bytes(g, self.scheme.bits), dtype=torch.uint8,
                                      device=self.qzeros.device)

    def from_legacy_zero_layout(self) -> None:
        if self.qzeros is not None and self.qzeros.dim() == 2:
            r, g = self.scales.shape
            self.qzeros = pack_zero_points(unpack(self.qzeros, self.scheme.bits, g), self.scheme.bits)
            self.kstate = KernelState()

    @property
    def _shape(self) -> tuple[int, int]:
        raise NotImplementedError

    def _set_qtensor(self, qt: QTensor) -> None:
        s = self.scheme
        self.qweight.copy_(pack((qt.codes.to(torch.int32) - s.qmin), s.bits))
        self.scales.copy_(qt.scale)
        if not s.symmetric:
            self.qzeros.copy_(pack_zero_points(qt.zero.to(torch.int32), s.bits))
        self.kstate = KernelState()

    def _apply(self, fn, *args, **kwargs):  # .to()/.float() etc. invalidate the kernel copies
        self.kstate = KernelState()
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self.kstate = KernelState()
        return super()._load_from_state_dict(*args, **kwargs)

    def codes(self) -> torch.Tensor:
        """Textbook codes Q (int32 [rows, cols])."""
        rows, cols = self._shape
        return unpack(self.qweight, self.scheme.bits, cols).to(torch.int32) + self.scheme.qmin

    def zero_points(self) -> torch.Tensor | None:
        if self.scheme.symmetric:
            return None
        return unpack_zero_points(self.qzeros, self.scheme.bits, *self.scales.shape).to(torch.int32)

    def dequantize_weight(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """float32 [rows, cols] weight (or only the given row indices). One float32 buffer, scaled in place
        group by group (the reference path runs this per call: no padded or broadcast copies)."""
        s = self.scheme
        nrows, cols = self._shape
        packed, scales = self.qweight, self.scales
        zeros = None
        if rows is not None and s.granularity != "tensor":
            if not s.symmetric:  # only the bytes of those rows' zero points (embedding lookups)
                zeros = unpack_zero_point_rows(self.qzeros, s.bits, scales.shape[1], rows)
            packed, scales = packed[rows], scales[rows]
        else:
            if not s.symmetric:
                zeros = unpack_zero_points(self.qzeros, s.bits, *scales.shape)
            if rows is not None:
                packed = packed[rows]
        w = unpack(packed, s.bits, cols).to(torch.float32)  # codes u, [r, cols]
        sc = scales.float()  # [R, G]
        z = zeros.float() if zeros is not None else None
        if s.granularity == "tensor":
            w.sub_(z) if z is not None else w.add_(s.qmin)
            return w.mul_(sc)
        g = s.group_len(cols)
        full = cols // g  # whole groups; a shorter last group after them
        for a, b, k in ((0, full * g, slice(0, full)), (full * g, cols, slice(full, full + 1))):
            if a == b:
                continue
            part = w[:, a:b].unflatten(1, (-1, b - a if k.start == full else g))  # [r, groups, g] view of w
            part.sub_(z[:, k].unsqueeze(-1)) if z is not None else part.add_(s.qmin)
            part.mul_(sc[:, k].unsqueeze(-1))
        return w

    def weight_nbytes(self) -> int:
        n = self.qweight.numel() + self.scales.numel() * self.scales.element_size()
        if self.qzeros is not None:
            n += self.qzeros.numel()
        return n

    def n_weights(self) -> int:
        rows, cols = self._shape
        return rows * cols


class QuantLinear(_PackedWeight):
    kind = "linear"

    def __init__(self, in_features: int, out_features: int, scheme: Scheme, bias: bool = False,
                 device=None, dtype=torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_buffers(out_features, in_features, scheme, device=device)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False) if bias else None

    @property
    def _shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: Scheme, qt: QTensor | None = None) -> "QuantLinear":
        w = linear.weight.detach()
        if qt is None:
            qt = quantize(w, scheme)
        m = cls(linear.in_features, linear.out_features, scheme, bias=linear.bias is not None,
                device=w.device, dtype=w.dtype)
        m._set_qtensor(qt)
        if linear.bias is not None:
            m.bias.data.copy_(linear.bias.detach())
        wf = w.float()
        m.rel_error = float((m.dequantize_weight() - wf).norm() / wf.norm().clamp_min(1e-12))
        return m

    def entry(self) -> dict:
        """What a checkpoint records to rebuild this module, besides its kind and scheme."""
        return {}

    @classmethod
    def from_entry(cls, entry: dict, old: nn.Linear, scheme: Scheme, device="meta") -> "QuantLinear":
        """An empty module (meta tensors) in place of the float `old`, for a checkpoint's tensors."""
        return cls(old.in_features, old.out_features, scheme, bias=old.bias is not None, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..kernels import qlinear_forward

        return qlinear_forward(self, x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.scheme.describe()}, bias={self.bias is not None}"


class QuantEmbedding(_PackedWeight):
    """Embedding table stored packed (one row per token); only looked-up rows are dequantized."""

    kind = "embedding"

    def __init__(self, num_embeddings: int, embedding_dim: int, scheme: Scheme, padding_idx: int | None = None,
                 device=None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self._init_buffers(num_embeddings, embedding_dim, scheme, device=device)

    @property
    def _shape(self) -> tuple[int, int]:
        return self.num_embeddings, self.embedding_dim

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, scheme: Scheme) -> "QuantEmbedding":
        w = emb.weight.detach()
        m = cls(emb.num_embeddings, emb.embedding_dim, scheme, padding_idx=emb.padding_idx, device=w.device)
        m._set_qtensor(quantize(w, scheme))
        wf = w.float()
        m.rel_error = float((m.dequantize_weight() - wf).norm() / wf.norm().clamp_min(1e-12))
        return m

    def entry(self) -> dict:
        return {}

    @classmethod
    def from_entry(cls, entry: dict, old: nn.Embedding, scheme: Scheme, device="meta") -> "QuantEmbedding":
        return cls(old.num_embeddings, old.embedding_dim, scheme, padding_idx=old.padding_idx, device=device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        uniq, inverse = torch.unique(flat, return_inverse=True)
        rows = self.dequantize_weight(uniq)
        return rows[inverse].reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.scheme.describe()}"


QUANT_MODULES = (QuantLinear, QuantEmbedding)


@contextlib.contextmanager
def dequantized_weights(root: nn.Module):
    """Within the block, every QuantLinear under `root` computes with its weight dequantized once (the
    reference path otherwise dequantizes on every call): for passes that run many batches through one block,
    such as the calibration pipeline's. The same float32 weights, so the same outputs."""
    mods = [m for m in root.modules() if isinstance(m, QuantLinear)]
    try:
        for m in mods:
            m._dequantized = m.dequantize_weight()
        yield root
    finally:
        for m in mods:
            m.__dict__.pop("_dequantized", None)
