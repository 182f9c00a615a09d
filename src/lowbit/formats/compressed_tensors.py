"""compressed-tensors (llm-compressor's format; vLLM, SGLang and transformers read it): write and read.

pack-quantized (weight-only, 4 or 8 bits), per linear `<name>.`:
    weight_packed      int32 [out, ceil(in / f)], f = 32 // bits: the unsigned codes u = q + 2^(bits-1) of a
                       row, f per word, code j*f + i in bits [bits*i, bits*i + bits) of word j (little end first)
    weight_scale       [out, G] in the model's dtype (G = groups per row; 1 per channel)
    weight_zero_point  int32 [ceil(out / f), G] (asymmetric only): zero points z + 2^(bits-1), packed the same
                       way along the output dimension (f rows per word)
    weight_shape       int64 [2] = (out, in)
    the format's signed grid: w = s * (q - z), q and z in [-2^(bits-1), 2^(bits-1)); its unsigned u is exactly
    lowbit's stored code (nn/qlinear.py: u = Q - qmin), so an export copies lowbit's codes.
int-quantized (W8A8): `weight` int8 [out, in], `weight_scale` [out, 1] (or [1]), `input_scale` [1] for
static activations; dynamic per-token activations store nothing.

quantization_config: quant_method "compressed-tensors", format, config_groups {name: {targets, weights,
input_activations}}, ignore (the float linears: lm_head), quantization_status "compressed". lowbit's GPTQ
act-order uses static groups (groups in the natural column order): the format's actorder "weight", which
stores no g_idx; a folder with actorder "group" (a permuted g_idx) is refused on reading.

No equivalent, refused on export with one line: 2/3/5/6/7-bit codes, per-tensor 4-bit scales, rotated W8A8,
7-bit or asymmetric or per-tensor-dynamic activations, LLM.int8(), quantized embeddings or head, groups that
do not divide in_features.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..core.config import QuantConfig
from ..core.version import __version__
from ..errors import LowbitError
from ..nn.int8 import W8A8Linear
from ..nn.qlinear import QuantLinear
from ..core.state import QuantRecord, state_of
from .interop import (option, DTYPES, IntLinear, Tensors, assemble, check_group, dtype_name, empty_model, export_dtype,
                      finish, float_state, int_linear, matches, quant_linear, quantized_modules, read_config,
                      scheme_of, source_dtype, w8a8_linear, write_folder)

FMT = "compressed-tensors"
PACK_BITS = (4, 8)


# -- packing ----------------------------------------------------------------------------------------------

def pack_int32(u: torch.Tensor, bits: int) -> torch.Tensor:
    """[rows, n] unsigned codes -> int32 [rows, ceil(n / f)], f = 32 // bits: code j*f + i of a row in bits
    [bits*i, bits*i + bits) of word j; a short last word is padded with zero codes."""
    f = 32 // bits
    rows, n = u.shape
    c = u.to(torch.int64)
    pad = (-n) % f
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    shifts = torch.arange(f, dtype=torch.int64) * bits
    word = (c.reshape(rows, -1, f) << shifts).sum(-1)  # < 2^32
    return torch.where(word >= 1 << 31, word - (1 << 32), word).to(torch.int32)


def unpack_int32(p: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_int32: int32 [rows, words] -> int32 [rows, n] codes."""
    f = 32 // bits
    w = p.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(f, dtype=torch.int64) * bits
    c = (w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return c.reshape(p.shape[0], -1)[:, :n].to(torch.int32)


def pack_int32_reference(rows: list[list[int]], bits: int) -> list[list[int]]:
    """The same packing with plain integers (the reference the tests hold pack_int32 to)."""
    f = 32 // bits
    out = []
    for row in rows:
        words = []
        for j in range(0, len(row), f):
            w = 0
            for i, v in enumerate(row[j:j + f]):
                w |= v << (bits * i)
            words.append(w - (1 << 32) if w >= 1 << 31 else w)
        out.append(words)
    return out


# -- export -----------------------------------------------------------------------------------------------

def _weight_args(lin: IntLinear, cols: int, actorder: str | None) -> dict:
    channel = lin.channel
    return {"num_bits": lin.bits, "type": "int", "symmetric": lin.symmetric,
            "strategy": "channel" if channel else "group", "group_size": None if channel else lin.group,
            "dynamic": False, "actorder": actorder if not channel else None, "block_structure": None,
            "observer": "minmax", "observer_kwargs": {}}


def _act_args(m: W8A8Linear) -> dict:
    a = m.act
    if m.rotated:
        raise LowbitError("rotated")
    if a.bits != 8 or not a.symmetric:
        raise LowbitError("act")
    if a.static:
        return {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor", "group_size": None,
                "dynamic": False, "actorder": None, "block_structure": None, "observer": "minmax",
                "observer_kwargs": {}}
    if a.granularity != "token":
        raise LowbitError("act")
    return {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "group_size": None,
            "dynamic": True, "actorder": None, "block_structure": None, "observer": None, "observer_kwargs": {}}


def _actorder(model: nn.Module) -> str | None:
    cfg: QuantConfig | None = (state_of(model).quant or QuantRecord(None)).config
    if cfg is None:
        return None
    src = option(cfg, "source") or {}
    if src.get("format") == FMT:
        return src.get("actorder")
    if cfg.method in ("gptq", "awq+gptq") and option(cfg, "act_order", True):
        return "weight"  # static groups: columns quantized in act order, groups in the natural order
    return None


def export_compressed_tensors(model: nn.Module, tokenizer, out: str | os.PathLike, dtype: str | None = None,
                              overwrite: bool = False) -> dict:
    mods = quantized_modules(model, FMT)
    actorder = _actorder(model)
    tensors: dict[str, torch.Tensor] = {}
    groups: dict[str, dict] = {}  # json of (weights, input_activations) -> config group
    kinds = set()
    scale_dtypes = set()
    for n, m in mods.items():
        if isinstance(m, W8A8Linear):
            try:
                act = _act_args(m)
            except LowbitError as e:
                why = {"rotated": "its inputs are rotated (Hadamard) at run time: quantize with --no-rotate",
                       "act": f"its activations are {m.act.describe()}: the format runs 8-bit symmetric "
                              "per-token dynamic or static per-tensor ones"}[str(e)]
                raise LowbitError(f"{FMT}: {n}: {why}") from None
            s = m.scheme
            weights = {"num_bits": 8, "type": "int", "symmetric": True,
                       "strategy": "tensor" if s.granularity == "tensor" else "channel", "group_size": None,
                       "dynamic": False, "actorder": None, "block_structure": None, "observer": "minmax",
                       "observer_kwargs": {}}
            kinds.add("int-quantized")
            tensors[f"{n}.weight"] = m.codes().to(torch.int8).contiguous()
            sc = m.scales.detach()
            tensors[f"{n}.weight_scale"] = (sc.reshape(1) if s.granularity == "tensor" else sc.reshape(-1, 1)).contiguous()
            scale_dtypes.add(sc.dtype)
            if m.act.static:
                tensors[f"{n}.input_scale"] = m.input_scale.detach().float().reshape(1).clone()
            key = repr((weights, act))
            g = groups.setdefault(key, {"targets": [], "weights": weights, "input_activations": act,
                                        "output_activations": None, "format": "int-quantized"})
        else:
            s = m.scheme
            if s.bits not in PACK_BITS:
                raise LowbitError(f"{FMT}: {n} is {s.describe()}: the format packs 4- and 8-bit codes only "
                                  "(no 2/3/5/6/7-bit equivalent)")
            if s.granularity == "tensor":
                raise LowbitError(f"{FMT}: {n} has one scale per tensor: the engines' weight-only kernels take "
                                  "per-channel or per-group scales; quantize with --group-size -1 or a group")
            check_group(n, m, FMT)
            lin = int_linear(n, m)
            cols = m.in_features
            weights = _weight_args(lin, cols, actorder)
            kinds.add("pack-quantized")
            f = 32 // lin.bits
            tensors[f"{n}.weight_packed"] = pack_int32(lin.u, lin.bits)
            tensors[f"{n}.weight_scale"] = lin.scales.contiguous()
            scale_dtypes.add(lin.scales.dtype)
            if not lin.symmetric:
                tensors[f"{n}.weight_zero_point"] = pack_int32(lin.zeros.T.contiguous(), lin.bits).T.contiguous()
            tensors[f"{n}.weight_shape"] = torch.tensor([m.out_features, cols], dtype=torch.int64)
            del f
            key = repr((weights, None))
            g = groups.setdefault(key, {"targets": [], "weights": weights, "input_activations": None,
                                        "output_activations": None, "format": "pack-quantized"})
        g["targets"].append(n)
        if m.bias is not None:
            tensors[f"{n}.bias"] = m.bias.detach()
    if len(kinds) > 1:
        raise LowbitError(f"{FMT}: the model mixes W8A8 and weight-only layers: export them as two models")
    fdtype = export_dtype(model, dtype, scale_dtypes)
    for n in mods:
        if f"{n}.bias" in tensors:
            tensors[f"{n}.bias"] = tensors[f"{n}.bias"].to(fdtype).contiguous()
    tensors.update(float_state(model, set(mods), fdtype))
    fmt = kinds.pop()
    config_groups = {}
    for i, g in enumerate(groups.values()):
        g.pop("format")
        # one scheme: every Linear but the ignored ones (as llm-compressor writes it); else the layers by name
        targets = ["Linear"] if len(groups) == 1 else sorted(g["targets"])
        config_groups[f"group_{i}"] = {**g, "targets": targets}
    ignore = sorted(n for n, mm in model.named_modules()
                    if isinstance(mm, nn.Linear) and not isinstance(mm, QuantLinear) and n not in mods)
    qc = {"quant_method": "compressed-tensors", "format": fmt, "config_groups": config_groups, "ignore": ignore,
          "quantization_status": "compressed", "kv_cache_scheme": None, "global_compression_ratio": None,
          "sparsity_config": {}, "transform_config": {}, "producer": {"name": "lowbit", "version": __version__}}
    path = write_folder(model, tokenizer, out, tensors, qc, fdtype, overwrite=overwrite)
    return {"format": FMT, "kind": fmt, "path": str(path), "layers": len(mods), "dtype": dtype_name(fdtype)}


# -- reading ----------------------------------------------------------------------------------------------

def load_compressed_tensors(folder: str | os.PathLike, dtype: torch.dtype = torch.float32, skeleton=None):
    """A compressed-tensors folder (pack-quantized or int-quantized, int weights) -> (model, tokenizer) with
    lowbit modules holding its codes as they are."""
    folder = Path(folder)
    tensors = Tensors(folder)
    conf = read_config(folder, tensors)
    qc = conf["quantization_config"]
    fmt = qc.get("format")
    if fmt not in ("pack-quantized", "int-quantized"):
        raise LowbitError(f"{folder}: compressed-tensors format {fmt!r} is not read by lowbit "
                          "(pack-quantized and int-quantized are)")
    if qc.get("quantization_status", "compressed") != "compressed":
        raise LowbitError(f"{folder}: compressed-tensors status {qc.get('quantization_status')!r}: only "
                          "compressed checkpoints are read")
    groups = qc.get("config_groups") or {}
    ignore = list(qc.get("ignore") or [])
    model = empty_model(conf, skeleton)
    quantized: dict[str, nn.Module] = {}
    schemes = {}
    used: set[str] = set()
    actorders = set()
    suffix = ".weight_packed" if fmt == "pack-quantized" else ".weight_scale"
    for key in sorted(tensors.keys()):
        if not key.endswith(suffix):
            continue
        n = key[: -len(suffix)]
        if matches(n, ignore):
            continue
        g = next((g for g in groups.values() if matches(n, list(g.get("targets") or []))), None)
        if g is None:
            raise LowbitError(f"{folder}: {n} is quantized but no config group targets it")
        w = g.get("weights") or {}
        if w.get("type", "int") != "int":
            raise LowbitError(f"{folder}: {n}: {w.get('type')} weights are not read by lowbit (int weights are)")
        bits = int(w.get("num_bits", 0))
        bias = tensors.get(f"{n}.bias") if f"{n}.bias" in tensors else None
        try:
            old = model.get_submodule(n)
        except AttributeError:
            raise LowbitError(f"{folder}: quantized layer {n} is not part of the model") from None
        if fmt == "int-quantized":
            a = g.get("input_activations")
            if bits != 8 or not w.get("symmetric", True) or w.get("strategy") not in ("channel", "tensor"):
                raise LowbitError(f"{folder}: {n}: int-quantized weights {w} are not read by lowbit")
            static = False
            if a:
                if a.get("num_bits") != 8 or not a.get("symmetric", True) or a.get("type", "int") != "int":
                    raise LowbitError(f"{folder}: {n}: activations {a} are not read by lowbit")
                static = not a.get("dynamic", False)
                if static and a.get("strategy") != "tensor" or (not static and a.get("strategy") != "token"):
                    raise LowbitError(f"{folder}: {n}: activations {a} are not read by lowbit")
            else:
                raise LowbitError(f"{folder}: {n}: int8 weights with float activations are not read by lowbit")
            codes = tensors.get(f"{n}.weight")
            scale = tensors.get(key)
            if codes.dtype != torch.int8 or tuple(codes.shape) != (old.out_features, old.in_features):
                raise LowbitError(f"{folder}: {n}.weight: expected int8 {[old.out_features, old.in_features]}")
            inp = tensors.get(f"{n}.input_scale") if static else None
            m = w8a8_linear(n, codes, scale, bias, inp, dtype)
            used |= {f"{n}.weight", key, f"{n}.input_scale", f"{n}.weight_zero_point", f"{n}.bias"}
        else:
            if bits not in PACK_BITS:
                raise LowbitError(f"{folder}: {n}: {bits}-bit pack-quantized weights are not read by lowbit")
            if g.get("input_activations"):
                raise LowbitError(f"{folder}: {n}: pack-quantized with activation quantization is not read by lowbit")
            shape = [int(x) for x in tensors.get(f"{n}.weight_shape").tolist()]
            out_f, cols = shape
            if (out_f, cols) != (old.out_features, old.in_features):
                raise LowbitError(f"{folder}: {n}: weight_shape {shape} does not match the model")
            scales = tensors.get(f"{n}.weight_scale")
            if scales.dtype not in DTYPES.values():
                raise LowbitError(f"{folder}: {n}: scales in {scales.dtype} are not read by lowbit")
            strategy = w.get("strategy")
            if strategy == "channel":
                group = cols
            elif strategy == "group":
                group = int(w.get("group_size"))
            else:
                raise LowbitError(f"{folder}: {n}: weight strategy {strategy!r} is not read by lowbit")
            G = -(-cols // group)
            if tuple(scales.shape) != (out_f, G):
                raise LowbitError(f"{folder}: {n}: weight_scale has shape {list(scales.shape)}, expected {[out_f, G]}")
            if f"{n}.weight_g_idx" in tensors:
                gi = tensors.get(f"{n}.weight_g_idx").to(torch.int64)
                if not torch.equal(gi, torch.arange(cols) // group):
                    raise LowbitError(f"{folder}: {n}: a permuted g_idx (actorder 'group') is not read by lowbit")
            actorders.add(w.get("actorder"))
            u = unpack_int32(tensors.get(key), bits, cols)
            if w.get("symmetric", True):
                zeros = torch.full((out_f, G), 1 << (bits - 1), dtype=torch.int32)
            else:
                zeros = unpack_int32(tensors.get(f"{n}.weight_zero_point").T.contiguous(), bits, out_f).T.contiguous()
            lin = IntLinear(n, bits, bool(w.get("symmetric", True)), group, u, scales, zeros, bias,
                            channel=strategy == "channel")
            m = quant_linear(lin, scheme_of(lin, scales.dtype), dtype)
            used |= {key, f"{n}.weight_scale", f"{n}.weight_zero_point", f"{n}.weight_shape", f"{n}.weight_g_idx",
                     f"{n}.bias"}
        quantized[n] = m
        schemes[n] = m.scheme
    if not quantized:
        raise LowbitError(f"{folder}: compressed-tensors config but no quantized layer found")
    assemble(model, quantized, tensors, used, dtype, folder)
    src = {"format": FMT, "dtype": source_dtype(conf, tensors, used)}
    ao = {a for a in actorders if a}
    if ao:
        src["actorder"] = ao.pop()
    return finish(model, folder, schemes, src, skeleton)

