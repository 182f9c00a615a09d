"""Quantization schemes: what grid a tensor is mapped onto.

A `Scheme` is frozen and validated at construction. Granularity is one of
  - "tensor":  one (scale, zero) for the whole tensor,
  - "channel": one per output row (a weight of shape [out, in] has `out` of them),
  - "group":   one per run of `group_size` consecutive input columns of a row;
               the last group of a row may be shorter (in % group_size != 0).

The CLI convention follows GPTQ: group size -1 means per-channel.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch

from ..errors import LowbitError

Granularity = Literal["tensor", "channel", "group"]

_SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class Scheme:
    bits: int = 4
    symmetric: bool = True
    granularity: Granularity = "group"
    group_size: int | None = 128
    scale_dtype: str = "float16"  # dtype the scales are stored in (and rounded up to)

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise LowbitError(f"bits must be an integer in 2..8, got {self.bits!r}")
        if self.granularity not in ("tensor", "channel", "group"):
            raise LowbitError(f"granularity must be tensor, channel or group, got {self.granularity!r}")
        if self.granularity == "group":
            if not isinstance(self.group_size, int) or self.group_size < 1:
                raise LowbitError(f"group size must be a positive integer, got {self.group_size!r}")
        elif self.group_size is not None:
            object.__setattr__(self, "group_size", None)
        if self.scale_dtype not in _SCALE_DTYPES:
            raise LowbitError(f"scale dtype must be one of {sorted(_SCALE_DTYPES)}, got {self.scale_dtype!r}")

    # -- integer range of the codes, exactly as the textbook has it --------------
    @property
    def qmin(self) -> int:
        """Smallest code: 0 (asymmetric) or -2^(k-1) (symmetric, z = 0)."""
        return -(1 << (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        """Largest code: 2^k - 1 (asymmetric) or 2^(k-1) - 1 (symmetric)."""
        return (1 << (self.bits - 1)) - 1 if self.symmetric else (1 << self.bits) - 1

    @property
    def levels(self) -> int:
        return 1 << self.bits

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return _SCALE_DTYPES[self.scale_dtype]

    def group_len(self, in_features: int) -> int:
        """Columns per (scale, zero) along the input dimension."""
        if self.granularity == "group":
            return min(self.group_size, in_features)  # type: ignore[type-var]
        return in_features

    def n_groups(self, in_features: int) -> int:
        g = self.group_len(in_features)
        return -(-in_features // g)

    # -- constructors and serialization ----------------------------------------
    @classmethod
    def from_cli(cls, bits: int, group_size: int, symmetric: bool = True) -> "Scheme":
        """GPTQ convention: group_size -1 = per-channel; 0 and < -1 are errors."""
        if group_size == -1:
            return cls(bits=bits, symmetric=symmetric, granularity="channel", group_size=None)
        if group_size == 0 or group_size < -1:
            raise LowbitError(f"group size must be -1 (per-channel) or a positive integer, got {group_size}")
        return cls(bits=bits, symmetric=symmetric, granularity="group", group_size=group_size)

    @classmethod
    def parse(cls, spec: str) -> "Scheme":
        """'BITS[/GROUP][/sym|asym]' as on the command line: '8/-1' (per channel, symmetric), '4/32/asym'."""
        parts = spec.strip().split("/")
        sym = True
        if parts and parts[-1] in ("sym", "asym"):
            sym = parts.pop() == "sym"
        try:
            bits = int(parts[0])
            group = int(parts[1]) if len(parts) > 1 else -1
        except (ValueError, IndexError):
            raise LowbitError(f"bad scheme {spec!r}: expected BITS[/GROUP][/sym|asym], e.g. 8/-1 or 4/32/asym") from None
        if len(parts) > 2:
            raise LowbitError(f"bad scheme {spec!r}: expected BITS[/GROUP][/sym|asym]")
        return cls.from_cli(bits, group, sym)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Scheme":
        known = {"bits", "symmetric", "granularity", "group_size", "scale_dtype"}
        unknown = set(d) - known
        if unknown:
            raise LowbitError(f"unknown scheme fields: {sorted(unknown)}")
        return cls(**d)

    def describe(self) -> str:
        gran = {"tensor": "per-tensor", "channel": "per-channel"}.get(self.granularity, f"g{self.group_size}")
        return f"W{self.bits} {gran} {'sym' if self.symmetric else 'asym'}"
