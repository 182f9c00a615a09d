"""lowbit checkpoint: a folder a Hugging Face user recognises.

    config.json          the model's config + "quantization_config" (quant_method "lowbit"):
                         method, default scheme, per-layer schemes where they differ,
                         include/exclude, seed, options, lowbit version, checksum
    lowbit.safetensors   float tensors as they are; per quantized module `<name>.qweight`
                         (packed codes), `<name>.scales`, `<name>.qzeros` (asymmetric)
    tokenizer files, generation_config.json

Tensors that share storage (tied embeddings) are written once; the others are
recorded as aliases. Loading rebuilds the architecture on the meta device, puts
quantized modules in place and assigns the stored tensors, so logits after load
are bitwise those before save. Nothing is unpickled.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..core.config import QuantConfig
from ..core.packing import zero_points_nbytes
from ..core.scheme import Scheme
from ..core.state import QuantRecord, state_of, set_quant
from ..core.version import __version__
from ..errors import LowbitError
from ..models.arch import set_module
from ..core.io import atomic_path, write_safetensors
from ..nn.kinds import MODULE_KINDS

# Not model.safetensors: transformers, vLLM and the other engines, which cannot run these tensors, then find no
# weights and refuse the folder, instead of filling the model with random weights (checkpoints written before
# this change, with model.safetensors, still load here).
WEIGHTS = "lowbit.safetensors"
LEGACY_WEIGHTS = "model.safetensors"
INDEX = WEIGHTS + ".index.json"  # a streamed checkpoint's shards (formats/stream.py)
# qzeros: one packed row per module (nn/qlinear.py); checkpoints without this entry stored one per weight row
ZERO_LAYOUT = {"zero_point_layout": "flat"}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    seen: dict[tuple, str] = {}
    out, aliases = {}, {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        out[name] = t.detach().contiguous()
    return out, aliases


def save_checkpoint(model: nn.Module, tokenizer, out: str | os.PathLike, overwrite: bool = False) -> Path:
    record = state_of(model).quant or QuantRecord(None, {})
    cfg: QuantConfig | None = record.config
    modules: dict[str, Scheme] = record.modules
    default = cfg.scheme if cfg is not None else None
    layers = {}
    for name, scheme in modules.items():
        entry = layer_entry(model.get_submodule(name))
        if scheme != default:
            entry["scheme"] = scheme.to_dict()
        layers[name] = entry
    state, aliases = _dedupe(model.state_dict())
    with atomic_path(out, overwrite=overwrite) as tmp:
        # safetensors' save_file writes a metadata map of several keys in no fixed order: the same
        # checkpoint saved by two processes would differ in its header bytes
        write_safetensors(tmp / WEIGHTS, state, {"format": "pt", "producer": f"lowbit {__version__}"})
        qc = {
            "quant_method": "lowbit",
            "lowbit_version": __version__,
            **ZERO_LAYOUT,
            **(cfg.to_dict() if cfg is not None else {"method": "none"}),
            "layers": layers,
            "aliases": aliases,
            "weights_sha256": _sha256(tmp / WEIGHTS),
        }
        write_side_files(model, tokenizer, tmp, qc)
    return Path(out)


def layer_entry(mod: nn.Module) -> dict:
    """A quantized module's record in the layer table (without its scheme)."""
    entry = {"kind": getattr(mod, "kind", "linear")}  # the on-disk kind names of nn/kinds.py
    if hasattr(mod, "entry"):
        entry.update(mod.entry())
    if getattr(mod, "rel_error", None) is not None:
        entry["rel_error"] = mod.rel_error
    return entry


def write_side_files(model: nn.Module, tokenizer, tmp: Path, qc: dict) -> None:
    """config.json (with `qc` as its quantization_config and the table's checksum), generation config,
    tokenizer files."""
    qc["table_sha256"] = table_sha256(qc)
    conf = model.config.to_dict()
    conf["quantization_config"] = qc
    (tmp / "config.json").write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
    save_companions(tmp, model, tokenizer)


def save_companions(folder: Path, model: nn.Module, tokenizer) -> None:
    """The files beside a model's weights and config: its generation config (where transformers can write
    it) and the tokenizer's files."""
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        try:
            gen.save_pretrained(folder)
        except Exception:
            pass
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))


def table_sha256(qc: dict) -> str:
    """sha256 of the quantization table (method, schemes, layers, aliases, weights checksum): the config.json
    half of what weights_sha256 is for the tensors. A scheme edited in place (a group size of 33 for 32 gives
    scales of the same shape) would otherwise load as other weights."""
    body = {k: v for k, v in qc.items() if k != "table_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _bad(folder: Path, why: str) -> LowbitError:
    why = " ".join(why.split())  # one line, whatever transformers' message held
    return LowbitError(f"{folder}: corrupt or incomplete lowbit checkpoint ({why})")


def _build(model_type: str, conf: dict, skeleton):
    """The empty model (meta tensors): the skeleton's where one is given and it applies, else transformers'."""
    if skeleton is not None:
        model = skeleton(model_type, conf)
        if model is not None:
            return model
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **conf)
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=False)


def load_checkpoint(folder: str | os.PathLike, skeleton=None):
    """(model, tokenizer) of a lowbit checkpoint. skeleton(model_type, config dict) -> an empty model, or None
    where it does not apply (then transformers' class): runtime/lean.py's lean_skeleton for LLaMA-family
    models (no transformers import; runs only through the lean decoder); with a skeleton, no tokenizer.

    Nothing is trusted before it is checked (models/validate.py): the config's sizes against limits and the
    tensor table, every stored tensor against the skeleton the config and layer table imply, the aliases,
    finite scales; no custom code."""
    from ..models import validate

    folder = Path(folder)
    try:
        conf = validate.read_json(folder / "config.json")
        qc = conf.pop("quantization_config")
        if qc.get("table_sha256") != table_sha256(qc):
            raise LowbitError("quantization_config does not match its checksum (table_sha256): edited or corrupt")
        cfg = QuantConfig.from_dict(qc) if qc.get("method", "none") != "none" else None
        model_type = conf.pop("model_type")
    except (ValueError, KeyError, TypeError, AttributeError, LowbitError) as e:
        raise _bad(folder, f"config.json: {e}") from None
    validate.check_custom_code(folder, {**conf, "model_type": model_type})
    weights = folder / WEIGHTS
    sharded = (folder / INDEX).is_file() and isinstance(qc.get("weights_sha256"), dict)
    if not sharded and not weights.is_file() and (folder / LEGACY_WEIGHTS).is_file():
        weights = folder / LEGACY_WEIGHTS
    if not sharded and not weights.is_file():
        raise _bad(folder, f"{WEIGHTS} is missing")
    # headers checked against the files; the files inside the folder
    table = validate.tensor_table(folder, weights.name)
    files = sorted({info.file for info in table.values()}) if sharded else [weights]
    if sharded:  # a streamed checkpoint (formats/stream.py): every shard has its checksum
        shas = qc["weights_sha256"]
        if sorted(shas) != sorted(p.name for p in files):
            raise _bad(folder, f"{INDEX} and the recorded checksums name different files")
        for p in files:
            if _sha256(p) != shas[p.name]:
                raise _bad(folder, f"{p.name} does not match its checksum: truncated or modified")
    elif _sha256(weights) != qc.get("weights_sha256"):
        raise _bad(folder, f"{WEIGHTS} does not match its checksum: truncated or modified")
    validate.check_config(conf, table, str(folder / "config.json"))
    try:
        model = _build(model_type, conf, skeleton)
    except Exception as e:
        raise _bad(folder, f"cannot build {model_type}: {type(e).__name__}: {e}") from None
    modules: dict[str, Scheme] = {}
    layout = qc.get("zero_point_layout")
    if layout not in (None, ZERO_LAYOUT["zero_point_layout"]):
        raise _bad(folder, f"unknown zero_point_layout {layout!r}")
    legacy_zeros = layout is None
    try:
        layers = qc.get("layers", {})
        if not isinstance(layers, dict):
            raise LowbitError("layers is not a table")
        for name, entry in layers.items():
            scheme = Scheme.from_dict(entry["scheme"]) if "scheme" in entry else cfg.scheme
            old = model.get_submodule(name)
            kind = entry.get("kind", "linear")
            if name in modules or not isinstance(old, (nn.Linear, nn.Embedding)):
                raise LowbitError(f"{name!r} is not a float linear or embedding of the model")
            if kind not in MODULE_KINDS:
                raise LowbitError(f"unknown layer kind {kind!r} of {name}")
            new = MODULE_KINDS[kind].from_entry(entry, old, scheme)
            if legacy_zeros and hasattr(new, "legacy_zero_layout"):
                new.legacy_zero_layout()
            rel = entry.get("rel_error")
            if rel is not None and (isinstance(rel, bool) or not isinstance(rel, (int, float))
                                    or not 0 <= rel < float("inf")):
                raise LowbitError(f"rel_error of {name} is {rel!r}, not a finite number >= 0")
            new.rel_error = None if rel is None else float(rel)
            set_module(model, name, new)
            modules[name] = scheme
    except (AttributeError, KeyError, TypeError, ValueError, LowbitError) as e:
        raise _bad(folder, f"layer table: {e}") from None
    aliases = qc.get("aliases", {})
    # every tensor against the module it fills, before any is read (a wrong size here would reach C)
    validate.check_skeleton(model, table, aliases, str(folder / INDEX) if sharded else str(weights))
    state = {}
    for p in files:
        try:
            with safe_open(str(p), framework="pt") as f:
                state.update({k: f.get_tensor(k) for k in f.keys()})
        except (SafetensorError, OSError) as e:
            raise _bad(folder, f"{p.name}: {e}") from None
    try:
        result = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        raise _bad(folder, str(e).splitlines()[0]) from None
    missing = [k for k in result.missing_keys if k not in aliases]
    if missing or result.unexpected_keys:
        raise _bad(folder, f"missing tensors {missing[:3]} unexpected {result.unexpected_keys[:3]}")
    for name, target in aliases.items():
        owner, _, attr = name.rpartition(".")
        t_owner, _, t_attr = target.rpartition(".")
        setattr(model.get_submodule(owner), attr, getattr(model.get_submodule(t_owner), t_attr))
    for n, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_meta:
            raise _bad(folder, f"tensor {n} was not stored")
    if legacy_zeros:  # repacked once per stored tensor: aliased (tied) modules keep sharing it
        done: dict[int, torch.Tensor] = {}
        for name in modules:
            m = model.get_submodule(name)
            if getattr(m, "qzeros", None) is not None and m.qzeros.dim() == 2:
                key = m.qzeros.data_ptr()
                if key not in done:
                    m.from_legacy_zero_layout()
                    done[key] = m.qzeros
                m.qzeros = done[key]
                if m.qzeros.numel() != zero_points_nbytes(*m.scales.shape, m.scheme.bits):  # tied, other scheme
                    raise _bad(folder, f"{name}.qzeros is shared with a module of another zero-point table size")
    validate.check_scales(model, str(weights))
    set_quant(model, QuantRecord(cfg, modules))
    if skeleton is not None:
        return model, None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except Exception:
        tok = None
    try:
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(folder), trust_remote_code=False)
    except Exception:
        pass
    return model, tok
