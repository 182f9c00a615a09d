"""What to quantize and how: the config a method handler receives."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import LowbitError
from .scheme import Scheme


@dataclass
class QuantConfig:
    """`quantize(model, QuantConfig(...))`.

    method     name of a registered method ("rtn", ...)
    scheme     default scheme of every targeted layer
    include    regexes (re.search on module names); if given, only matching
               Linear/Embedding modules are targeted (lm_head, embeddings too).
               If empty: every Linear inside the decoder blocks.
    exclude    regexes of modules to leave in float
    overrides  {regex: Scheme}: the first matching pattern sets a layer's scheme
    seed       recorded in the checkpoint; methods that sample use it
    options    method-specific settings (recorded in the checkpoint)
    """

    method: str = "rtn"
    scheme: Scheme = field(default_factory=Scheme)
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    overrides: dict[str, Scheme] = field(default_factory=dict)
    seed: int = 0
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.include = tuple(self.include)
        self.exclude = tuple(self.exclude)
        for p in (*self.include, *self.exclude, *self.overrides):
            try:
                re.compile(p)
            except re.error as e:
                raise LowbitError(f"bad layer pattern {p!r}: {e}") from None

    def scheme_for(self, name: str) -> Scheme:
        for pattern, scheme in self.overrides.items():
            if re.search(pattern, name):
                return scheme
        return self.scheme

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "scheme": self.scheme.to_dict(),
            "include": list(self.include),
            "exclude": list(self.exclude),
            "overrides": {k: v.to_dict() for k, v in self.overrides.items()},
            "seed": self.seed,
            "options": self.options,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        return cls(
            method=d["method"],
            scheme=Scheme.from_dict(d["scheme"]),
            include=tuple(d.get("include", ())),
            exclude=tuple(d.get("exclude", ())),
            overrides={k: Scheme.from_dict(v) for k, v in d.get("overrides", {}).items()},
            seed=d.get("seed", 0),
            options=d.get("options", {}),
        )
