"""What the engines' formats (compressed-tensors, GPTQ, AWQ) share: one quantized linear as plain integers,
the checks every export makes, the float tensors beside the packed ones, writing a folder atomically, and
building a lowbit model from a folder someone else wrote.

A quantized linear of lowbit (nn/qlinear.py) holds unsigned codes u in [0, 2^k) and, per (row, group), a
scale s and a zero point z_u, with w = s * (u - z_u): z_u is the stored zero point (asymmetric) or 2^(k-1)
(symmetric). The formats below store exactly these integers, packed differently (their modules say how), so
an export copies codes and never rounds anything again, and reading a folder back gives the same codes.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..core.packing import pack, pack_zero_points, unpack
from ..core.scheme import Scheme
from ..core.version import __version__
from ..errors import LowbitError
from ..models.arch import EMBEDDING_SUFFIXES, arch_of, set_module
from ..nn.int8 import ActQuant, Int8OutlierLinear, W8A8Linear
from ..nn.qlinear import QuantEmbedding, QuantLinear
from ..core.state import QuantRecord, state_of, set_quant
from ..core.io import atomic_path
from .checkpoint import save_companions

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
ENGINE_GROUPS = (32, 64, 128, 256)  # group sizes the engines' int4/int8 kernels tile


def option(cfg, key: str, default=None):
    """One option of a recorded QuantConfig: its options are a mapping (read from a checkpoint or an imported
    folder) or the method's typed Options object (quantized in this process)."""
    if cfg is None:
        return default
    opts = cfg.options
    return opts.get(key, default) if isinstance(opts, dict) else getattr(opts, key, default)


@dataclass
class IntLinear:
    """One quantized linear as integers: u [out, in] int32 codes in [0, 2^bits), scales [out, G] (their stored
    dtype), zeros [out, G] int32 (z_u: 2^(bits-1) everywhere when symmetric), group = columns per scale."""

    name: str
    bits: int
    symmetric: bool
    group: int
    u: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bias: torch.Tensor | None
    channel: bool = False  # one scale per row (the formats' "channel" strategy, group_size -1)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.u.shape)

    def dequantize(self) -> torch.Tensor:
        """float32 [out, in] (for tests and checks)."""
        out, cols = self.shape
        idx = torch.arange(cols) // self.group
        return (self.u - self.zeros[:, idx]).float() * self.scales.float()[:, idx]


def int_linear(name: str, mod: QuantLinear) -> IntLinear:
    """The integers of a QuantLinear (per-channel: one group of in_features columns)."""
    s = mod.scheme
    out, cols = mod.out_features, mod.in_features
    u = unpack(mod.qweight, s.bits, cols).to(torch.int32)
    scales = mod.scales
    if s.granularity == "tensor":
        scales = scales.expand(out, 1).contiguous()
    G = scales.shape[1]
    if s.symmetric:
        zeros = torch.full((out, G), 1 << (s.bits - 1), dtype=torch.int32)
    else:
        zeros = mod.zero_points()
        if zeros.shape[0] != out:
            zeros = zeros.expand(out, G).contiguous()
    b = mod.bias.detach() if mod.bias is not None else None
    return IntLinear(name, s.bits, s.symmetric, s.group_len(cols), u, scales.detach(), zeros, b,
                     channel=s.granularity != "group")


def scheme_of(lin: IntLinear, scale_dtype: torch.dtype) -> Scheme:
    cols = lin.shape[1]
    name = next(k for k, v in DTYPES.items() if v == scale_dtype)
    if lin.channel:
        return Scheme(bits=lin.bits, symmetric=lin.symmetric, granularity="channel", scale_dtype=name)
    return Scheme(bits=lin.bits, symmetric=lin.symmetric, granularity="group", group_size=lin.group, scale_dtype=name)


def quant_linear(lin: IntLinear, scheme: Scheme, dtype: torch.dtype = torch.float32) -> QuantLinear:
    """A QuantLinear holding exactly these integers (no rounding)."""
    out, cols = lin.shape
    m = QuantLinear(cols, out, scheme, bias=lin.bias is not None, device="meta", dtype=dtype)
    m.qweight = pack(lin.u, lin.bits)
    m.scales = lin.scales.to(scheme.torch_scale_dtype).contiguous()
    if not scheme.symmetric:
        m.qzeros = pack_zero_points(lin.zeros, lin.bits)
    if lin.bias is not None:
        m.bias = nn.Parameter(lin.bias.to(dtype), requires_grad=False)
    m._kcache = {}
    return m


def divisor_hint(cols: int) -> str:
    ok = [g for g in ENGINE_GROUPS if cols % g == 0]
    return ", ".join(map(str, ok)) + " or -1 (per channel)" if ok else "-1 (per channel)"


def check_group(name: str, mod: QuantLinear, fmt: str) -> None:
    s = mod.scheme
    if s.granularity == "group" and mod.in_features % s.group_size:
        raise LowbitError(f"{fmt}: {name} has in_features {mod.in_features}, not a multiple of group size "
                          f"{s.group_size} (engines need whole groups); quantize with --group-size "
                          f"{divisor_hint(mod.in_features)}")


def quantized_modules(model: nn.Module, fmt: str) -> dict[str, nn.Module]:
    """{name: module} of the quantized layers, refusing what no engine format holds (quantized embeddings or
    head, LLM.int8()'s float outlier columns)."""
    record = state_of(model).quant or QuantRecord(None)
    names = list(record.modules) or [n for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))]
    if not names:
        raise LowbitError(f"{fmt}: the model is not quantized (quantize it first, or export it as gguf)")
    head = set(arch_of(model).head)
    out = {}
    for n in names:
        m = model.get_submodule(n)
        if isinstance(m, QuantEmbedding) or n in head:
            raise LowbitError(f"{fmt}: {n} is quantized; the engines load quantized embeddings and heads from "
                              f"this format only in float: quantize without it (leave embeddings and lm_head float)")
        if isinstance(m, Int8OutlierLinear):
            raise LowbitError(f"{fmt}: {n} is LLM.int8() (outlier columns in float at run time): no equivalent in "
                              f"this format; use lowbit's checkpoint, or export w8a8 --no-rotate")
        if not isinstance(m, QuantLinear):
            raise LowbitError(f"{fmt}: {n} is a {type(m).__name__}: no equivalent in this format")
        out[n] = m
    return out


def float_state(model: nn.Module, skip: set[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's other tensors (embeddings, norms, float linears) as HF names them, in `dtype`; a tied head
    is left out, as save_pretrained leaves it out."""
    cfg = getattr(model, "config", None)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    out = {}
    for k, t in model.state_dict().items():
        owner = k.rpartition(".")[0]
        if owner in skip:
            continue
        if tied and owner in arch_of(model).head:
            continue
        out[k] = t.detach().to(dtype).contiguous() if t.is_floating_point() else t.detach().contiguous()
    return out


def export_dtype(model: nn.Module, dtype: str | None, scale_dtypes: set[torch.dtype]) -> torch.dtype:
    """The float tensors' dtype: asked for, else the one the model was read in (a foreign folder), else the
    scales' dtype (engines compute in the model's dtype and cast scales to it: fp16 scales stay exact)."""
    if dtype and dtype != "auto":
        if dtype not in DTYPES:
            raise LowbitError(f"--dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
        return DTYPES[dtype]
    cfg = (state_of(model).quant or QuantRecord(None)).config
    src = option(cfg, "source") or {}
    if src.get("dtype") in DTYPES:
        return DTYPES[src["dtype"]]
    if len(scale_dtypes) == 1:
        return next(iter(scale_dtypes))
    return torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def write_folder(model: nn.Module, tokenizer, out: str | os.PathLike, tensors: dict[str, torch.Tensor], qc: dict,
                 dtype: torch.dtype, overwrite: bool = False) -> Path:
    """config.json (the model's, with this quantization_config and dtype), model.safetensors, tokenizer and
    generation config: one folder, built in a temporary sibling and renamed into place."""
    conf = model.config.to_dict()
    for k in ("quantization_config", "_name_or_path", "transformers_version", "torch_dtype"):
        conf.pop(k, None)
    conf["dtype"] = dtype_name(dtype)
    conf["quantization_config"] = qc
    with atomic_path(out, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
        save_companions(tmp, model, tokenizer)
    return Path(out)


def producer() -> str:
    return f"lowbit {__version__}"


# ---------------------------------------------------------------------------------------------------------
# reading folders that engines' tools wrote


class Tensors:
    """The tensors of a folder's safetensors file(s) (model.safetensors or an index of shards), read on demand.
    The files are confined to the folder and every header entry is checked against its file's size
    (models/validate.tensor_table) before anything is read."""

    def __init__(self, folder: Path) -> None:
        from ..models import validate

        self.folder = folder
        self.table = validate.tensor_table(folder)
        self.where: dict[str, Path] = {k: info.file for k, info in self.table.items()}
        self._open: dict[Path, object] = {}

    def keys(self):
        return self.where.keys()

    def __contains__(self, k: str) -> bool:
        return k in self.where

    def get(self, k: str) -> torch.Tensor:
        f = self.where.get(k)
        if f is None:
            raise LowbitError(f"{self.folder}: tensor {k} is missing")
        try:
            h = self._open.get(f)
            if h is None:
                h = self._open[f] = safe_open(str(f), framework="pt")
            return h.get_tensor(k)
        except (OSError, SafetensorError) as e:
            raise LowbitError(f"{f}: cannot read {k} ({e})") from None


def empty_model(conf: dict, skeleton=None) -> nn.Module:
    """The model of a config dict (quantization_config removed) on the meta device: the skeleton's where one
    is given and applies (runtime/lean.py), else transformers' class."""
    conf = {k: v for k, v in conf.items() if k != "quantization_config"}
    model_type = conf.pop("model_type", None)
    if not model_type:
        raise LowbitError("config.json has no model_type")
    if skeleton is not None:
        m = skeleton(model_type, dict(conf))
        if m is not None:
            return m
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    for k in ("dtype", "torch_dtype"):
        conf.pop(k, None)
    try:
        config = AutoConfig.for_model(model_type, **conf)
        with init_empty_weights(include_buffers=False):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except Exception as e:
        raise LowbitError(f"cannot build {model_type}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def w8a8_linear(name: str, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                input_scale: torch.Tensor | None, dtype: torch.dtype) -> W8A8Linear:
    """A W8A8Linear of int8 codes [out, in] and per-channel (or one) scales; dynamic per-token activations,
    or static per-tensor ones where input_scale is given."""
    out, cols = codes.shape
    gran = "tensor" if scale.numel() == 1 else "channel"
    sname = dtype_name(scale.dtype) if scale.dtype in DTYPES.values() else "float32"
    scheme = Scheme(bits=8, symmetric=True, granularity=gran, scale_dtype=sname)
    act = ActQuant(granularity="tensor", static=True) if input_scale is not None else ActQuant()
    m = W8A8Linear(cols, out, scheme, act=act, bias=bias is not None, device="meta", dtype=dtype)
    m.qweight = (codes.to(torch.int32) + 128).to(torch.uint8)
    m.scales = scale.reshape(-1, 1).to(scheme.torch_scale_dtype).contiguous()
    m.input_scale = (input_scale.reshape(1).float() if input_scale is not None else torch.ones(1))
    if bias is not None:
        m.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
    m._kcache = {}
    return m


def assemble(model: nn.Module, quantized: dict[str, nn.Module], tensors: Tensors, used: set[str],
             dtype: torch.dtype, folder: Path) -> None:
    """Put the quantized modules in place and assign every other tensor of the folder (cast to dtype);
    refuse a folder with tensors missing or unknown."""
    for n, m in quantized.items():
        try:
            model.get_submodule(n)
        except AttributeError:
            raise LowbitError(f"{folder}: quantized layer {n} is not part of the model") from None
        set_module(model, n, m)
    state = {}
    for k in tensors.keys():
        if k in used:
            continue
        t = tensors.get(k)
        state[k] = t.to(dtype) if t.is_floating_point() else t
    try:
        res = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        raise LowbitError(f"{folder}: {str(e).splitlines()[0]}") from None
    cfg = getattr(model, "config", None)
    tied = bool(getattr(cfg, "tie_word_embeddings", False)) if cfg is not None else False
    missing = [k for k in res.missing_keys
               if not (tied and k.rpartition(".")[0] in arch_of(model).head) and k.rpartition(".")[0] not in quantized]
    if missing or res.unexpected_keys:
        raise LowbitError(f"{folder}: missing tensors {missing[:3]} unexpected {res.unexpected_keys[:3]}")
    if tied:
        arch = arch_of(model)
        head, emb = model.get_submodule(arch.head[0]), model.get_submodule(arch.embeddings[0])
        if getattr(head, "weight", None) is not None and head.weight.is_meta:
            head.weight = emb.weight
    for n, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_meta:
            raise LowbitError(f"{folder}: tensor {n} was not stored")
    from ..models import validate

    validate.check_scales(model, str(folder))


def read_config(folder: Path, tensors: "Tensors | None" = None) -> dict:
    """config.json of an engine's folder, checked as every loader checks a config (models/validate): bounded
    JSON, no custom code, sizes within limits and against the tensor table, before any model is built."""
    from ..models import validate

    conf = validate.read_json(folder / "config.json")
    if not isinstance(conf.get("quantization_config"), dict):
        raise LowbitError(f"{folder}/config.json: no quantization_config")
    validate.check_custom_code(folder, conf)
    validate.check_config({k: v for k, v in conf.items() if k != "quantization_config"},
                          tensors.table if tensors is not None else None, str(folder / "config.json"))
    return conf


def source_dtype(conf: dict, tensors: Tensors, skip: set[str]) -> str:
    """The dtype the folder's float tensors are stored in (its config's where they are mixed)."""
    seen = set()
    for k in tensors.keys():
        if k not in skip and k.endswith(("norm.weight", *EMBEDDING_SUFFIXES)):
            seen.add(str(tensors.get(k).dtype).removeprefix("torch."))
            if len(seen) > 1:
                break
    if len(seen) == 1 and next(iter(seen)) in DTYPES:
        return next(iter(seen))
    d = conf.get("dtype") or conf.get("torch_dtype")
    return d if d in DTYPES else "float32"


def matches(name: str, targets: list[str], cls_name: str = "Linear") -> bool:
    """compressed-tensors' target rule: a class name, 're:<regex>' (re.match on the module name), or a name."""
    for t in targets:
        if t == cls_name or t == name:
            return True
        if t.startswith("re:") and re.match(t[3:], name):
            return True
    return False


def finish(model: nn.Module, folder: Path, schemes: dict, source: dict, skeleton):
    """Record the layers' schemes (state_of(model).quant) and load tokenizer and generation config."""
    from collections import Counter

    from ..core.config import QuantConfig

    default = Counter(schemes.values()).most_common(1)[0][0]
    cfg = QuantConfig(method="import", scheme=default,
                      overrides={f"^{n}$".replace(".", r"\."): s for n, s in schemes.items() if s != default},
                      options={"source": source})
    set_quant(model, QuantRecord(cfg, dict(schemes)))
    if skeleton is not None:
        return model, None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(folder))
    except Exception:
        tok = None
    try:
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    except Exception:
        pass
    return model, tok
