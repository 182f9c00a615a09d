"""Method registry: one `MethodSpec` per method (torchao's config→handler idea, one level up).

A spec says everything about a method that is not its math: its name and one-line help, its typed options
(an `Options` dataclass: types, defaults, help and CLI flag spelling in one place), which weight schemes it
takes and its default one, whether it needs calibration text (may depend on the options), whether it reads
the decoder blocks' float weights one block at a time (lazily loaded models stay on disk meanwhile), and its
run function. The Python API (api.quantize) and the command line (cli.py: `lowbit quantize`'s flags and
checks) are both built from the specs, so adding a method is one new file that declares
`SPEC = register(MethodSpec(...))` and one import line in algorithms/__init__.py.

A run function `run(model, config, ctx)` replaces the targeted modules of `model` in place and returns
{module name: Scheme} of what it quantized; `config.options` is the method's typed options object and
`ctx` a `QuantContext` (api.py): the tokenizer and, lazily, the calibration token windows.
Importing this module imports its package, whose __init__ imports (and so registers) the built-in methods.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from ..core.config import NoOptions, Options, QuantConfig, option
from ..core.scheme import Scheme
from ..errors import LowbitError

Run = Callable[..., dict]


ANY_BITS = tuple(range(2, 9))
ANY_GRANULARITY = ("tensor", "channel", "group")


@dataclass(frozen=True)
class Schemes:
    """The weight schemes a method takes: any of `bits`, of `symmetric`, of `granularities`."""

    bits: tuple[int, ...] = ANY_BITS
    symmetric: tuple[bool, ...] = (True, False)
    granularities: tuple[str, ...] = ANY_GRANULARITY

    def accepts(self, scheme: Scheme) -> bool:
        return (scheme.bits in self.bits and scheme.symmetric in self.symmetric
                and scheme.granularity in self.granularities)

    def describe(self) -> str:
        bits = "/".join(map(str, self.bits)) + "-bit" if self.bits != ANY_BITS else ""
        sym = {(True,): "symmetric", (False,): "asymmetric"}.get(self.symmetric, "")
        gran = " or ".join(f"per {g}" for g in self.granularities) if self.granularities != ANY_GRANULARITY else ""
        return " ".join(p for p in (bits, sym, "weights", gran) if p)


ANY_SCHEME = Schemes()
INT8_WEIGHTS = Schemes(bits=(8,), symmetric=(True,), granularities=("channel", "tensor"))


@dataclass(frozen=True)
class MethodSpec:
    """Everything about one quantization method but its math.

    name            --method NAME, QuantConfig.method, recorded in checkpoints
    run             run(model, config, ctx) -> {module name: Scheme}
    options         its Options class (NoOptions: none); a dict given for them is converted and validated
    help            one line for `lowbit quantize --help`
    default_scheme  the weight scheme when none is given
    schemes         the weight schemes it takes (others are refused with one line)
    calibration     whether it draws calibration windows: a bool, or a function of its options
    streams_blocks  it reads the decoder blocks' float weights as it reaches them (a lazily loaded model
                    keeps the other blocks on disk meanwhile)
    streams_output  it hands every finished block to state_of(model).sink (core/state.BlockSink) when one is
                    set: api.quantize_to writes its output block by block, and a killed run resumes
    """

    name: str
    run: Run
    options: type[Options] = NoOptions
    help: str = ""
    default_scheme: Scheme = field(default_factory=Scheme)
    schemes: Schemes = ANY_SCHEME
    calibration: bool | Callable[[Any], bool] = False
    streams_blocks: bool = False
    streams_output: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.options, type) and issubclass(self.options, Options)):
            raise TypeError(f"method {self.name}: options must be an Options subclass")
        if self.calibration is not False and not issubclass(self.options, CalibOptions):
            raise TypeError(f"method {self.name} calibrates: its options must include CalibOptions")
        if not self.schemes.accepts(self.default_scheme):
            raise TypeError(f"method {self.name}: its default scheme is not one it takes")

    def parse_options(self, given: Options | Mapping | None) -> Options:
        """The typed options from an options object or a mapping of some fields (unknown keys refused)."""
        if given is None:
            return self.options()
        if isinstance(given, Options):
            if not isinstance(given, self.options):
                raise LowbitError(f"method {self.name} takes {self.options.__name__}, not {type(given).__name__}")
            return given
        if not isinstance(given, Mapping):
            raise LowbitError(f"options of method {self.name} must be {self.options.__name__} or a mapping, "
                              f"got {type(given).__name__}")
        return self.options.from_dict(given, self.name)

    def check_scheme(self, scheme: Scheme) -> None:
        if not self.schemes.accepts(scheme):
            raise LowbitError(f"{self.name} takes {self.schemes.describe()}, got {scheme.describe()}")

    def needs_calibration(self, options: Options) -> bool:
        return bool(self.calibration(options) if callable(self.calibration) else self.calibration)


# ----------------------------------------------------------------------------- shared option groups


@dataclass(frozen=True)
class CalibOptions(Options):
    """Calibration text and windows, for every method that calibrates (api.QuantContext draws them)."""

    calib: str | None = option(None, "Calibration text (default: WikiText-2 valid; never the test text).")
    nsamples: int = option(128, "Calibration windows.")
    calib_seqlen: int = option(512, "Tokens per calibration window.")
    calibration: dict | None = option(None, "What was drawn: recorded by quantize.", cli=False)

    def check(self) -> None:
        if self.nsamples < 1 or self.calib_seqlen < 2:
            raise LowbitError(f"need --nsamples >= 1 and --calib-seqlen >= 2, got {self.nsamples} and "
                              f"{self.calib_seqlen}")


    def check_files(self) -> None:
        if self.calib is not None:
            from ..core.text import read_text

            read_text(self.calib)  # missing or empty calibration text: refuse before loading anything


@dataclass(frozen=True)
class ForwardOptions(Options):
    """The layer-sequential pass's block forwards (gptq, awq, awq+gptq)."""

    calib_dtype: str = option("float32", "Matmuls of the calibration forwards: float32, or bfloat16 (bf16 autocast; "
                                         "statistics, Hessians and the quantization stay float32): faster where "
                                         "the CPU has native bf16 (AMX, AVX-512 BF16); codes differ slightly.")

    def check(self) -> None:
        if self.calib_dtype not in ("float32", "bfloat16"):
            raise LowbitError(f"--calib-dtype must be float32 or bfloat16, got {self.calib_dtype!r}")


# ----------------------------------------------------------------------------- the registry

_SPECS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method (its name must be new); returns the spec, so a method file can say SPEC = register(...)."""
    if spec.name in _SPECS and _SPECS[spec.name] is not spec:
        raise ValueError(f"method {spec.name!r} is already registered")
    _SPECS[spec.name] = spec
    return spec


def get_spec(name: str) -> MethodSpec:
    if name not in _SPECS:
        raise LowbitError(f"unknown method {name!r} (choose from: {', '.join(_SPECS)})")
    return _SPECS[name]


def specs() -> list[MethodSpec]:
    """Every registered method, in registration order (algorithms/__init__.py's)."""
    return list(_SPECS.values())


def method_names() -> list[str]:
    return list(_SPECS)


def get_method(name: str) -> Run:
    """The run function of method `name`."""
    return get_spec(name).run


def resolve(config: QuantConfig, preflight: bool = False) -> MethodSpec:
    """Check `config` against its method's spec, in place: the method's default scheme where none is set, the
    scheme accepted, the options typed and validated (a mapping becomes the method's Options object).
    preflight: also the checks that read files (a calibration text exists). Returns the spec."""
    spec = get_spec(config.method)
    if config.scheme is None:
        config.scheme = spec.default_scheme
    spec.check_scheme(config.scheme)
    config.options = spec.parse_options(config.options)
    if preflight:
        config.options.preflight()
    return spec
