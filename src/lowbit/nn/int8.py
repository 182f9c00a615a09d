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

A W8A8Linear may hold its weight rotated (core/rotation.py): codes of W R for an orthogonal
R built from two small factors stored as buffers rot_a, rot_b, and rotates every input, x -> x R, before
quantizing it, so (x R)(W R)ᵀ = x Wᵀ while the per-token scale no longer has to cover the outlier channels.
`dequantize_weight()` returns the weight in the model's basis (W R Rᵀ); `stored_weight()` the rotated one.

Int8OutlierLinear (LLM.int8(), Dettmers et al. 2022) additionally sends every
input column in which some |x| >= threshold through a float matmul with the
matching (dequantized int8) weight columns; the other columns go through the
integer path with per-token scales computed without the outliers.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..core import rotation
from ..core.quant import QTensor, pair_sums, quantize, round_scale_up
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


def pair_bounded_qtensor(w: torch.Tensor, scheme: Scheme) -> QTensor:
    """8-bit symmetric codes whose neighbouring pairs satisfy |Q[n, 2j]| + |Q[n, 2j+1]| <= 128.

    The scale of a row (or of the tensor) is s = max_j (|w_2j| + |w_2j+1|) / 127 instead of the textbook
    2 max|w| / 255 — at most twice as coarse, and as coarse only where two neighbours are both at the
    maximum. Rounding adds at most 1/2 per code, so a pair's codes sum to at most 127 + 1 = 128. Why: the
    u8 x s8 instruction of AVX2 (vpmaddubsw) adds u_2j Q_2j + u_2j+1 Q_2j+1 in saturating int16; with
    |Q_2j| + |Q_2j+1| <= 128 that is at most 255 * 128 = 32640 < 2^15 for any 8-bit u: exact."""
    if scheme.bits != 8 or not scheme.symmetric or scheme.granularity not in ("channel", "tensor"):
        raise LowbitError(f"pair-bounded weights are 8-bit symmetric per channel or tensor, got {scheme.describe()}")
    w2 = w.float().reshape(w.shape[0], -1)
    ps = pair_sums(w2)
    top = ps.amax(dim=1, keepdim=True) if scheme.granularity == "channel" else ps.amax().reshape(1, 1)
    sdt = scheme.torch_scale_dtype
    scale = round_scale_up((top / 127).clamp_min(torch.finfo(sdt).tiny), sdt)
    scale = torch.where(top > 0, scale, torch.ones_like(scale))
    qt = quantize(w2, scheme, scale=scale, zero=None)
    if int(pair_sums(qt.codes).max()) > 128:  # cannot happen (see above); never store a weight that breaks it
        raise LowbitError("pair-bounded weight codes exceed 128 per pair")
    return qt


class W8A8Linear(QuantLinear):
    """int8 weight x int8 activation linear. `input_scale` (float32 [1]) is used only when act.static;
    rot_a/rot_b only when `rotated` (then static scales are refused: they would be calibrated on
    unrotated inputs)."""

    kind = "w8a8"

    def __init__(self, in_features: int, out_features: int, scheme: Scheme = W8_CHANNEL, act: ActQuant = ActQuant(),
                 bias: bool = False, device=None, dtype=torch.float32, rotated: bool = False) -> None:
        if scheme.bits != 8 or not scheme.symmetric or scheme.granularity == "group":
            raise LowbitError(f"W8A8 needs 8-bit symmetric per-channel or per-tensor weights, got {scheme.describe()}")
        if rotated and act.static:
            raise LowbitError("rotated W8A8 needs activation scales computed at run time (--act dynamic or tensor)")
        super().__init__(in_features, out_features, scheme, bias=bias, device=device, dtype=dtype)
        self.act = act
        self.register_buffer("input_scale", torch.ones(1, dtype=torch.float32, device=device))
        self.rotated = bool(rotated)
        self.share: tuple[str, int, int] | None = None  # (group, position, size): see kernels/int8.quantized_input
        if self.rotated:
            a, b = rotation.split(in_features)
            self.register_buffer("rot_a", torch.eye(a, device=device))
            self.register_buffer("rot_b", torch.eye(b, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: Scheme = W8_CHANNEL, qt=None, act: ActQuant = ActQuant(),
                    input_amax: float | None = None, rotate: bool = False, pair_bound: bool = False,
                    **kw) -> "W8A8Linear":
        """rotate: hold W R and turn inputs by R (see the module docstring). pair_bound: choose each weight
        scale so that any two neighbouring codes (columns 2j, 2j+1) sum to at most 128 in magnitude
        (`pair_bounded_qtensor`), which lets CPUs without VNNI run 8-bit activations in one exact GEMM."""
        if rotate:
            kw["rotated"] = True  # (LLM.int8() modules take no rotation: their outlier columns are the model's)
        m = cls(linear.in_features, linear.out_features, scheme, act=act, bias=linear.bias is not None,
                device=linear.weight.device, dtype=linear.weight.dtype, **kw)
        if rotate:
            if qt is not None:
                raise LowbitError("a rotated W8A8 linear quantizes its own (rotated) weight")
            rot = rotation.make_rotation(linear.in_features)
            m.rot_a, m.rot_b = rot  # shared by every linear of this width (saved once, see checkpoint)
            turned = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                               device="meta")
            turned.weight = nn.Parameter(rotation.rotate(linear.weight.detach(), *rot).to(linear.weight.dtype),
                                         requires_grad=False)
            turned.bias = linear.bias
            linear = turned
        if pair_bound:
            if qt is not None:
                raise LowbitError("pair-bounded weights choose their own scales")
            qt = pair_bounded_qtensor(linear.weight.detach(), scheme)
        base = QuantLinear.from_linear(linear, scheme, qt)  # rel_error: R is orthogonal, so the same either way
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

    def rotate_input(self, x2: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> x R (float32) where the weight is rotated; x itself otherwise."""
        return rotation.rotate(x2, self.rot_a, self.rot_b) if self.rotated else x2

    def stored_weight(self) -> torch.Tensor:
        """float32 [out, in]: the dequantized codes as stored (W R where rotated)."""
        return super().dequantize_weight()

    def dequantize_weight(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """float32 weight in the model's basis (the rotation undone)."""
        w = super().dequantize_weight(rows)
        return rotation.unrotate(w, self.rot_a, self.rot_b) if self.rotated else w

    def shared_tensors(self) -> tuple[torch.Tensor, ...]:
        """Stored tensors this module shares with others (the rotation factors of its width): counted once
        per model by eval/size.weight_stats, not in weight_nbytes."""
        return (self.rot_a, self.rot_b) if self.rotated else ()

    def weight_codes_int8(self) -> torch.Tensor:
        """int8 [out, in] weight codes Q (cached)."""
        w = self.kstate.codes
        if w is None:
            w = self.kstate.codes = self.codes().to(torch.int8)
        return w

    def weight_scale(self) -> torch.Tensor:
        """float32 [out] per-output-channel scale (expanded for a per-tensor weight)."""
        s = self.kstate.scale
        if s is None:
            s = self.kstate.scale = self.scales.float().reshape(-1).expand(self.out_features).contiguous()
        return s

    def entry(self) -> dict:
        """What a checkpoint records to rebuild this module."""
        return {"act": self.act.to_dict(), **({"rotated": True} if self.rotated else {}),
                **({"share": list(self.share)} if self.share else {})}

    @classmethod
    def from_entry(cls, entry: dict, old: nn.Linear, scheme: Scheme, device="meta") -> "W8A8Linear":
        m = cls(old.in_features, old.out_features, scheme, act=ActQuant.from_dict(entry["act"]),
                bias=old.bias is not None, device=device, rotated=bool(entry.get("rotated", False)))
        if entry.get("share"):
            group, pos, size = entry["share"]
            m.share = (str(group), int(pos), int(size))
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..kernels.int8 import w8a8_forward

        return w8a8_forward(self, x)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", {self.act.describe()}" + (", rotated" if self.rotated else "")


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

