"""Model files come from strangers: check them before anything is built, allocated, run or handed to C.

One module for every loader path (lowbit checkpoints eager and lean, Hugging Face folders eager and lazy):

    read_json(path)                      a JSON object from a file of bounded size
    check_custom_code(folder, conf)      no `auto_map` in config.json / tokenizer_config.json, a model type that
                                         lowbit or transformers knows: nothing in a folder is ever run
    weight_files(folder)                 {tensor: file} of model.safetensors or its index, every file inside the
                                         folder (no absolute or `..` paths, no symlinks out of it)
    tensor_table(folder)                 {tensor: TensorInfo}: the safetensors headers, each entry checked against
                                         its file (models/safetensors_read.read_header) before anything is read
    check_config(conf, table, label)     config sizes within LIMITS and consistent with the tensor table
                                         (layers present, embedding shape, heads dividing the width)
    check_skeleton(model, table, ...)    every stored tensor against the (meta) model the config implies:
                                         name, dtype, shape (so byte size); aliases only between tensors of one
                                         shape and dtype; nothing missing, nothing unexpected
    check_scales(model, label)           finite scales (and activation scales, rotations) of quantized modules
    check_loading_info(info, label)      what transformers' from_pretrained reports missing/unexpected/mismatched
    preflight(folder, label)             check_custom_code + check_config of a Hugging Face folder, before
                                         transformers reads it
    without_ignored(model, table)        the stored tensors transformers itself drops (for the lazy check)
    check_token_ids(ids, model)          token ids from the tokenizer inside the model's embedding

Every failure is one LowbitError line naming the file (and tensor or field) and the cause.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..core.state import state_of
from .arch import EMBEDDING_SUFFIXES, POSITION_SUFFIXES, STALE_BUFFERS
from ..errors import LowbitError

MAX_JSON_BYTES = 64 << 20  # config.json, tokenizer_config.json, the index: far above any real one

# Upper limits of config sizes: above every released model, far below what exhausts a machine.
LIMITS = {
    "vocab_size": 1 << 22,
    "hidden_size": 1 << 16,
    "intermediate_size": 1 << 19,
    "num_hidden_layers": 1024,
    "num_attention_heads": 4096,
    "num_key_value_heads": 4096,
    "head_dim": 4096,
    "max_position_embeddings": 1 << 20,
}
# architectures whose attention layers each hold a [positions, positions] causal-mask buffer: positions bounded
# so that those buffers stay what the real models need (GPT-Neo 2048, StarCoder 8192)
QUADRATIC_POSITIONS = {"gpt_neo": 1 << 13, "gpt_bigcode": 1 << 13, "imagegpt": 1 << 13, "openai-gpt": 1 << 13,
                       "clvp": 1 << 13}
# other spellings of the same fields (GPT-2, OPT, ...)
SYNONYMS = {
    "n_embd": "hidden_size", "d_model": "hidden_size", "n_layer": "num_hidden_layers",
    "num_layers": "num_hidden_layers", "n_head": "num_attention_heads", "n_inner": "intermediate_size",
    "ffn_dim": "intermediate_size", "n_positions": "max_position_embeddings",
}

FLOAT_FIELDS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "rope_theta", "factor")  # positive and finite

FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
DTYPE_NAMES = {"F64": torch.float64, **FLOATS, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
               "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}

_LAYER = re.compile(r"^((?:\w+\.)*?(?:layers|layer|h|blocks))\.(\d+)\.")


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors name: F32, U8, ...
    shape: tuple[int, ...]
    file: Path


def read_json(path: Path) -> dict:
    """The JSON object in `path` (at most MAX_JSON_BYTES), or a one-line LowbitError naming the file."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
    except OSError as e:
        raise LowbitError(f"{path}: cannot read: {e.strerror}") from None
    if len(raw) > MAX_JSON_BYTES:
        raise LowbitError(f"{path}: larger than {MAX_JSON_BYTES >> 20} MiB: not a model's JSON file")
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise LowbitError(f"{path}: unreadable JSON ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(obj, dict):
        raise LowbitError(f"{path}: not a JSON object")
    return obj


def _known_model_type(model_type) -> bool:
    from .arch import ARCHITECTURES

    if isinstance(model_type, str) and model_type in ARCHITECTURES:
        return True  # known without importing transformers (the lean runtime's loader avoids it)
    try:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    except ImportError:
        return False
    return isinstance(model_type, str) and model_type in CONFIG_MAPPING


def check_custom_code(folder: Path, conf: dict | None = None) -> None:
    """Refuse a folder that needs code of its own to load (transformers' `auto_map`, or a model type it does
    not know): lowbit never runs code from a model folder and never asks whether to."""
    folder = Path(folder)
    if conf is None:
        conf = read_json(folder / "config.json")
    tok_conf = folder / "tokenizer_config.json"
    for path, c in ((folder / "config.json", conf), (tok_conf, read_json(tok_conf) if tok_conf.is_file() else {})):
        if "auto_map" in c or any(isinstance(v, dict) and "auto_map" in v for v in c.values()):
            raise LowbitError(f"{path}: auto_map: the model needs custom code from its folder, which lowbit never runs")
    model_type = conf.get("model_type")
    if not _known_model_type(model_type):
        raise LowbitError(f"{folder / 'config.json'}: model_type {model_type!r} is not one transformers knows: "
                          "the model needs custom code, which lowbit never runs")


def _inside(folder: Path, name, label: str) -> Path:
    """folder/name, refused unless it is a relative path that stays inside the folder (symlinks resolved)."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise LowbitError(f"{label}: {name!r} is not a file name")
    if len(name) > 4096 or any(len(part.encode("utf-8", "surrogatepass")) > 255 for part in Path(name).parts):
        raise LowbitError(f"{label}: {name[:40]!r}... is not a file name (longer than the file system allows)")
    if os.path.isabs(name) or ".." in Path(name).parts:
        raise LowbitError(f"{label}: {name!r} points outside the model folder")
    path = folder / name
    try:
        real, root = path.resolve(strict=False), folder.resolve(strict=True)
    except (OSError, RuntimeError) as e:
        raise LowbitError(f"{label}: {name!r}: cannot resolve ({e})") from None
    if real != root and root not in real.parents:
        raise LowbitError(f"{label}: {name!r} is a link to {real}, outside the model folder")
    return path


def weight_files(folder: Path, single_name: str = "model.safetensors") -> dict[str, Path]:
    """{tensor name: safetensors file} of a folder: its index `<single_name>.index.json` (sharded) or its
    single weights file (`single_name`: model.safetensors; lowbit checkpoints store lowbit.safetensors),
    every file confined to the folder."""
    folder = Path(folder)
    index = folder / f"{single_name}.index.json"  # model.safetensors.index.json, lowbit.safetensors.index.json
    if index.is_file():
        wm = read_json(index).get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise LowbitError(f"{index}: no weight_map")
        files: dict[str, Path] = {}
        paths: dict[str, Path] = {}
        for k, f in wm.items():
            if f not in paths:
                paths[f] = _inside(folder, f, str(index))
            files[k] = paths[f]
        return files
    single = folder / single_name
    if not single.is_file():
        raise LowbitError(f"{folder}: no {single_name} (lowbit reads safetensors weights only; "
                          "it never unpickles .bin files)")
    _inside(folder, single.name, str(folder))
    return {"": single}  # every tensor of the one file (tensor_table fills the names in)


def file_table(path: Path) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file, each entry checked against the file's size."""
    from .safetensors_read import read_header

    try:
        with open(path, "rb") as f:
            header, _ = read_header(f, str(path))
    except OSError as e:
        raise LowbitError(f"{path}: cannot read: {e.strerror}") from None
    return {k: TensorInfo(e["dtype"], tuple(e["shape"]), Path(path)) for k, e in header.items()}


def tensor_table(folder: Path, single_name: str = "model.safetensors") -> dict[str, TensorInfo]:
    """{tensor: TensorInfo} of every tensor a folder's safetensors hold (sharded or not); an index that names
    a tensor its file does not hold, or files that hold a tensor twice, are refused."""
    files = weight_files(folder, single_name)
    if "" in files:
        return file_table(files[""])
    by_file: dict[Path, list[str]] = {}
    for k, p in files.items():
        by_file.setdefault(p, []).append(k)
    table: dict[str, TensorInfo] = {}
    for p, keys in by_file.items():
        if not p.is_file():
            raise LowbitError(f"{p}: missing (named by model.safetensors.index.json)")
        got = file_table(p)
        for k in keys:
            if k not in got:
                raise LowbitError(f"{p}: no tensor {k} (model.safetensors.index.json says it is there)")
            table[k] = got[k]
    return table


# ---- config ------------------------------------------------------------------------------------------------

def _fields(conf: dict) -> dict[str, object]:
    """The size fields of a config (top level), under their canonical names."""
    out = {}
    for key, value in conf.items():
        name = SYNONYMS.get(key, key)
        if name in LIMITS and (name not in out or value is not None):
            out[name] = (key, value)
    return out


def check_config(conf: dict, table: dict[str, TensorInfo] | None, label: str) -> None:
    """Sizes within LIMITS (positive integers), heads that divide the width, and agreement with the tensors the
    files hold: decoder layers 0..n-1 present for num_hidden_layers = n, the embedding [vocab, hidden]. Run
    before the model is built: a config may ask for 20000 layers or a 10^9-entry vocabulary."""
    for sub_key, sub in [("", conf)] + [(k + ".", v) for k, v in conf.items() if k.endswith("_config") and isinstance(v, dict)]:
        for name, (key, value) in _fields(sub).items():
            if value is None and name in ("head_dim", "intermediate_size", "num_key_value_heads"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LowbitError(f"{label}: {sub_key}{key}: {value!r} is not a positive integer")
            if value > LIMITS[name]:
                raise LowbitError(f"{label}: {sub_key}{key}: {value} exceeds lowbit's limit of {LIMITS[name]}")
    for prefix, sub in (("", conf), ("rope_parameters.", conf.get("rope_parameters")),
                        ("rope_scaling.", conf.get("rope_scaling"))):
        for key_ in FLOAT_FIELDS if isinstance(sub, dict) else ():
            value = sub.get(key_)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0 < value < float("inf")):
                raise LowbitError(f"{label}: {prefix}{key_}: {value!r} is not a positive number")
    f = {k: v for k, (_, v) in _fields(conf).items() if v is not None}
    key = {k: kk for k, (kk, _) in _fields(conf).items()}
    positions, cap = f.get("max_position_embeddings"), QUADRATIC_POSITIONS.get(conf.get("model_type"))
    if positions is not None and cap is not None and positions > cap:
        raise LowbitError(f"{label}: {key['max_position_embeddings']}: {positions} exceeds lowbit's limit of {cap} "
                          f"for {conf.get('model_type')} (a mask of positions x positions per layer)")
    heads, hidden = f.get("num_attention_heads"), f.get("hidden_size")
    kv = f.get("num_key_value_heads")
    if heads and kv and heads % kv:
        raise LowbitError(f"{label}: {key['num_attention_heads']} {heads} is not a multiple of "
                          f"{key['num_key_value_heads']} {kv}")
    if heads and hidden and not f.get("head_dim") and hidden % heads:  # (a given head_dim: any width)
        raise LowbitError(f"{label}: {key['hidden_size']} {hidden} is not a multiple of "
                          f"{key['num_attention_heads']} {heads}")
    if not table:
        return
    n_layers = f.get("num_hidden_layers")
    if n_layers is not None:
        stacks: dict[str, set[int]] = {}
        for name in table:
            m = _LAYER.match(name)
            if m:
                stacks.setdefault(m.group(1), set()).add(int(m.group(2)))
        if stacks:
            prefix, found = max(stacks.items(), key=lambda kv_: len(kv_[1]))
            if found != set(range(n_layers)):
                extra = sorted(found - set(range(n_layers)))
                missing = sorted(set(range(n_layers)) - found)
                detail = f"no {prefix}.{missing[0]}" if missing else f"{prefix}.{extra[0]} beyond them"
                raise LowbitError(f"{label}: {key['num_hidden_layers']} is {n_layers}, but the weights hold "
                                  f"{len(found)} layers ({detail})")
    vocab = f.get("vocab_size")
    for name, info in table.items():
        if name.endswith(POSITION_SUFFIXES) and positions:
            if len(info.shape) == 2 and not positions <= info.shape[0] <= positions + 2:  # (OPT: 2 more rows)
                raise LowbitError(f"{label}: {key['max_position_embeddings']} is {positions}, but {name} has "
                                  f"{info.shape[0]} rows")
        if name.endswith(EMBEDDING_SUFFIXES) and len(info.shape) == 2:
            if vocab is not None and info.shape[0] != vocab:
                raise LowbitError(f"{label}: vocab_size is {vocab}, but {name} has {info.shape[0]} rows")
            projected = "word_embed_proj_dim" in conf or "embedding_size" in conf  # OPT-350m, ALBERT: [vocab, e]
            if hidden is not None and not projected and info.dtype in FLOATS and info.shape[1] != hidden:
                raise LowbitError(f"{label}: {key['hidden_size']} is {hidden}, but {name} is {list(info.shape)}")


# ---- tensors against the model -----------------------------------------------------------------------------

def _fixed_dtype(owner: nn.Module, attr: str) -> bool:
    """Buffers whose dtype the module defines (packed codes, scales, zero points, activation scales,
    rotations of quantized modules): stored exactly so. Other float tensors may be stored in any float dtype."""
    from ..nn.qlinear import _PackedWeight

    return isinstance(owner, _PackedWeight) and attr != "bias"


def _desc(dtype, shape) -> str:
    return f"{dtype} {list(shape)}"


def check_skeleton(model: nn.Module, table: dict[str, TensorInfo], aliases: dict | None, label: str,
                   implied_ties: bool = False, uniform_floats: bool = True) -> None:
    """Every tensor of `model` (built on the meta device from the config) against what the files hold.

    A stored tensor must be one the model has (no unexpected names), with the model's shape and, for packed
    codes/scales/zero points, its exact dtype (other float tensors: float32, float16 or bfloat16, one dtype for
    all with uniform_floats). Aliases (name -> stored name) only between tensors of one shape and dtype, to a
    tensor that is stored. Every tensor of the model must be stored or aliased (implied_ties: or be the very
    tensor object of another that is, as transformers ties embeddings) -- never left to a random init."""
    aliases = aliases or {}
    if not isinstance(aliases, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
        raise LowbitError(f"{label}: aliases must map tensor names to tensor names")
    expected: dict[str, tuple[torch.Tensor, bool]] = {}
    same: dict[int, list[str]] = {}
    modules = dict(model.named_modules(remove_duplicate=False))
    for name, t in model.state_dict(keep_vars=True).items():
        owner_name, _, attr = name.rpartition(".")
        owner = modules.get(owner_name)
        expected[name] = (t, owner is not None and _fixed_dtype(owner, attr))
        same.setdefault(id(t), []).append(name)
    for name in table:
        if name not in expected:
            raise LowbitError(f"{label}: {name}: unexpected tensor (the model has no such parameter)")
    floats = set()
    for name, info in table.items():
        t, fixed = expected[name]
        dtype = DTYPE_NAMES.get(info.dtype)
        if tuple(info.shape) != tuple(t.shape):
            raise LowbitError(f"{label}: {name}: stored as {_desc(info.dtype, info.shape)}, the model needs shape "
                              f"{list(t.shape)}")
        if fixed or not t.is_floating_point():
            if dtype != t.dtype:
                raise LowbitError(f"{label}: {name}: stored as {info.dtype}, the model needs {t.dtype}")
        elif info.dtype not in FLOATS:
            raise LowbitError(f"{label}: {name}: stored as {info.dtype}, the model needs a float tensor")
        else:
            floats.add(info.dtype)
    if uniform_floats and len(floats) > 1:
        raise LowbitError(f"{label}: float tensors stored in several dtypes ({', '.join(sorted(floats))})")
    for name, target in aliases.items():
        if name not in expected or target not in expected:
            bad = name if name not in expected else target
            raise LowbitError(f"{label}: alias {name} -> {target}: the model has no tensor {bad}")
        if name in table:
            raise LowbitError(f"{label}: alias {name} -> {target}: {name} is stored too")
        if target not in table:
            raise LowbitError(f"{label}: alias {name} -> {target}: {target} is not stored")
        (a, fa), (b, fb) = expected[name], expected[target]
        info = table[target]
        if tuple(a.shape) != tuple(b.shape) or a.dtype != b.dtype or fa != fb:
            raise LowbitError(f"{label}: alias {name} -> {target}: {name} is {_desc(a.dtype, a.shape)}, "
                              f"{target} is {_desc(info.dtype, info.shape)}")
    for name in expected:
        if name in table or name in aliases:
            continue
        if implied_ties and any(n in table for n in same[id(expected[name][0])]):
            continue
        raise LowbitError(f"{label}: {name}: missing (the weights do not hold it, and lowbit never initializes "
                          "a weight at random)")


def without_ignored(model: nn.Module, table: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
    """The table without the stored tensors that transformers itself drops when it loads this model (its
    `_keys_to_ignore_on_load_unexpected` patterns; old checkpoints' rotary_emb.inv_freq and position_ids
    buffers), so that a lazy load accepts what an eager one does."""
    patterns = [*(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()), *STALE_BUFFERS]
    names = set(model.state_dict(keep_vars=True))
    return {k: v for k, v in table.items() if k in names or not any(re.search(p, k) for p in patterns)}


def check_scales(model: nn.Module, label: str) -> None:
    """Scales (and W8A8 activation scales and rotation factors) of quantized modules must be finite: a NaN or
    Inf scale turns every output of its layer into NaN."""
    from ..nn.qlinear import _PackedWeight

    for name, mod in model.named_modules():
        if not isinstance(mod, _PackedWeight):
            continue
        for attr in ("scales", "input_scale", "rot_a", "rot_b"):
            t = getattr(mod, attr, None)
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise LowbitError(f"{label}: {name}.{attr}: NaN or Inf")


def check_loading_info(info: dict, label: str) -> None:
    """transformers' output_loading_info: any weight missing (left at a random init), unexpected (dropped) or
    of another shape is an error."""
    parts = []
    for what, key in (("missing", "missing_keys"), ("unexpected", "unexpected_keys"), ("of another shape", "mismatched_keys")):
        keys = sorted(str(k if not isinstance(k, tuple) else k[0]) for k in (info.get(key) or ()))
        if keys:
            more = f" and {len(keys) - 2} more" if len(keys) > 2 else ""
            parts.append(f"{what}: {', '.join(keys[:2])}{more}")
    if parts:
        raise LowbitError(f"{label}: the weights do not match the model ({'; '.join(parts)}); lowbit never "
                          "initializes a weight at random")


def preflight(folder: Path, label: str) -> dict[str, TensorInfo]:
    """Before transformers reads a local folder: no custom code, a bounded config consistent with the weights'
    tensor table (returned), every weight file inside the folder."""
    folder = Path(folder)
    conf = read_json(folder / "config.json")
    check_custom_code(folder, conf)
    table = tensor_table(folder)
    packed = next((k for k in table if k.endswith(".qweight")), None)
    if packed is not None:
        raise LowbitError(f"{folder / 'config.json'}: no lowbit quantization_config, but the weights hold packed "
                          f"codes ({packed}): a lowbit checkpoint without its quantization table")
    check_config(conf, table, str(folder / "config.json"))
    return table


def check_token_ids(ids: torch.Tensor, model: nn.Module) -> None:
    """Token ids from the folder's tokenizer must index the model's embedding: a tokenizer.json of more tokens
    than vocab_size is refused with one line (not an IndexError deep in a forward)."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, int) and ids.numel() and int(ids.max()) >= vocab:
        raise LowbitError(f"{state_of(model).source or 'model'}: the tokenizer gives token id {int(ids.max())}, "
                          f"but the model has {vocab} embeddings (tokenizer and weights do not belong together)")
