"""Linears whose matmul runs in integers: W8A8 and LLM.int8().

Both hold an 8-bit symmetric weight (per output channel, or per tensor for the
naive variant) in QuantLinear's buffers, and quantize their *input* at run time:

    x [M, K] --ActQuant--> codes Qx [M, K] in [-2^(b-1), 2^(b-1)-1], scale sx [M, 1] (or [1, 1])
    acc = Qx @ Qw^T                 int32 [M, N]  (exact integer accumulation)
    y   = acc * sw[None, :] * sx + bias

The activation grid is the textbook symmetric one, s = 2 max|x| / (2^b - 1), unless
ActQuant.symmetric is False: then a zero point per row (asymmetric). ActQuant() is symmetric; the
methods pick their own default (w8a8: symmetric; llm-int8: zeropoint, algorithms/llm_int8.py).
`bits` is 8 by default; 7 is the "reduced range" that lets the u8 x s8 dot
product of AVX2 CPUs without VNNI run exactly (see kernels/int8.py).

Int8OutlierLinear (LLM.int8(), Dettmers et al. 2022) additionally sends every
input column in which some |x| >= threshold through a float matmul with the
matching (dequantized int8) weight columns; the other columns go through the
integer path with per-token scales computed without the outliers.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..core.scheme import Scheme
from ..errors import LowbitError
from .qlinear import QuantLinear

W8_CHANNEL = Scheme(bits=8, symmetric=True, granularity="channel", group_size=None)
W8_TENSOR = Scheme(bits=8, symmetric=True, granularity="tensor", group_size=None)


@dataclass(frozen=True)
class ActQuant:
    """How a linear's input is quantized at run time.

    granularity  "token": one scale per row of x (dynamic only); "tensor": one for all of x
    static       True: the per-tensor scale was fixed from calibration (stored as input_scale)
    bits         8, or 7 (reduced range)
    symmetric    True: codes in [-2^(b-1), 2^(b-1)-1], s = 2 max|x| / (2^b - 1), no zero point.
                 False (dynamic only): the textbook asymmetric grid on [min(x, 0), max(x, 0)] of each row
                 (or of x): s = (b - a) / (2^b - 1), z = -round(a / s), codes in [0, 2^b - 1] -- twice
                 the resolution where a row's values are one-signed around a large outlier.
    """

    granularity: str = "token"
    static: bool = False
    bits: int = 8
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.granularity not in ("token", "tensor"):
            raise LowbitError(f"activation granularity must be token or tensor, got {self.granularity!r}")
        if self.static and self.granularity != "tensor":
            raise LowbitError("static activation scales are per tensor")
        if self.bits not in (7, 8):
            raise LowbitError(f"activation bits must be 7 or 8, got {self.bits!r}")
        if self.static and not self.symmetric:
            raise LowbitError("asymmetric activations are dynamic only (static scales are symmetric)")

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.symmetric else (1 << self.bits) - 1

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.symmetric else 0

    def describe(self) -> str:
        kind = "static per-tensor" if self.static else f"dynamic per-{self.granularity}"
        return f"A{self.bits} {kind}" + ("" if self.symmetric else " asymmetric")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ActQuant":
        return cls(**d)


class W8A8Linear(QuantLinear):
    """int8 weight x int8 activation linear. `input_scale` (float32 [1]) is used only when act.static."""

    kind = "w8a8"

    def __init__(self, in_features: int, out_features: int, scheme: Scheme = W8_CHANNEL, act: ActQuant = ActQuant(),
                 bias: bool = False, device=None, dtype=torch.float32) -> None:
        if scheme.bits != 8 or not scheme.symmetric or scheme.granularity == "group":
            raise LowbitError(f"W8A8 needs 8-bit symmetric per-channel or per-tensor weights, got {scheme.describe()}")
        super().__init__(in_features, out_features, scheme, bias=bias, device=device, dtype=dtype)
        self.act = act
        self.register_buffer("input_scale", torch.ones(1, dtype=torch.float32, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: Scheme = W8_CHANNEL, qt=None, act: ActQuant = ActQuant(),
                    input_amax: float | None = None, **kw) -> "W8A8Linear":
        base = QuantLinear.from_linear(linear, scheme, qt)
        m = cls(linear.in_features, linear.out_features, scheme, act=act, bias=linear.bias is not None,
                device=linear.weight.device, dtype=linear.weight.dtype, **kw)
        m.load_state_dict(base.state_dict(), strict=False)
        m.rel_error = base.rel_error
        if act.static:
            if input_amax is None:
                raise LowbitError("static activation quantization needs the calibrated max |x|")
            m.set_input_amax(input_amax)
        return m

    def set_input_amax(self, amax: float) -> None:
        """Static scale from a calibrated max |x| (textbook symmetric grid)."""
        amax = float(amax)
        self.input_scale.fill_(2 * amax / ((1 << self.act.bits) - 1) if amax > 0 else 1.0)

    def weight_codes_int8(self) -> torch.Tensor:
        """int8 [out, in] weight codes Q (cached)."""
        w = self._kcache.get("qw")
        if w is None:
            w = self._kcache["qw"] = self.codes().to(torch.int8)
        return w

    def weight_scale(self) -> torch.Tensor:
        """float32 [out] per-output-channel scale (expanded for a per-tensor weight)."""
        s = self._kcache.get("sw")
        if s is None:
            s = self._kcache["sw"] = self.scales.float().reshape(-1).expand(self.out_features).contiguous()
        return s

    def entry(self) -> dict:
        """What a checkpoint records to rebuild this module."""
        return {"act": self.act.to_dict()}

    @classmethod
    def from_entry(cls, entry: dict, old: nn.Linear, scheme: Scheme, device="meta") -> "W8A8Linear":
        return cls(old.in_features, old.out_features, scheme, act=ActQuant.from_dict(entry["act"]),
                   bias=old.bias is not None, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..kernels.int8 import w8a8_forward

        return w8a8_forward(self, x)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", {self.act.describe()}"


class Int8OutlierLinear(W8A8Linear):
    """LLM.int8(): per-token int8 for regular input columns, float for outlier columns (|x| >= threshold).

    Observable: `calls`, `outlier_columns` (summed over calls), `last_outlier_columns` (indices of the last call).
    """

    kind = "llm-int8"

    def __init__(self, in_features: int, out_features: int, scheme: Scheme = W8_CHANNEL, act: ActQuant = ActQuant(),
                 bias: bool = False, device=None, dtype=torch.float32, threshold: float = 6.0) -> None:
        if act.static or act.granularity != "token":
            raise LowbitError("LLM.int8() quantizes activations dynamically per token")
        if not threshold > 0:
            raise LowbitError(f"outlier threshold must be > 0, got {threshold}")
        super().__init__(in_features, out_features, scheme, act=act, bias=bias, device=device, dtype=dtype)
        self.threshold = float(threshold)
        self.reset_outlier_stats()

    def reset_outlier_stats(self) -> None:
        self.calls = 0
        self.outlier_columns = 0
        self.last_outlier_columns = torch.empty(0, dtype=torch.long)

    def entry(self) -> dict:
        return {**super().entry(), "threshold": self.threshold}

    @classmethod
    def from_entry(cls, entry: dict, old: nn.Linear, scheme: Scheme, device="meta") -> "Int8OutlierLinear":
        return cls(old.in_features, old.out_features, scheme, act=ActQuant.from_dict(entry["act"]),
                   bias=old.bias is not None, device=device, threshold=entry["threshold"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..kernels.int8 import llm_int8_forward

        return llm_int8_forward(self, x)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", threshold={self.threshold}"


INT8_MODULES = {cls.kind: cls for cls in (W8A8Linear, Int8OutlierLinear)}
