"""What to quantize and how: the config a method handler receives, and the base of every method's typed options."""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any, Mapping

from ..errors import LowbitError
from .scheme import Scheme


def option(default: Any, help: str, flag: str | None = None, *, cli: bool = True, prefix: str = ""):
    """A field of an options class (or of a settings dataclass nested in one): its default, in this one place,
    and in its metadata the help text and the CLI flag spelling, which the command line is generated from.

    flag    "--name" (booleans: "--name/--no-name", or another pair such as "--act-sym/--act-asym");
            default: the field's name with dashes ("--nsamples", "--act-order/--no-act-order")
    cli     False: recorded in checkpoints but never a flag (what a method writes down: "calibration")
    prefix  for a nested settings dataclass: put before each of its flags ("block-": --block-lr)
    """
    md = {"help": help, "flag": flag, "cli": cli, "prefix": prefix}
    if type(default).__hash__ is None:  # a dict or an unfrozen dataclass: one fresh copy per instance
        return field(default_factory=lambda: dataclasses.replace(default) if is_dataclass(default) else
                     type(default)(default), metadata=md)
    return field(default=default, metadata=md)


def option_like(cls: type, name: str, default: Any):
    """Field `name` of `cls` (help, flag) with another default: a method that shares an option group but not
    one of its defaults (llm-int8's activations are asymmetric by default, w8a8's symmetric)."""
    m = next(f for f in fields(cls) if f.name == name).metadata
    return option(default, m["help"], m["flag"], cli=m["cli"], prefix=m["prefix"])


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _alternatives(hint: Any) -> tuple:
    """int | None -> (int, NoneType); int -> (int,)."""
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)


def _type_name(hint: Any) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping",
             type(None): "null"}
    return " or ".join(names.get(t) or (f"a mapping of {t.__name__}'s fields" if is_dataclass(t) else str(t))
                       for t in _alternatives(hint))


def _convert(hint: Any, value: Any, where: str) -> Any:
    """`value` as the field type `hint` wants it (ints for floats, mappings for nested settings), or a
    LowbitError naming `where`."""
    for t in _alternatives(hint):
        if t is type(None) and value is None:
            return None
        if t is bool and isinstance(value, bool):
            return value
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is str and isinstance(value, str):
            return value
        if t is dict and isinstance(value, Mapping):
            return dict(value)
        if isinstance(t, type) and is_dataclass(t):
            if isinstance(value, t):
                hints = _hints(t)
                for f in fields(t):
                    _convert(hints[f.name], getattr(value, f.name), f"{where}: {f.name!r}")
                return value
            if isinstance(value, Mapping):
                return settings_from_dict(t, value, where)
    raise LowbitError(f"{where} must be {_type_name(hint)}, got {value!r}")


def settings_from_dict(cls: type, d: Mapping, where: str) -> Any:
    """An instance of the dataclass `cls` from a mapping of some of its fields (the others: defaults);
    unknown keys and values of the wrong type are refused, naming `where`."""
    names = [f.name for f in fields(cls)]
    unknown = [k for k in d if k not in names]
    if unknown:
        raise LowbitError(f"unknown option {unknown[0]!r} for {where} (options: {', '.join(sorted(names))})")
    hints = _hints(cls)
    return cls(**{k: _convert(hints[k], v, f"option {k!r} of {where}") for k, v in d.items()})


@dataclass(frozen=True)
class Options:
    """Base of a method's typed options: a frozen dataclass whose fields are made with `option()`.

    Option groups are composed by inheritance (class GptqOptions(CalibOptions, GptqSweepOptions)): the
    fields stay flat, so a checkpoint records one flat JSON object, and every group's `check` runs.
    Built objects are valid: construction runs `validate()`, which raises LowbitError with one line.
    """

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in fields(self):  # ints given for floats become floats, mappings given for settings their dataclass
            value = getattr(self, f.name)
            converted = _convert(hints[f.name], value, f"option {f.name!r}")
            if converted is not value:
                object.__setattr__(self, f.name, converted)
        self.validate()

    def validate(self) -> None:
        hints = _hints(type(self))
        for f in fields(self):
            _convert(hints[f.name], getattr(self, f.name), f"option {f.name!r}")  # types
        for klass in reversed(type(self).__mro__):  # then each group's own rules, most basic first
            check = vars(klass).get("check")
            if check is not None:
                check(self)

    def check(self) -> None:
        """A group's rules beyond the types (define it in a group: raise LowbitError with one clear line)."""

    def check_files(self) -> None:
        """A group's checks that need the file system (define it in a group: a calibration text exists)."""

    def preflight(self) -> None:
        """Every group's check_files, before any long work; not run on options read back from a checkpoint,
        whose files may be elsewhere."""
        for klass in reversed(type(self).__mro__):
            check_files = vars(klass).get("check_files")
            if check_files is not None:
                check_files(self)

    @classmethod
    def from_dict(cls, d: Mapping, method: str = "") -> "Options":
        """From {field: value} (some fields; the others take their defaults): what the Python API and a
        checkpoint's "options" give. Unknown keys are refused."""
        return settings_from_dict(cls, d, f"method {method}" if method else cls.__name__)

    def to_dict(self) -> dict:
        """{field: value} of every field, nested settings as mappings: the JSON a checkpoint records."""
        return asdict(self)


@dataclass(frozen=True)
class NoOptions(Options):
    """A method without options."""


@dataclass
class QuantConfig:
    """`quantize(model, QuantConfig(...))`.

    method     name of a registered method ("rtn", ...: lowbit.algorithms.registry)
    scheme     default scheme of every targeted layer (None: the method's own default, filled in by quantize)
    include    regexes (re.search on module names); if given, only matching
               Linear/Embedding modules are targeted (lm_head, embeddings too).
               If empty: every Linear inside the decoder blocks.
    exclude    regexes of modules to leave in float
    overrides  {regex: Scheme}: the first matching pattern sets a layer's scheme
    seed       recorded in the checkpoint; methods that sample use it
    budget     the budget plan the per-layer overrides came from (algorithms/budget.py), recorded as is
    options    the method's typed options (its Options class), or a mapping of some of their fields, which
               quantize converts and validates against the method (unknown keys are an error); recorded in
               the checkpoint as one JSON object. Read back from a checkpoint they stay a mapping (formats
               do not know the methods): algorithms.registry.resolve types them again.
    """

    method: str = "rtn"
    scheme: Scheme | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    overrides: dict[str, Scheme] = field(default_factory=dict)
    seed: int = 0
    options: Options | dict = field(default_factory=dict)
    budget: dict | None = None

    def __post_init__(self) -> None:
        self.include = tuple(self.include)
        self.exclude = tuple(self.exclude)
        for p in (*self.include, *self.exclude, *self.overrides):
            try:
                re.compile(p)
            except re.error as e:
                raise LowbitError(f"bad layer pattern {p!r}: {e}") from None
        if not isinstance(self.options, (Options, Mapping)):
            raise LowbitError(f"options must be an Options object or a mapping, got {type(self.options).__name__}")

    def scheme_for(self, name: str) -> Scheme:
        for pattern, scheme in self.overrides.items():
            if re.search(pattern, name):
                return scheme
        if self.scheme is None:
            raise LowbitError(f"no scheme for {name}: QuantConfig.scheme is unset (quantize fills in the method's "
                              "default)")
        return self.scheme

    def options_dict(self) -> dict:
        return self.options.to_dict() if isinstance(self.options, Options) else dict(self.options)

    def to_dict(self) -> dict:
        extra = {"budget": self.budget} if self.budget is not None else {}
        return {
            "method": self.method,
            "scheme": self.scheme.to_dict() if self.scheme is not None else None,
            "include": list(self.include),
            "exclude": list(self.exclude),
            "overrides": {k: v.to_dict() for k, v in self.overrides.items()},
            "seed": self.seed,
            "options": self.options_dict(),
            **extra,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        return cls(
            method=d["method"],
            scheme=Scheme.from_dict(d["scheme"]) if d.get("scheme") is not None else None,
            include=tuple(d.get("include", ())),
            exclude=tuple(d.get("exclude", ())),
            overrides={k: Scheme.from_dict(v) for k, v in d.get("overrides", {}).items()},
            seed=d.get("seed", 0),
            options=d.get("options", {}),
            budget=d.get("budget"),
        )
