"""The Python API; the CLI calls exactly these."""
from __future__ import annotations

import os
import shutil
import time
import sys
from pathlib import Path

import torch
from torch import nn

from .algorithms.registry import CalibOptions, resolve
from .core.config import QuantConfig
from .core.state import QuantRecord, state_of, set_quant
from .errors import LowbitError
from .eval.perplexity import evaluate
from .formats.checkpoint import ZERO_LAYOUT, save_checkpoint
from .formats.load import load_model
from .runtime.generation import generate
from .runtime.lean import lean_skeleton


class QuantContext:
    """What a method may need beyond the model: the tokenizer and calibration windows.

    Calibration settings are the method's typed options (algorithms.registry.CalibOptions: calib, the text
    file, default WikiText-2 valid; nsamples; calib_seqlen); windows are drawn with config.seed, only if the
    method asks, and what was drawn is recorded in the options ("calibration").
    """

    def __init__(self, config: QuantConfig, tokenizer=None, calib_ids: torch.Tensor | None = None) -> None:
        self.config, self.tokenizer, self._ids = config, tokenizer, calib_ids

    def calib_ids(self) -> torch.Tensor:
        if self._ids is None:
            from dataclasses import replace

            from .calibration.data import calibration_ids

            o = self.config.options
            if not isinstance(o, CalibOptions):
                raise LowbitError(f"method {self.config.method!r} has no calibration options")
            if self.tokenizer is None:
                raise LowbitError(f"method {self.config.method!r} needs calibration text: pass the tokenizer")
            self._ids, info = calibration_ids(self.tokenizer, o.calib, nsamples=o.nsamples, seqlen=o.calib_seqlen,
                                              seed=self.config.seed)
            self.config.options = replace(o, calibration=info)
        return self._ids


def _share_tied_codes(model: nn.Module, names: list[str]) -> None:
    """A tied embedding and head quantized alike (same scheme, rows = vocabulary entries) have equal codes and
    scales: keep one copy, which the head's module then shares (memory; the checkpoint stores it once)."""
    from .models.arch import get_module
    from .nn.qlinear import QuantEmbedding, QuantLinear

    mods = [get_module(model, n) for n in names]
    embs = [m for m in mods if type(m) is QuantEmbedding]
    heads = [m for m in mods if type(m) is QuantLinear]
    for e in embs:
        for h in heads:
            if h.scheme != e.scheme or h.bias is not None:
                continue
            pairs = [(b, getattr(e, b), getattr(h, b)) for b in ("qweight", "scales", "qzeros")]
            if all((x is None and y is None) or (x is not None and y is not None and x.shape == y.shape
                                                  and torch.equal(x, y)) for _, x, y in pairs):
                for b, x, _ in pairs:
                    if x is not None:
                        setattr(h, b, x)


def resolve_device(device: str | torch.device | None) -> str:
    """--device: "cpu", "cuda" (or "cuda:N"), or "auto" (cuda when torch sees a GPU, else cpu)."""
    name = str(device or "cpu")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return name
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise LowbitError(f"--device {name}: this torch sees no CUDA GPU (torch {torch.__version__})")
        return name
    raise LowbitError(f"--device {name!r}: choose from cpu, cuda, auto")


def quantize(model: nn.Module, config: QuantConfig, tokenizer=None, calib_ids: torch.Tensor | None = None,
             device: str = "cpu") -> nn.Module:
    """Quantize `model` in place with `config.method`; returns the model.

    The config is checked against its method's spec first, in place (algorithms.registry.resolve): the
    method's default scheme where none is set, the scheme accepted, config.options typed and validated.
    Calibrated methods (gptq, ...) draw windows of calibration text with the
    tokenizer, or take `calib_ids` [nsamples, seqlen] directly. The float weights
    of the quantized layers are released; what was done is recorded in
    `state_of(model).quant` (core/state.py) and written into checkpoints by `save`.
    device: where calibrated methods run their block forwards and math (the model stays on the CPU, each
    block visits the device while it is processed).
    """
    if state_of(model).quant is not None and state_of(model).quant.modules:
        raise LowbitError("model is already quantized")
    from .models.arch import get_module, select_modules, set_module

    spec = resolve(config, preflight=calib_ids is None)
    if spec.needs_calibration(config.options) and calib_ids is None and tokenizer is None:
        raise LowbitError(f"method {spec.name!r} needs calibration text: pass the tokenizer (or calib_ids)")
    torch.manual_seed(config.seed)
    selected = select_modules(model, config.include, config.exclude, tuple(config.overrides))
    lazy = state_of(model).lazy  # float weights still on disk (models/lazy.py)
    if lazy is not None:
        from .models.arch import find_blocks

        # block-sequential methods read each block when they reach it; the rest needs everything now
        skip = tuple(n + "." for n, _ in find_blocks(model)) if spec.streams_blocks else ()
        lazy.materialize(model, skip=skip)
    state_of(model).device = resolve_device(device)
    sink = state_of(model).sink  # a streamed run (quantize_to): finished blocks are on disk only
    with torch.no_grad():
        modules = spec.run(model, config, QuantContext(config, tokenizer, calib_ids))
        if lazy is not None:
            lazy.materialize(model, skip=sink.streamed() if sink is not None else ())  # released or never reached
            state_of(model).lazy = None
        # Selected layers a calibrated method does not reach (outside the decoder blocks: lm_head,
        # embeddings) are rounded to nearest with their scheme, as GPTQ/AWQ implementations do.
        rest = [n for n in selected if n not in modules and isinstance(get_module(model, n), (nn.Linear, nn.Embedding))]
        if rest:
            from .algorithms.rtn import quantize_module

            for n in rest:
                modules[n] = config.scheme_for(n)
                set_module(model, n, quantize_module(get_module(model, n), modules[n]))
            print(f"lowbit: {config.method}: {', '.join(rest)} outside the decoder blocks: rounded to nearest (rtn)",
                  file=sys.stderr)
    if not modules:
        raise LowbitError("no layer matched: nothing was quantized (check --include/--exclude)")
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
        # A quantized head or embedding no longer shares its weight with the other.
        from .models.arch import ARCHITECTURES, GENERIC

        arch = ARCHITECTURES.get(getattr(cfg, "model_type", ""), None)
        tied = set(arch.embeddings + arch.head) if arch else set(GENERIC.head)
        if tied & set(modules):
            cfg.tie_word_embeddings = False
            _share_tied_codes(model, [n for n in (arch.embeddings + arch.head if arch else ()) if n in modules])
    set_quant(model, QuantRecord(config, modules))
    return model


def load(source: str | os.PathLike, dtype: torch.dtype | str = torch.float32, lean: bool = False, lazy: bool = False):
    """Load any MODEL source -> (model, tokenizer). The model is in eval mode, without gradients.
    lean=True (lowbit checkpoints of the LLaMA family): transformers-free skeleton for the lean decoder, no
    tokenizer (runtime/lean.py). lazy=True (float models in safetensors: GGUF conversions, local folders):
    weights stay on disk until materialized part by part (models/lazy.py). Other sources ignore them.
    dtype: of the float weights: a torch dtype, "float32", "bfloat16", "float16", or "auto" (as stored)."""
    return load_model(source, dtype, lazy=lazy, skeleton=lean_skeleton if lean else None)


def quantize_to(model: nn.Module, config: QuantConfig, out: str | os.PathLike, tokenizer=None,
                calib_ids: torch.Tensor | None = None, overwrite: bool = False, resume: bool = False,
                device: str = "cpu", single_file_max: int | None = None) -> Path:
    """Quantize a block-streaming method's model (rtn, gptq, awq; best loaded with lazy=True) straight into
    the checkpoint folder `out`: each finished decoder block is written to disk and freed as it is done,
    with the next block's calibration inputs (formats/stream.py), so memory holds one block, not the model,
    and a run that was killed continues with resume=True from its last finished block, to the same bytes
    as an uninterrupted run. Ctrl-C stops it with a note on how to resume. single_file_max: the checkpoint is
    one lowbit.safetensors up to this many bytes (default 1 GiB), else sharded."""
    from .algorithms.registry import resolve as resolve_spec
    from .core.io import check_output
    from .formats.stream import StreamSink, save_streamed

    spec = resolve_spec(config, preflight=calib_ids is None)
    if not spec.streams_output:
        raise LowbitError(f"method {spec.name} does not write block by block: use quantize() and save()")
    from .core import dist

    if dist.world_size() > 1:  # data-parallel calibration: only rank 0 writes
        if resume:
            raise LowbitError("--resume is not supported under torchrun: resume the run in one process")
        if not dist.is_main():
            quantize(model, config, tokenizer=tokenizer, calib_ids=calib_ids, device=device)
            dist.barrier()
            return Path(out)
    check_output(out, overwrite=overwrite)
    st = state_of(model)
    fingerprint = {"config": config.to_dict(), "source": st.source, "blocks": _block_names(model),
                   "dtype": str(next((p.dtype for p in model.parameters() if p.is_floating_point()), None)),
                   "calib_ids": _digest(calib_ids) if calib_ids is not None else None,
                   "lowbit": _version(), **ZERO_LAYOUT}  # blocks stored in another layout do not resume
    sink = StreamSink(out, fingerprint, resume=resume, overwrite=overwrite)
    st.sink = sink
    try:
        quantize(model, config, tokenizer=tokenizer, calib_ids=calib_ids, device=device)
        try:
            path = save_streamed(model, tokenizer, out, sink, overwrite=overwrite,
                                 **({} if single_file_max is None else {"single_file_max": single_file_max}))
        except LowbitError:  # e.g. OUT made by another run meanwhile: refused, and nothing left beside it
            sink.close()
            shutil.rmtree(sink.dir, ignore_errors=True)
            raise
    except KeyboardInterrupt:
        print(f"\nlowbit: interrupted after {len(sink.blocks)} finished blocks; the state is in {sink.dir}: run the "
              f"same command with --resume to continue", file=sys.stderr)
        sink.close()
        raise
    except BaseException:
        sink.close()
        raise
    finally:
        st.sink = None
    sink.discard()
    if dist.world_size() > 1:
        dist.barrier()
    return path


def _block_names(model: nn.Module) -> list[str]:
    from .models.arch import find_blocks

    return [n for n, _ in find_blocks(model)]


def _digest(t: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def _version() -> str:
    from .core.version import __version__

    return __version__


def save(model: nn.Module, tokenizer, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a lowbit checkpoint folder atomically."""
    return save_checkpoint(model, tokenizer, out, overwrite=overwrite)


def export(model: nn.Module, tokenizer, out: str | os.PathLike, format: str, dtype: str | None = None,
           overwrite: bool = False, **gguf_options) -> dict:
    """Write `model` in an engine's format: compressed-tensors, gptq, awq or gguf (formats/export.py)."""
    from .formats.export import export_model

    return export_model(model, tokenizer, out, format, dtype=dtype, overwrite=overwrite, **gguf_options)


__all__ = ["QuantConfig", "apply_plan", "evaluate", "export", "export_gguf_planned", "generate", "load", "plan_budget",
           "plan_gguf", "quantize", "quantize_to", "resolve_device", "save"]


# ----------------------------------------------------------------------------- budgets (issue 23)

CHECKPOINT_OVERHEAD = 256 * 1024  # config.json (with the plan) and the safetensors header: reserved in size budgets


def plan_budget(model: nn.Module, tokenizer, config: QuantConfig, target_bpw: float | None = None,
                target_size: int | None = None, candidates=None, kl: bool = False, validate: bool = False,
                nsamples: int = 32, seqlen: int = 512, kl_samples: int = 2, kl_layers: int | None = 30,
                progress: bool = True, calib_ids: torch.Tensor | None = None, reuse: dict | None = None,
                error: str = "auto") -> dict:
    """A per-layer scheme plan for the float `model` under a bits-per-weight target (over the layers
    `config` selects) or a size target (bytes of the whole checkpoint: quantized layers, every float tensor
    kept, and a reserve for config.json and the safetensors header). Candidates: the schemes the method
    takes among `candidates` (default: 2/3/4/5/6/8 bits x groups 32/64/128, asymmetric). `kl`: rescale the
    proxy per layer by the KL measured on held-out windows (`validate`: measure it, report the proxy's rank
    correlation on `kl_layers` evenly spaced layers, keep the proxy). `calib_ids`: [N, T] windows to use instead
    of drawing them (the last `kl_samples` are the held-out ones when the KL is measured). `reuse`: a plan whose
    recorded costs are allocated again under this target (nothing measured). `error`: the proxy weighs
    round-to-nearest's error ("nearest") or GPTQ's ("gptq", with the config's percdamp/act_order when its method
    has them); "auto": GPTQ's for the methods that run a GPTQ sweep, round-to-nearest's otherwise; either after
    the method's clip search when it has one (clip_grid)."""
    from .algorithms.budget import candidate_schemes, plan_schemes
    from .calibration.data import calibration_ids
    from .models.arch import select_modules

    spec = resolve(config)
    if (target_bpw is None) == (target_size is None):
        raise LowbitError("give one of --target-bpw and --target-size")
    cands = [s for s in (candidates or candidate_schemes()) if spec.schemes.accepts(s)]
    if len(cands) < 2:
        raise LowbitError(f"method {spec.name} takes fewer than two of the candidate schemes: nothing to choose")
    names = select_modules(model, config.include, config.exclude, tuple(config.overrides))
    if not names:
        raise LowbitError("no layer matched: nothing to plan (check --include/--exclude)")
    weights = sum(model.get_submodule(n).weight.numel() for n in names)
    if target_bpw is not None:
        if not 0 < target_bpw <= 32:
            raise LowbitError(f"--target-bpw must be in (0, 32], got {target_bpw}")
        budget, target = int(target_bpw * weights / 8), {"bpw": target_bpw}
    else:
        skip = {n + ".weight" for n in names}
        seen, fixed, ntensors = set(), 0, 0
        for k, t in model.state_dict().items():
            if k in skip:
                ntensors += 3
                continue
            key = t.untyped_storage().data_ptr()
            ntensors += 1
            if key not in seen:
                seen.add(key)
                fixed += t.numel() * t.element_size()
        budget = target_size - fixed - CHECKPOINT_OVERHEAD - 160 * ntensors
        target = {"size": target_size, "fixed_bytes": fixed, "reserve_bytes": CHECKPOINT_OVERHEAD + 160 * ntensors}
        if budget <= 0:
            raise LowbitError(f"--target-size {target_size:,} B: the float tensors kept alone take {fixed:,} B "
                              "(quantize them too with --include, or give a larger size)")
    if reuse is not None:
        from .algorithms.budget import replan

        planned = set(reuse.get("sensitivity", {}).get("costs", {}))
        if planned and planned != set(names):
            raise LowbitError("the plan's layers are not the layers selected here (check --include/--exclude)")
        out = replan(reuse, budget, target)
        out["method"] = spec.name
        return out
    extra = kl_samples if kl or validate else 0
    if calib_ids is not None:
        if calib_ids.shape[0] <= extra:
            raise LowbitError(f"need more than {extra} calibration windows")
        ids, info, nsamples = calib_ids, {"given": list(calib_ids.shape)}, calib_ids.shape[0] - extra
    else:
        ids, info = calibration_ids(tokenizer, None, nsamples=nsamples + extra, seqlen=seqlen, seed=config.seed)
    held = ids[nsamples:] if extra else None
    ref = candidate_schemes((3,), (128,))[0] if kl or validate else None
    opts = config.options
    gptq = {k: getattr(opts, k) for k in ("percdamp", "act_order", "clip_grid") if hasattr(opts, k)}
    if error == "auto":
        from .algorithms.gptq import GptqSweepOptions

        error = "gptq" if isinstance(opts, GptqSweepOptions) else "nearest"
    plan = plan_schemes(model, names, cands, budget, ids[:nsamples], held, kl=kl, kl_ref=ref, target=target,
                        progress=progress, kl_layers=kl_layers, error=error, gptq=gptq)
    plan["sensitivity"]["calibration"] = info
    plan["method"] = spec.name
    return plan


def apply_plan(model: nn.Module, config: QuantConfig, plan: dict) -> QuantConfig:
    """`config` with the plan's per-layer schemes as exact-name overrides (before any other override) and the
    plan recorded (checkpoints keep it in their quantization_config)."""
    from .algorithms.budget import complete_plan, plan_overrides
    from .models.arch import select_modules

    names = select_modules(model, config.include, config.exclude, tuple(config.overrides))
    overrides = plan_overrides(plan, names)
    plan = complete_plan(plan, {r["name"]: tuple(model.get_submodule(r["name"]).weight.shape) for r in plan["layers"]})
    config.overrides = {**overrides, **{k: v for k, v in config.overrides.items() if k not in overrides}}
    config.budget = plan
    return config


def _second_moments(model: nn.Module, stats: dict) -> dict:
    """{module: E[x xᵀ]} of the linears; a tied embedding gets the head's (llama.cpp's imatrix does the same)."""
    from .models.arch import arch_of

    full = {k: s.H for k, s in stats.items() if s.H is not None}
    table = arch_of(model)
    if getattr(model.config, "tie_word_embeddings", False) and table.embeddings and table.head:
        if table.head[0] in full:
            full[table.embeddings[0]] = full[table.head[0]]
    return full


def plan_gguf(model: nn.Module, tokenizer, calib_ids: torch.Tensor | None, target_size: int | None = None,
              target_bpw: float | None = None, calibrated: bool = False, allowed=None, progress: bool = True,
              reuse: dict | None = None, fill: float = 0.0):
    """A per-tensor GGUF type plan (formats/gguf/budget.py) for the float `model` whose file takes at most
    `target_size` bytes (or `target_bpw` bits per weight over every tensor, header and padding included).
    Returns (plan, stats): the sensitivity statistics double as the calibrated export's imatrix/Hessians.
    `calibrated`: the costs are those of the importance-weighted encoders the calibrated export uses.
    `reuse`: a plan whose recorded costs are allocated again under this target (stats: None).
    `fill`: the file takes at least this fraction of the target (0: the optimum, which may be smaller; see
    core/budget.solve's min_bytes)."""
    from .calibration.sensitivity import layer_statistics
    from .formats.gguf.budget import CANDIDATES, PLAN_KEY, compact_plan, header_bytes, plan_types, tensor_nbytes
    from .formats.gguf.export import export_gguf
    from .models.arch import arch_of

    if (target_size is None) == (target_bpw is None):
        raise LowbitError("give one of --target-bpw and --target-size")
    parts = export_gguf(model, tokenizer, "unused.gguf", "F16", writer_only=True)
    tensors, names, shapes = parts["tensors"], parts["names"], parts["shapes"]
    table = arch_of(model)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    emb = table.embeddings[0] if table.embeddings else None
    head = table.head[0] if table.head else None
    two_d = {hf: t for hf, t in tensors.items() if t.dim() == 2}
    infos = {names[hf]: tuple(t.shape) for hf, t in tensors.items()}
    # the plan's own metadata entry: reserved at its largest (every choice 4 characters, numbers at 20)
    dummy = {"format": "x" * 24, "kind": "gguf", "target": {"size": 10**15, "bpw": 1e15, "fill": 0.12345678901234567},
             "budget_bytes": 10**15,
             "bytes": 10**15, "fixed_bytes": 10**15, "file_bytes": 10**15, "weights": 10**15, "bpw": 1e15,
             "cost": -1.2345678901234567e-300, "lower_bound": -1.2345678901234567e-300,
             "gap": 1.2345678901234567e-300, "exact": False,
             "layers": [{"name": names[hf], "choice": "Q8_0"} for hf in two_d],
             "sensitivity": {"measure": "proxy", "candidates": list(allowed or CANDIDATES),
                             "calibrated_encoders": False,
                             "seconds": {"costs": 1e15, "total": 1e15}}}
    nchars = len(compact_plan(dummy)) + 64  # the recorded plan is padded to this many characters
    parts = export_gguf(model, tokenizer, "unused.gguf", "F16", writer_only=True, extra_kv={PLAN_KEY: "x" * nchars})
    header = header_bytes(parts["new_writer"], infos)
    fixed = header + sum(tensor_nbytes("F32", tuple(t.shape)) for t in tensors.values() if t.dim() != 2)
    weights = sum(t.numel() for t in tensors.values())
    if target_size is None:
        if not 0 < target_bpw <= 32:
            raise LowbitError(f"--target-bpw must be in (0, 32], got {target_bpw}")
        size, target = fixed + int(target_bpw * weights / 8), {"bpw": target_bpw}
    else:
        size, target = target_size, {"size": target_size}
    if not 0 <= fill <= 1:
        raise LowbitError(f"--budget-fill must be a fraction in [0, 1], got {fill}")
    if fill > 0:
        target["fill"] = fill
    if reuse is not None:
        from .formats.gguf.budget import replan_types

        if set(reuse.get("sensitivity", {}).get("costs", {})) != {names[hf] for hf in two_d}:
            raise LowbitError("the plan's tensors are not this model's")
        plan = replan_types(reuse, size, fixed, target)
        plan["plan_chars"] = nchars
        return plan, None
    stats = layer_statistics(model, calib_ids, None, progress=progress)
    imatrix = {k: torch.diagonal(h).clone() for k, h in _second_moments(model, stats).items()} if calibrated else None
    plan = plan_types(two_d, names, stats, size, fixed, head if tied else None, emb, imatrix=imatrix,
                      allowed=tuple(allowed or CANDIDATES), target=target, progress=progress)
    plan["sensitivity"]["calibration_tokens"] = int(calib_ids.numel())
    plan["plan_chars"] = nchars
    return plan, stats


def export_gguf_planned(model: nn.Module, tokenizer, out, plan: dict, calib_ids: torch.Tensor | None = None,
                        stats: dict | None = None, gptq: bool = False, overwrite: bool = False) -> dict:
    """Write the GGUF of a plan: every tensor its planned type, the plan recorded under `lowbit.budget`.
    `calib_ids` (or the planner's `stats`): calibrated blocks (imatrix = diag E[x xᵀ]; `gptq`: the codes by GPTQ)."""
    from .formats.gguf.budget import PLAN_KEY, compact_plan, plan_tensor_types
    from .formats.gguf.export import export_gguf
    from .formats.gguf.mixtures import ALIASES, FILE_TYPES

    imatrix = hessians = None
    if calib_ids is not None:
        if stats is None:
            from .calibration.sensitivity import layer_statistics

            stats = layer_statistics(model, calib_ids)
        full = _second_moments(model, stats)
        if gptq:
            hessians = full
        else:
            imatrix = {k: torch.diagonal(h).clone() for k, h in full.items()}
    elif gptq:
        raise LowbitError("--gptq needs calibration: add --calib default (or --calib FILE)")
    counts: dict[str, int] = {}
    for r in plan["layers"]:
        counts[r["choice"]] = counts.get(r["choice"], 0) + 1
    main = max(counts, key=counts.get)
    ftype = main if main in FILE_TYPES else ALIASES.get(main, "F16")
    record = compact_plan(plan)
    if len(record) > int(plan.get("plan_chars", len(record))):
        raise LowbitError("the plan's metadata outgrew the room reserved for it (plan again)")
    return export_gguf(model, tokenizer, out, ftype, overrides=plan_tensor_types(plan), imatrix=imatrix,
                       hessians=hessians, overwrite=overwrite,
                       extra_kv={PLAN_KEY: record.ljust(int(plan.get("plan_chars", 0)))})
