"""`lowbit` command line. Every command calls the Python API (lowbit.api)."""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from inspect import Parameter, Signature
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer

from .errors import LowbitError

# rich_markup_mode=None: help texts are plain text (rich markup would read "[/GROUP]" as a closing tag)
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Quantize LLMs, measure the cost, save them, run them on a CPU.")

MODEL_HELP = "A HF hub id or folder, a .gguf file, a lowbit checkpoint, or smollm2-135m."
DTYPE_HELP = ("Float weights in memory: auto (as stored), float32, bfloat16, float16. Hessians, Cholesky and "
              "scale searches compute in float32 whatever it is.")
DEVICE_HELP = "Where the model computes: cpu, cuda, or auto (cuda when available)."


def _dtype_opt():
    return typer.Option("auto", "--dtype", metavar="auto|float32|bfloat16|float16", help=DTYPE_HELP)


def _device_opt():
    return typer.Option("cpu", "--device", metavar="cpu|cuda|auto", help=DEVICE_HELP)


def _err(msg: str) -> None:
    print(f"lowbit: error: {msg}", file=sys.stderr)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lowbit")
    except PackageNotFoundError:  # run from a source tree that was never installed
        from .core.version import __version__

        return __version__


def _print_version(value: bool) -> None:
    if value:
        print(f"lowbit {_version()}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print lowbit's version and exit."),
) -> None:
    pass


# ----------------------------------------------------------------------------- flags generated from options


@dataclass(eq=False)  # keys of {flag: value}, by identity
class _Flag:
    """One command-line flag generated from an options field (core.config.option) of one or more methods."""

    param: str  # the command function's parameter name
    decls: str  # "--nsamples", "--act-order/--no-act-order"
    type: type  # int, float, bool or str
    path: tuple[str, ...]  # the field, from the options class down through nested settings: ("train", "lr")
    help: str
    defaults: dict[str, Any] = field(default_factory=dict)  # method name (or "" for a command's own) -> default

    def spelled(self, value: Any) -> str:
        """The flag as given: --no-act-order for False."""
        names = self.decls.split("/")
        return names[0] if self.type is not bool or value or len(names) == 1 else names[1]

    def show(self, value: Any) -> str:
        return self.spelled(value) if self.type is bool else str(value)


def _option_fields(cls: type, path: tuple[str, ...] = (), prefix: str = ""):
    """(decls, type, path, help, default) of every flag-worthy field of the dataclass `cls`, nested ones included."""
    import types
    import typing
    from dataclasses import MISSING, fields, is_dataclass

    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        md = f.metadata
        if not md.get("cli"):
            continue
        hint = hints[f.name]
        alts = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        base = [t for t in alts if t is not type(None)]
        if len(base) == 1 and is_dataclass(base[0]):
            yield from _option_fields(base[0], path + (f.name,), prefix + md["prefix"])
            continue
        if len(base) != 1 or base[0] not in (int, float, bool, str):
            raise TypeError(f"{cls.__name__}.{f.name}: a command-line option needs one of int, float, bool, str")
        t = base[0]
        names = [d.removeprefix("--") for d in md["flag"].split("/")] if md["flag"] else [f.name.replace("_", "-")]
        if t is bool and len(names) == 1:
            names.append("no-" + names[0])
        decls = "/".join(f"--{prefix}{n}" if not n.startswith("no-") else f"--no-{prefix}{n[3:]}" for n in names)
        default = f.default if f.default is not MISSING else f.default_factory()
        yield decls, t, path + (f.name,), md["help"], default


def _flags(owners: list[tuple[str, type]], taken: set[str]) -> list[_Flag]:
    """The union of the flags of several options classes [(method name, Options class)]; a flag several methods
    share (same spelling and type) is one flag that knows each one's default."""
    out: dict[str, _Flag] = {}
    for owner, cls in owners:
        for decls, t, path, help_, default in _option_fields(cls):
            fl = out.get(decls)
            if fl is None:
                param = decls.split("/")[0].removeprefix("--").replace("-", "_")
                if param in taken:
                    raise TypeError(f"option {decls} of {owner or cls.__name__} collides with a command's own flag")
                taken.add(param)
                fl = out[decls] = _Flag(param, decls, t, path, help_)
            elif (fl.type, fl.path) != (t, path):
                raise TypeError(f"option {decls} of {owner} differs from the same flag of {', '.join(fl.defaults)}")
            fl.defaults[owner] = default
    return list(out.values())


def _per_method(values: dict[str, str]) -> str:
    """'4; 8 for w8a8, llm-int8': the most common value first, the others with the methods that have them."""
    by: dict[str, list[str]] = {}
    for m, v in values.items():
        by.setdefault(v, []).append(m)
    order = sorted(by, key=lambda v: -len(by[v]))
    return "; ".join([order[0]] + [f"{v} for {', '.join(by[v])}" for v in order[1:]])


def _flag_help(fl: _Flag, label: bool) -> str:
    shown = {m: fl.show(d) for m, d in fl.defaults.items() if d is not None}
    text = (f"({', '.join(fl.defaults)}) " if label else "") + fl.help
    return text + (f"  [default: {_per_method(shown)}]" if shown else "")


def _flag_param(fl: _Flag, label: bool) -> Parameter:
    """A typer option that defaults to None, "not given": the method's own default applies."""
    return Parameter(fl.param, Parameter.KEYWORD_ONLY, annotation=Optional[fl.type],
                     default=typer.Option(None, fl.decls, help=_flag_help(fl, label), show_default=False))


def _given_options(flags: list[_Flag], kw: dict) -> dict[_Flag, Any]:
    given = {fl: kw.pop(fl.param) for fl in flags}
    return {fl: v for fl, v in given.items() if v is not None}


def _nested(given: dict[_Flag, Any]) -> dict:
    """{flag: value} -> the options mapping: {"nsamples": 4, "train": {"lr": 0.001}}."""
    out: dict = {}
    for fl, v in given.items():
        d = out
        for key in fl.path[:-1]:
            d = d.setdefault(key, {})
        d[fl.path[-1]] = v
    return out


class _GeneratedCommand:
    """A command whose signature typer reads when it builds the app (every run): its own parameters plus the
    flags generated from options classes at that moment, so a method registered at any time has its flags.
    `body(**own parameters, given={flag: value})` runs it."""

    def __init__(self, body: Callable, own: Callable[[], list[Parameter]],
                 owners: Callable[[], list[tuple[str, type]]], label: bool) -> None:
        self.body, self.own, self.owners, self.label = body, own, owners, label
        self.__annotations__: dict = {}  # typing.get_type_hints(): the annotations are the signature's
        self.__doc__ = body.__doc__

    def _flags(self) -> list[_Flag]:
        return _flags(self.owners(), {p.name for p in self.own()})

    @property
    def __signature__(self) -> Signature:
        return Signature(self.own() + [_flag_param(fl, self.label) for fl in self._flags()])

    def __call__(self, **kw: Any) -> None:
        given = _given_options(self._flags(), kw)
        return self.body(**kw, given=given)


def _opt(name: str, annotation: Any, info: Any) -> Parameter:
    return Parameter(name, Parameter.KEYWORD_ONLY, annotation=annotation, default=info)


# ----------------------------------------------------------------------------- quantize


def _method_specs():
    from .algorithms.registry import specs

    return specs()


def _quantize_params() -> list[Parameter]:
    specs = _method_specs()

    def defaults(fmt: Callable) -> str:
        return _per_method({s.name: fmt(s.default_scheme) for s in specs})

    methods = "; ".join(f"{s.name} ({s.help})" if s.help else s.name for s in specs)
    return [
        _opt("model", str, typer.Argument(..., help=MODEL_HELP)),
        _opt("out", Path, typer.Argument(..., help="Output checkpoint folder (written atomically).")),
        _opt("method", str, typer.Option(specs[0].name, metavar="|".join(s.name for s in specs),
                                         help=f"Quantization method: {methods}.")),
        _opt("bits", Optional[int], typer.Option(
            None, help=f"Bits per weight, 2..8 [default: {defaults(lambda d: str(d.bits))}].", show_default=False)),
        _opt("group_size", Optional[int], typer.Option(
            None, help=f"Columns per scale; -1 = per output channel [default: "
                       f"{defaults(lambda d: str(d.group_size) if d.granularity == 'group' else '-1')}].",
            show_default=False)),
        _opt("per_tensor", bool, typer.Option(False, help="One weight scale for the whole tensor (w8a8: the naive "
                                                          "scheme).")),
        _opt("sym", Optional[bool], typer.Option(
            None, "--sym/--asym", help=f"Symmetric (z = 0) or asymmetric (zero point) grid [default: "
                                       f"{defaults(lambda d: '--sym' if d.symmetric else '--asym')}].",
            show_default=False)),
        _opt("include", List[str], typer.Option([], help="Regex of layers to quantize (repeatable; default: decoder "
                                                         "linears).")),
        _opt("exclude", List[str], typer.Option([], help="Regex of layers to keep in float (repeatable).")),
        _opt("override", List[str], typer.Option([], help="PATTERN=BITS[/GROUP][/sym|asym]: another scheme for the "
                                                          "layers matching PATTERN, which are quantized too (e.g. "
                                                          "'lm_head=8/-1'; outside the decoder blocks: rounded to "
                                                          "nearest). Repeatable.")),
        _opt("seed", int, typer.Option(0, help="Random seed (calibration windows), recorded in the checkpoint.")),
        _opt("dtype", str, _dtype_opt()),
        _opt("device", str, _device_opt()),
        _opt("resume", bool, typer.Option(False, help="Continue a killed or interrupted run from its last finished "
                                                      "block (block-streaming methods; the state is kept in "
                                                      ".OUT.lowbit-resume beside OUT).")),
        _opt("force", bool, typer.Option(False, help="Replace OUT if it exists.")),
        *_budget_params("checkpoint"),
    ]


def _budget_params(what: str) -> list[Parameter]:
    """--target-bpw / --target-size / --plan and the planner's settings (issue 23), for quantize and export-gguf."""
    size = ("the whole checkpoint (quantized layers, float tensors kept, config and header reserve)"
            if what == "checkpoint" else "the whole .gguf file (every tensor, metadata, padding)")
    return [
        _opt("target_bpw", Optional[float], typer.Option(None, help="Budget: choose one scheme per layer for the "
             "least sensitivity cost at this many bits per weight (of the quantized layers).", show_default=False)),
        _opt("target_size", Optional[str], typer.Option(None, help=f"Budget: bytes of {size}, e.g. 80MB, 75MiB, "
             "80000000.", show_default=False)),
        _opt("plan", Optional[Path], typer.Option(None, help="Reuse a plan (a plan JSON from --save-plan, or a "
             "budgeted checkpoint's config.json) instead of planning; with --target-bpw/--target-size: its measured "
             "costs under that budget.", show_default=False)),
        _opt("save_plan", Optional[Path], typer.Option(None, help="Write the plan as JSON here too.",
                                                       show_default=False)),
        _opt("budget_kl", bool, typer.Option(False, help="Budget: measure each layer's KL on held-out calibration "
             "windows and rescale its proxy costs to it (slower).")),
        _opt("budget_validate", bool, typer.Option(False, help="Budget: measure the KL too and report the proxy's "
             "rank correlation (on 30 evenly spaced layers), but plan with the proxy.")),
        # checkpoints: the proxy fits GPTQ's error on H and weighs it on the same H, optimistic with few windows
        # (docs §14: 32 windows plan better than 8, 64 no better than 32)
        _opt("budget_nsamples", int, typer.Option(32 if what == "checkpoint" else 8, help="Budget: calibration "
                                                  "windows for the sensitivity statistics.")),
        *([_opt("budget_schemes", str, typer.Option("2,3,4,5,6,8/32,64,128/asym", help="Budget: candidate "
              "schemes, BITS,.../GROUPS,.../sym|asym|both.")),
           _opt("budget_error", str, typer.Option("auto", help="Budget: whose error the proxy weighs: nearest "
              "(round-to-nearest), gptq (GPTQ on the sampled rows with each layer's H), or auto (gptq for the "
              "methods that run a GPTQ sweep, else nearest)."))]
          if what == "checkpoint" else []),
    ]


def _budget_given(target_bpw, target_size, plan) -> bool:
    if target_bpw is not None and target_size is not None:
        raise LowbitError("give one of --target-bpw and --target-size (with --plan: its costs, another budget)")
    if target_bpw is not None and not 0 < target_bpw <= 32:
        raise LowbitError(f"--target-bpw must be in (0, 32], got {target_bpw}")
    return any(x is not None for x in (target_bpw, target_size, plan))


def _scheme_from_flags(default, bits: Optional[int], group_size: Optional[int], sym: Optional[bool],
                       per_tensor: bool):
    """The weight scheme from --bits/--group-size/--sym/--per-tensor; what is not given, the method's default."""
    from .core.scheme import Scheme

    b = default.bits if bits is None else bits
    s = default.symmetric if sym is None else sym
    if per_tensor:
        return Scheme(bits=b, symmetric=s, granularity="tensor", group_size=None)
    if group_size is None:
        return Scheme(bits=b, symmetric=s, granularity=default.granularity, group_size=default.group_size)
    return Scheme.from_cli(b, group_size, s)


def _quantize(model: str, out: Path, method: str, bits: Optional[int], group_size: Optional[int], per_tensor: bool,
              sym: Optional[bool], include: List[str], exclude: List[str], override: List[str], seed: int,
              dtype: str, device: str, resume: bool, force: bool, target_bpw: Optional[float],
              target_size: Optional[str], plan: Optional[Path], save_plan: Optional[Path], budget_kl: bool,
              budget_validate: bool, budget_nsamples: int, budget_schemes: str, budget_error: str,
              given: dict) -> None:
    """Quantize MODEL and save a packed lowbit checkpoint to OUT."""
    from . import api
    from .algorithms.registry import get_spec, resolve
    from .core.config import QuantConfig
    from .core.scheme import Scheme
    from .core.io import check_output

    spec = get_spec(method)  # unknown method: refuse before loading anything
    if resume and not spec.streams_output:
        raise LowbitError(f"--resume: method {spec.name} does not write block by block (nothing to resume)")
    for fl, value in given.items():
        if spec.name not in fl.defaults:
            raise LowbitError(f"{fl.spelled(value)} is not an option of --method {spec.name} "
                              f"({', '.join(fl.defaults)} {'takes' if len(fl.defaults) == 1 else 'take'} it)")
    overrides = {}
    for o in override:
        pat, eq, sch = o.rpartition("=")
        if not eq or not pat:
            raise LowbitError(f"--override {o!r}: expected PATTERN=BITS[/GROUP][/sym|asym]")
        overrides[pat] = Scheme.parse(sch)
    config = QuantConfig(method=spec.name, scheme=_scheme_from_flags(spec.default_scheme, bits, group_size, sym,
                                                                     per_tensor),
                         include=tuple(include), exclude=tuple(exclude), overrides=overrides, seed=seed,
                         options=_nested(given))
    resolve(config, preflight=True)  # scheme, options, calibration text: refuse before loading anything
    budgeted = _budget_given(target_bpw, target_size, plan)
    if budgeted:
        from .algorithms.budget import ERROR_CHOICES, parse_candidates, read_plan
        from .core.budget import parse_size

        if budget_error not in ERROR_CHOICES:
            raise LowbitError(f"--budget-error {budget_error!r}: one of {', '.join(ERROR_CHOICES)}")
        size = parse_size(target_size) if target_size is not None else None
        loaded_plan = read_plan(plan, "lowbit") if plan is not None else None
        cands = parse_candidates(budget_schemes)
        if save_plan is not None:
            check_output(save_plan, overwrite=True, kind="file")
    check_output(out, overwrite=force)  # unwritable OUT: refuse before the long work
    dev = api.resolve_device(device)
    from .core import dist

    dist.init_from_env(dev)  # under torchrun: data-parallel calibration, rank 0 writes (core/dist.py)
    # block-sequential methods: one float block at a time (a budget's statistics need the whole float model)
    planning = budgeted and (plan is None or target_bpw is not None or size is not None)
    m, tok = api.load(model, dtype=dtype, lazy=spec.streams_blocks and not planning)
    t0 = time.time()
    if budgeted:
        if loaded_plan is None or target_bpw is not None or size is not None:
            loaded_plan = api.plan_budget(m, tok, config, target_bpw=target_bpw, target_size=size, candidates=cands,
                                          kl=budget_kl, validate=budget_validate, nsamples=budget_nsamples,
                                          reuse=loaded_plan, error=budget_error)
        loaded_plan = api.apply_plan(m, config, loaded_plan).budget  # bytes/bpw computed from the schemes
        from .algorithms.budget import plan_table

        print(plan_table(loaded_plan))
        secs = loaded_plan.get("sensitivity", {}).get("seconds", {})
        print(f"planned in {time.time() - t0:.1f}s" + (f" (statistics {secs.get('statistics')}s, proxy "
              f"{secs.get('proxy')}s, KL {secs.get('kl')}s)" if plan is None and secs else ""))
        if save_plan is not None:
            save_plan.write_text(json.dumps(loaded_plan) + "\n")
    t0 = time.time()
    if spec.streams_output:  # each finished block's packed tensors go to disk as it is done: resumable
        api.quantize_to(m, config, out, tokenizer=tok, overwrite=force, resume=resume, device=dev)
    else:
        api.quantize(m, config, tokenizer=tok, device=dev)
        api.save(m, tok, out, overwrite=force)
    t_quant = time.time() - t0
    from .core.state import state_of
    from .eval.size import weight_stats

    st = weight_stats(m)
    if budgeted:
        stored = sum(p.stat().st_size for p in out.iterdir()
                     if p.name == "config.json" or p.name.endswith((".safetensors", ".safetensors.index.json")))
        print(f"budgeted: {st['bpw']:.4f} bits/weight; weights + config.json {stored:,} bytes"
              + (f" (target {size:,})" if size else f" (target {target_bpw} bits/weight)" if target_bpw else ""),
              file=sys.stderr)
    what = "per-layer plan" if budgeted else config.scheme.describe()
    print(f"quantized {len(state_of(m).quant.modules)} layers ({what}, {spec.name}) in {t_quant:.1f}s: "
          f"{st['bpw']:.3f} bits/weight, {st['quantized_bytes'] / 2**20:.1f} MiB -> {out}", file=sys.stderr)


app.command("quantize", help=_quantize.__doc__)(
    _GeneratedCommand(_quantize, _quantize_params, lambda: [(s.name, s.options) for s in _method_specs()], label=True))


@app.command("eval")
def eval_(
    model: str = typer.Argument(..., help=MODEL_HELP),
    text: Optional[Path] = typer.Option(None, help="Text file to score (default: WikiText-2 raw test)."),
    seqlen: int = typer.Option(512, help="Tokens per non-overlapping window."),
    limit_tokens: Optional[int] = typer.Option(None, help="Score only the first N tokens of the text."),
    base: Optional[str] = typer.Option(None, help="Reference model for KL divergence and top-1 agreement."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object as the last stdout line."),
    dtype: str = _dtype_opt(),
    device: str = _device_opt(),
    runtime: str = typer.Option("auto", help="lean (one prefill per window; LLaMA family), transformers, or auto "
                                             "(lean where it applies: float32 on the CPU)."),
    int8_activations: bool = typer.Option(False, help="lean: score the native int8-activation GEMM (what a prompt "
                                                      "runs through) instead of float32 products of the weights."),
) -> None:
    """Perplexity of MODEL on a text (and KL / top-1 agreement against --base)."""
    from . import api
    from .core.text import read_text

    body, label = read_text(text)  # bad text: refuse before loading models
    dev = api.resolve_device(device)
    m, tok = api.load(model, dtype=dtype)
    b = api.load(base, dtype=dtype)[0] if base else None
    res = api.evaluate(m, tok, text=body, seqlen=seqlen, limit_tokens=limit_tokens, base=b, device=dev,
                       runtime=runtime, int8_activations=int8_activations)
    res["text"], res["model"] = label, model
    if base:
        res["base"] = base
    if as_json:
        print(json.dumps(res))
    else:
        line = f"ppl {res['ppl']:.4f} on {res['tokens']} tokens ({res['windows']} x {res['seqlen']}) of {label}"
        if base:
            line += f"; base ppl {res['base_ppl']:.4f}, KL {res['kl']:.5f}, top-1 {100 * res['top1']:.2f}%"
        print(line)
        print(f"bits/weight {res['bpw']}, quantized bytes {res['quantized_bytes']}, model bytes {res['model_bytes']}")


@app.command()
def generate(
    model: str = typer.Argument(..., help=MODEL_HELP),
    prompt: str = typer.Option(..., help="Prompt text."),
    max_new_tokens: int = typer.Option(64, help="Tokens to generate at most."),
    chat: bool = typer.Option(False, help="Wrap the prompt in the model's chat template."),
    temperature: float = typer.Option(0.0, help="0 = greedy; > 0 samples."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass (with --temperature > 0)."),
    seed: int = typer.Option(0, help="Sampling seed."),
    runtime: str = typer.Option("auto", help="lean (static cache, fused kernels; LLaMA family), transformers, "
                                             "or auto (lean where it applies)."),
    dtype: str = _dtype_opt(),
    device: str = _device_opt(),
) -> None:
    """Generate text from MODEL, streamed as it is produced."""
    from . import api

    dev = api.resolve_device(device)
    m, tok = api.load(model, dtype=dtype)
    if dev != "cpu":
        if runtime == "lean":
            raise LowbitError("--runtime lean runs on the CPU only: use --runtime transformers with --device cuda")
        runtime = "transformers"
        m.to(dev)

    def emit(s: str) -> None:
        sys.stdout.write(s)
        sys.stdout.flush()

    api.generate(m, tok, prompt, max_new_tokens=max_new_tokens, chat=chat, temperature=temperature,
                 top_p=top_p, seed=seed, on_text=emit, runtime=runtime)
    sys.stdout.write("\n")


@app.command()
def inspect(
    model: str = typer.Argument(..., help=MODEL_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the table as JSON."),
    activations: bool = typer.Option(False, help="Report the outliers of every linear's input on calibration text."),
    calib: Optional[Path] = typer.Option(None, help="--activations: text (default: WikiText-2 valid)."),
    nsamples: int = typer.Option(16, help="--activations: windows of calibration text."),
    calib_seqlen: int = typer.Option(512, help="--activations: tokens per window."),
    threshold: float = typer.Option(6.0, help="--activations: |x| from which a dimension counts as an outlier."),
    plot: Optional[Path] = typer.Option(None, help="--activations: write a PNG of per-layer max |x| and outlier dims."),
    seed: int = typer.Option(0, help="--activations: seed of the calibration windows."),
    dtype: str = _dtype_opt(),
) -> None:
    """A table per layer: shape, bits, group size, bytes, relative weight error (or, with --activations, outliers)."""
    from .eval.inspect import layer_table

    from . import api

    if activations:
        _inspect_activations(model, as_json, calib, nsamples, calib_seqlen, threshold, plot, seed, dtype)
        return
    p = Path(model)
    if p.is_file() and p.suffix.lower() == ".gguf":
        _inspect_gguf(p, as_json)
        return
    m, _ = api.load(model, dtype=dtype)
    rows, total = layer_table(m)
    if as_json:
        print(json.dumps({"layers": rows, "total": total}))
        return
    head = f"{'layer':<40} {'shape':>12} {'bits':>4} {'group':>6} {'sym':>4} {'bytes':>10} {'bpw':>6} {'rel.err':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        err = "-" if r["rel_error"] is None else f"{r['rel_error']:.4f}"
        print(f"{r['name']:<40} {r['shape']:>12} {r['bits']:>4} {r['group']:>6} {r['sym']:>4} {r['bytes']:>10} "
              f"{r['bpw']:>6.3f} {err:>8}")
    print("-" * len(head))
    print(f"{len(rows)} layers, {total['bytes']} bytes, {total['bpw']:.3f} bits/weight; "
          f"model {total['model_bytes']} bytes")


def _qat_params() -> list[Parameter]:
    from .algorithms.qat import TrainConfig

    save_every = TrainConfig.__dataclass_fields__["save_every"]
    return [
        _opt("model", str, typer.Argument(..., help=MODEL_HELP + " The float model (also the teacher with "
                                                                 "--distill).")),
        _opt("out", Path, typer.Argument(..., help="Output checkpoint folder (packed, like every PTQ checkpoint).")),
        _opt("bits", int, typer.Option(4, help="Bits per weight, 2..8 (ignored with --init: the checkpoint's "
                                               "scheme).")),
        _opt("group_size", int, typer.Option(128, help="Columns per scale; -1 = per output channel.")),
        _opt("sym", bool, typer.Option(True, "--sym/--asym", help="Symmetric or asymmetric grid.")),
        _opt("init", Optional[str], typer.Option(None, help="Start from this PTQ checkpoint (rtn/gptq/awq) instead "
                                                            "of RTN.")),
        _opt("train_text", Optional[Path], typer.Option(None, help="Training text (default: WikiText-2 valid minus "
                                                                   "its last 10%, which is the held-out text). Never "
                                                                   "the test text.")),
        _opt("eval_text", Optional[Path], typer.Option(None, help="Held-out text for the before/after perplexity.")),
        _opt("save_every", int, typer.Option(save_every.default, help=save_every.metadata["help"])),
        _opt("resume", bool, typer.Option(False, help="Continue from the state saved next to OUT (OUT.qat-state).")),
        _opt("eval_tokens", int, typer.Option(16384, help="Held-out tokens scored before and after.")),
        _opt("include", List[str], typer.Option([], help="Regex of layers to train quantized (default: decoder "
                                                         "linears).")),
        _opt("exclude", List[str], typer.Option([], help="Regex of layers to keep in float.")),
        _opt("seed", int, typer.Option(0, help="Seed of the training windows.")),
        _opt("force", bool, typer.Option(False, help="Replace OUT if it exists.")),
    ]


def _qat(model: str, out: Path, bits: int, group_size: int, sym: bool, init: Optional[str],
         train_text: Optional[Path], eval_text: Optional[Path], save_every: int, resume: bool, eval_tokens: int,
         include: List[str], exclude: List[str], seed: int, force: bool, given: dict) -> None:
    """Quantization-aware training (STE fake quantization), then a packed checkpoint."""
    from dataclasses import replace

    from .algorithms.qat import SPEC, BlockConfig, QatOptions
    from .core.config import QuantConfig
    from .core.scheme import Scheme
    from .workflows.qat import run

    opts = QatOptions.from_dict(_nested(given), SPEC.name)  # --steps, --lr, --block-*: checked here
    config = QuantConfig(method=SPEC.name, scheme=Scheme.from_cli(bits, group_size, sym), include=tuple(include),
                         exclude=tuple(exclude), seed=seed)
    res = run(model, out, config, replace(opts.train, seed=seed, save_every=save_every), init=init,
              train_text=str(train_text) if train_text else None, eval_text=str(eval_text) if eval_text else None,
              learn_scale=opts.learn_scale, learn_zero=opts.learn_zero, resume=resume, eval_tokens=eval_tokens,
              overwrite=force, block=replace(opts.block or BlockConfig(), seed=seed))
    print(json.dumps(res))


def _qat_options() -> list[tuple[str, type]]:
    from .algorithms.qat import QatOptions

    return [("", QatOptions)]


app.command("qat", help=_qat.__doc__)(_GeneratedCommand(_qat, _qat_params, _qat_options, label=False))


@app.command()
def bench(
    model: str = typer.Argument(..., help=MODEL_HELP),
    compare: List[str] = typer.Option([], help="Another model to measure alternately in the same process (repeatable)."),
    llama_cpp: Optional[Path] = typer.Option(None, help="A .gguf file to time with llama-cpp-python on the same prompt."),
    prompt_tokens: int = typer.Option(512, help="Prompt length for prefill."),
    new_tokens: int = typer.Option(128, help="Greedy tokens to decode (batch 1, KV cache)."),
    runs: int = typer.Option(3, help="Measured runs per model (after one warm-up); the median is reported."),
    threads: Optional[int] = typer.Option(None, help="torch threads (default: torch's choice)."),
    runtime: str = typer.Option("auto", help="lean, transformers, or auto (lean where it applies)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object as the last stdout line."),
    dtype: str = _dtype_opt(),
) -> None:
    """Prefill and decode tokens/s, time to first token, memory: MODEL (and --compare models, with ratios)."""
    import torch

    from . import api
    from .eval import speed

    if prompt_tokens < 1 or new_tokens < 0 or runs < 1:
        raise LowbitError("need --prompt-tokens >= 1, --new-tokens >= 0 and --runs >= 1")
    if llama_cpp is not None and not llama_cpp.is_file():
        raise LowbitError(f"{llama_cpp}: no such file")
    if threads:
        torch.set_num_threads(threads)
    models = {}
    tok = None
    for name in [model, *compare]:
        models[name], t = api.load(name, dtype=dtype)
        tok = tok or t
    if tok is None:
        raise LowbitError(f"{model}: no tokenizer to build the prompt")
    ids = speed.prompt_ids(tok, prompt_tokens)
    rows = speed.compare(models, ids, new_tokens=new_tokens, runs=runs, runtime=runtime)
    if llama_cpp is not None:
        rows.append(speed.llama_cpp_speed(str(llama_cpp), ids, new_tokens=new_tokens, runs=runs,
                                          threads=torch.get_num_threads()))
    from .kernels.native import describe

    res = {"rows": rows, "peak_rss_bytes": speed.peak_rss_bytes(), "threads": torch.get_num_threads(),
           "native_kernels": describe()}
    if as_json:
        print(json.dumps(res))
        return
    print(f"{'model':<40} {'prefill tok/s':>14} {'ttft s':>8} {'decode tok/s':>13} {'x first (p/d)':>14} {'bytes':>13}")
    for r in rows:
        ratio = ""
        if "prefill_vs_first" in r:
            ratio = f"{r['prefill_vs_first']:.2f}/{r.get('decode_vs_first', float('nan')):.2f}"
        dec = "-" if r.get("decode_tok_s") is None else f"{r['decode_tok_s']:.1f}"
        ttft = "-" if r.get("ttft_s") is None else f"{r['ttft_s']:.3f}"
        print(f"{r['model'][-40:]:<40} {r['prefill_tok_s']:>14.1f} {ttft:>8} {dec:>13} {ratio:>14} "
              f"{r['model_bytes']:>13,}")
    print(f"prompt {prompt_tokens} tokens, {new_tokens} new tokens, median of {runs} runs, "
          f"{torch.get_num_threads()} threads; peak RSS {res['peak_rss_bytes'] / 2**20:.0f} MiB")
    print(f"native kernels: {res['native_kernels']}")


@app.command("export-gguf")
def export_gguf(
    model: str = typer.Argument(..., help=MODEL_HELP),
    out: Path = typer.Argument(..., help="Output .gguf file (written atomically)."),
    type_: str = typer.Option("Q4_K_M", "--type", help="F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q5_0 Q5_1 Q2_K Q3_K_S Q3_K_M "
                                                       "Q3_K_L Q4_K_S Q4_K_M Q5_K_S Q5_K_M Q6_K (Q4_K = Q4_K_M ...)."),
    tensor_type: List[str] = typer.Option([], help="PATTERN=TYPE: tensors whose GGUF name matches the regex get "
                                                   "TYPE (repeatable; first match wins), e.g. 'attn_v=Q6_K'."),
    calib: Optional[str] = typer.Option(None, help="Calibrate the blocks' scales on this text ('default': "
                                                   "WikiText-2 valid): error weighted by mean x² per input column."),
    gptq: bool = typer.Option(False, help="--calib: then choose every block's codes by GPTQ against its "
                                          "stored grid (error compensation with E[x xᵀ])."),
    nsamples: int = typer.Option(64, help="--calib: windows of calibration text."),
    calib_seqlen: int = typer.Option(512, help="--calib: tokens per window."),
    seed: int = typer.Option(0, help="--calib: seed of the calibration windows."),
    force: bool = typer.Option(False, help="Replace OUT if it exists."),
    dtype: str = _dtype_opt(),
    target_bpw: Optional[float] = typer.Option(None, help="Budget: one type per tensor for the least sensitivity "
                                               "cost at this many bits per weight (every tensor, header and "
                                               "padding included).", show_default=False),
    target_size: Optional[str] = typer.Option(None, help="Budget: bytes of the whole .gguf file, e.g. 93MB, "
                                              "93509920.", show_default=False),
    plan: Optional[Path] = typer.Option(None, help="Reuse a GGUF plan (JSON from --save-plan).", show_default=False),
    save_plan: Optional[Path] = typer.Option(None, help="Write the plan as JSON here too.", show_default=False),
    budget_nsamples: int = typer.Option(8, help="Budget without --calib: calibration windows for the "
                                                "sensitivity statistics (with --calib: --nsamples)."),
    budget_fill: float = typer.Option(0.0, help="Budget: the file takes at least this fraction of the target "
                                                "(e.g. 0.99 to compare at an equal size; 0: the least-cost plan, "
                                                "which may leave bytes unused)."),
) -> None:
    """Write MODEL as a GGUF file for llama.cpp (and ollama, LM Studio): its types and mixtures, or (--target-size,
    --target-bpw) the types that fit a budget best."""
    from . import api
    from .formats.gguf.blocks import get_type
    from .formats.gguf.export import export_gguf as export
    from .formats.gguf.mixtures import file_type
    from .core.io import check_output
    import re

    try:
        ftype = file_type(type_)
        overrides = []
        for spec in tensor_type:
            pat, sep, t = spec.rpartition("=")
            if not sep or not pat:
                raise ValueError(f"--tensor-type {spec!r}: expected PATTERN=TYPE")
            re.compile(pat)
            overrides.append((pat, get_type(t).name))
    except (ValueError, re.error) as e:
        raise LowbitError(str(e)) from None
    check_output(out, overwrite=force, kind="gguf")
    if gptq and calib is None:
        raise LowbitError("--gptq needs calibration: add --calib default (or --calib FILE)")
    if calib is not None and calib != "default":
        from .core.text import read_text

        read_text(calib)
    budgeted = _budget_given(target_bpw, target_size, plan)
    if budgeted:
        return _export_gguf_budget(model, out, type_, calib, gptq, nsamples, calib_seqlen, seed, force, target_bpw,
                                   target_size, plan, save_plan, budget_nsamples, overrides, budget_fill)
    m, tok = api.load(model, dtype=dtype)
    imatrix = hessians = None
    if calib is not None:
        from .calibration.data import calibration_ids
        from .calibration.stats import input_sq_means

        ids, _ = calibration_ids(tok, None if calib == "default" else calib, nsamples=nsamples,
                                 seqlen=calib_seqlen, seed=seed)
        stats = input_sq_means(m, ids, full=gptq)
        hessians, imatrix = (stats, None) if gptq else (None, stats)
    res = export(m, tok, out, ftype, overrides=overrides, imatrix=imatrix, hessians=hessians, overwrite=force)
    kinds = ", ".join(f"{k} x{v}" for k, v in sorted(res["tensor_types"].items()))
    how = " (calibrated, GPTQ)" if res["gptq"] else " (calibrated)" if res["calibrated"] else ""
    print(f"{out}: {res['type']}{how}, {res['bytes']:,} bytes, "
          f"{res['bpw']:.3f} bits/weight; tensors: {kinds}")
    if res.get("exact") or res.get("rerounded"):
        print(f"packed layers: {res['exact']} kept exactly (their codes and float16 scales as GGUF blocks), "
              f"{res['rerounded']} re-rounded to the file's types (no GGUF type holds their grid exactly)")


@app.command("export")
def export(
    model: str = typer.Argument(..., help=MODEL_HELP),
    out: Path = typer.Argument(..., help="Output folder (a .gguf file for gguf), written atomically."),
    format_: str = typer.Option(..., "--format", help="compressed-tensors (vLLM, SGLang, transformers), gptq "
                                                      "(GPTQModel, transformers, vLLM), awq, or gguf (llama.cpp)."),
    dtype: str = typer.Option("auto", help="compressed-tensors/gptq/awq: dtype of the float tensors: auto (the "
                                           "scales' dtype, or the source folder's), float16, bfloat16, float32."),
    type_: str = typer.Option("Q4_K_M", "--type", help="gguf: the GGUF type or mixture (as export-gguf)."),
    tensor_type: List[str] = typer.Option([], help="gguf: PATTERN=TYPE per tensor (as export-gguf)."),
    calib: Optional[str] = typer.Option(None, help="gguf: calibration text (as export-gguf)."),
    gptq: bool = typer.Option(False, help="gguf: GPTQ on the GGUF grid (as export-gguf; needs --calib)."),
    nsamples: int = typer.Option(64, help="gguf --calib: windows of calibration text."),
    calib_seqlen: int = typer.Option(512, help="gguf --calib: tokens per window."),
    seed: int = typer.Option(0, help="gguf --calib: seed of the calibration windows."),
    force: bool = typer.Option(False, help="Replace OUT if it exists."),
) -> None:
    """Write MODEL in an engine's format: its integer codes as they are (gguf: llama.cpp's block types)."""
    from . import api
    from .formats.export import FORMATS
    from .core.io import check_output

    if format_ not in FORMATS:
        raise LowbitError(f"--format must be one of {', '.join(FORMATS)}; got {format_!r}")
    if format_ == "gguf":
        return export_gguf(model, out, type_, tensor_type, calib, gptq, nsamples, calib_seqlen, seed, force,
                           dtype="auto", target_bpw=None, target_size=None, plan=None, save_plan=None,
                           budget_nsamples=8, budget_fill=0.0)
    if dtype not in ("auto", "float16", "bfloat16", "float32"):
        raise LowbitError(f"--dtype must be one of auto, float16, bfloat16, float32; got {dtype!r}")
    check_output(out, overwrite=force)
    m, tok = api.load(model)
    res = api.export(m, tok, out, format_, dtype=dtype, overwrite=force)
    kind = f" ({res['kind']})" if res.get("kind") else ""
    print(f"{out}: {res['format']}{kind}, {res['layers']} quantized layers, float tensors in {res['dtype']}")


def _export_gguf_budget(model, out, type_, calib, gptq, nsamples, calib_seqlen, seed, force, target_bpw,
                        target_size, plan, save_plan, budget_nsamples, overrides, budget_fill=0.0) -> None:
    from . import api
    from .algorithms.budget import plan_table, read_plan
    from .calibration.data import calibration_ids
    from .core.budget import parse_size
    from .core.io import check_output

    if overrides:
        raise LowbitError("--tensor-type and a budget do not combine (the plan sets every tensor's type)")
    size = parse_size(target_size) if target_size is not None else None
    loaded = read_plan(plan, "gguf") if plan is not None else None
    if save_plan is not None:
        check_output(save_plan, overwrite=True, kind="file")
    m, tok = api.load(model)
    t0 = time.time()
    stats = None
    retarget = loaded is not None and (size is not None or target_bpw is not None)
    if loaded is None or calib is not None:
        ids, _ = calibration_ids(tok, None if calib in (None, "default") else calib,
                                 nsamples=nsamples if calib is not None else budget_nsamples, seqlen=calib_seqlen,
                                 seed=seed)
    if loaded is None or retarget:
        loaded, stats = api.plan_gguf(m, tok, None if retarget else ids, target_size=size, target_bpw=target_bpw,
                                      calibrated=calib is not None, reuse=loaded if retarget else None,
                                      fill=budget_fill)
    print(plan_table(loaded))
    print(f"planned in {time.time() - t0:.1f}s")
    if save_plan is not None:
        save_plan.write_text(json.dumps(loaded) + "\n")
    res = api.export_gguf_planned(m, tok, out, loaded, ids if calib is not None else None, stats, gptq=gptq,
                                  overwrite=force)
    kinds = ", ".join(f"{k} x{v}" for k, v in sorted(res["tensor_types"].items()))
    how = " (calibrated, GPTQ)" if res["gptq"] else " (calibrated)" if res["calibrated"] else ""
    print(f"{out}: budgeted{how}, {res['bytes']:,} bytes (planned {loaded.get('file_bytes', 0):,}"
          + (f", target {size:,}" if size else "") + f"), {res['bpw']:.3f} bits/weight; tensors: {kinds}")


@app.command()
def report(
    runs: Path = typer.Argument(..., help="A folder of runs: lowbit checkpoints and .gguf files, each with its eval "
                                          "JSON (NAME.eval.json next to it, or NAME/eval.json)."),
    out: Path = typer.Option(Path("report.html"), help="The HTML page to write (its PNGs go next to it)."),
) -> None:
    """A self-contained HTML page: ppl vs bits per weight (Pareto frontier), sensitivity heat map, bits per layer."""
    from .core.io import check_output
    from .workflows.report import render

    if out.suffix.lower() not in (".html", ".htm"):
        raise LowbitError(f"{out}: the report is an .html file")
    check_output(out, overwrite=True, kind="file")
    res = render(runs, out)
    print(f"{res['runs']} runs -> {res['html']} ({', '.join(res['plots'].values())})")


def _inspect_gguf(path: Path, as_json: bool) -> None:
    from .formats.gguf.reader import gguf_table

    rows, total = gguf_table(path)
    if as_json:
        print(json.dumps({"tensors": rows, "total": total}))
        return
    head = f"{'tensor':<32} {'type':>6} {'shape':>14} {'bytes':>11} {'bpw':>7}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['name']:<32} {r['type']:>6} {'x'.join(map(str, r['shape'])):>14} {r['bytes']:>11,} {r['bpw']:>7.3f}")
    print("-" * len(head))
    kinds = ", ".join(f"{k} x{v}" for k, v in sorted(total["types"].items()))
    print(f"{total['tensors']} tensors ({kinds}); {total['weights']:,} weights in {total['tensor_bytes']:,} bytes = "
          f"{total['bpw']:.3f} bits/weight; file {total['file_bytes']:,} bytes; file type {total['file_type']}")


def _inspect_activations(model, as_json, calib, nsamples, calib_seqlen, threshold, plot, seed, dtype="auto") -> None:
    from . import api
    from .calibration.data import calibration_ids
    from .eval.outliers import activation_outliers, plot_outliers
    from .core.io import check_output

    if not threshold > 0:
        raise LowbitError(f"--threshold must be > 0, got {threshold}")
    if calib is not None:
        from .core.text import read_text

        read_text(calib)
    if plot is not None:
        if plot.is_dir() or plot.suffix.lower() != ".png":
            raise LowbitError(f"{plot}: --plot needs a .png file path")
        check_output(plot, overwrite=True, kind="png")  # replaces an earlier plot, nothing else
    m, tok = api.load(model, dtype=dtype)
    ids, info = calibration_ids(tok, calib, nsamples=nsamples, seqlen=calib_seqlen, seed=seed)
    res = activation_outliers(m, ids, threshold=threshold)
    res["calibration"] = info
    if plot is not None:
        plot_outliers(res, plot)
    if as_json:
        print(json.dumps(res))
        return
    head = f"{'linear (input)':<40} {'max|x|':>9} {'median|x|':>10} {'ratio':>8} {'#dims':>6}  top outlier dims (share of tokens)"
    print(head)
    print("-" * len(head))
    for r in res["layers"]:
        dims = " ".join(f"{d['dim']}({100 * d['share']:.1f}%)" for d in r["outlier_dims"][:5])
        print(f"{r['name']:<40} {r['max_abs']:>9.3g} {r['median_abs']:>10.3g} {r['ratio']:>8.3g} "
              f"{r['n_outlier_dims']:>6}  {dims}")
    print("-" * len(head))
    feats = res["features"]
    n_em = sum(f["emergent"] for f in feats)
    print(f"{res['tokens']} tokens, threshold {threshold:g}: {n_em} dimensions reach it in >= 6% of the tokens in "
          ">= 25% of the layers of their width (Dettmers et al.'s outlier features); most frequent:")
    for f in feats[:10]:
        print(f"  dim {f['dim']} (width {f['width']}): in {100 * f['layers_frac']:.0f}% of layers, "
              f"{100 * f['mean_token_share']:.2f}% of tokens on average{' (emergent)' if f['emergent'] else ''}")
    if plot is not None:
        print(f"plot -> {plot}")


def main() -> None:
    debug = os.environ.get("LOWBIT_DEBUG")
    from .core.memory import configure_process

    configure_process()
    try:
        # Not standalone: lowbit reports errors itself. Then typer returns the code of a typer.Exit (--help,
        # --version: 0; Ctrl-C inside a command: 130) instead of exiting.
        code = app(standalone_mode=False)
    except LowbitError as e:
        if debug:
            raise
        _err(str(e))
        sys.exit(2)
    except (KeyboardInterrupt, typer.Abort):
        _err("interrupted (nothing was written)")
        sys.exit(130)
    except SystemExit:
        raise
    except typer.TyperException as e:
        # typer's own copy of click raises these (not click.ClickException): usage errors (missing MODEL,
        # --seqlen abc, unknown option; exit code 2) print click's usage line, a help hint and the error
        show = getattr(e, "show", None)
        if show is not None:
            show()
        else:
            _err(e.format_message())
        sys.exit(e.exit_code)
    except Exception as e:  # anything unexpected: one line, no traceback
        if debug:
            raise
        msg = str(e).strip().splitlines()
        _err(f"{type(e).__name__}: {msg[0] if msg else ''} (set LOWBIT_DEBUG=1 for the traceback)")
        sys.exit(1)
    if code == 130:
        _err("interrupted (nothing was written)")
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
