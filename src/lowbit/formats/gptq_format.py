"""The GPTQ format (AutoGPTQ / GPTQModel, read by transformers, vLLM, SGLang, TGI) and AWQ's GEMM format:
write GPTQ (and AWQ), read both.

GPTQ, per linear `<name>.` (f = 32 // bits codes per int32 word, codes and zeros unsigned):
    qweight  int32 [in / f, out]   code of (row o, column j*f + i) in bits [bits*i, bits*i + bits) of word
                                   (j, o): packed along the input dimension
    qzeros   int32 [G, out / f]    zero point z of (row j*f + i, group g) stored as z - 1 ("gptq" v1 format,
                                   checkpoint_format "gptq"; "gptq_v2" stores z), packed along the output
    scales   fp16 [G, out]
    g_idx    int32 [in]            group of each input column: column // group_size here (lowbit's act-order
                                   keeps groups in the natural order, so desc_act is false)
    w[o, c] = scales[g_idx[c], o] * (q[o, c] - z[o, g_idx[c]]); symmetric: z = 2^(bits-1) everywhere.
    quantization_config: quant_method "gptq", bits, group_size (-1 per channel), desc_act, sym, static_groups,
    checkpoint_format "gptq". The v1 format cannot hold z = 0 (stored -1 spills into the neighbouring
    codes): an asymmetric layer with such a group is refused on export (use --sym, or compressed-tensors).

AWQ (GEMM), 4-bit: qweight int32 [in, out / 8] and qzeros int32 [G, out / 8] packed along the output
dimension with the order [0, 2, 4, 6, 1, 3, 5, 7] (nibble i of word j holds output j*8 + ORDER[i]), zeros
as they are (no minus one), scales fp16 [G, out]; quantization_config quant_method "awq", version "gemm",
zero_point true.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..errors import LowbitError
from ..nn.int8 import W8A8Linear
from ..core.state import QuantRecord, state_of
from .compressed_tensors import pack_int32, unpack_int32
from .interop import (option, IntLinear, Tensors, assemble, check_group, dtype_name, empty_model, export_dtype, finish,
                      float_state, int_linear, producer, quant_linear, quantized_modules, read_config, scheme_of,
                      source_dtype, write_folder)

GPTQ_BITS = (2, 4, 8)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE = tuple(AWQ_ORDER.index(c) for c in range(8))  # (0, 4, 1, 5, 2, 6, 3, 7)


# -- packing ----------------------------------------------------------------------------------------------

def gptq_pack(lin: IntLinear, v1: bool = True) -> dict[str, torch.Tensor]:
    """qweight, qzeros, scales, g_idx of one linear."""
    out, cols = lin.shape
    f = 32 // lin.bits
    if cols % f or out % f:
        raise LowbitError(f"gptq: {lin.name} is {out}x{cols}: both sides must be multiples of {f}")
    z = lin.zeros - 1 if v1 else lin.zeros
    return {"qweight": pack_int32(lin.u, lin.bits).T.contiguous(),
            "qzeros": pack_int32(z.T.contiguous(), lin.bits),
            "scales": lin.scales.T.contiguous(),
            "g_idx": (torch.arange(cols) // lin.group).to(torch.int32)}


def gptq_unpack(t: dict[str, torch.Tensor], bits: int, out: int, cols: int, v1: bool = True):
    """(u [out, in], zeros [out, G], scales [out, G], g_idx [in]) of GPTQ tensors."""
    u = unpack_int32(t["qweight"].T.contiguous(), bits, cols)
    G = t["scales"].shape[0]
    z = unpack_int32(t["qzeros"], bits, out).T.contiguous()
    if v1:
        z = z + 1
    return u, z, t["scales"].T.contiguous(), t["g_idx"]


def awq_pack(lin: IntLinear) -> dict[str, torch.Tensor]:
    out, cols = lin.shape
    if lin.bits != 4 or out % 8:
        raise LowbitError(f"awq: {lin.name}: the GEMM format holds 4-bit codes of layers with out % 8 == 0")
    order = torch.tensor([j * 8 + o for j in range(out // 8) for o in AWQ_ORDER])
    return {"qweight": pack_int32(lin.u.T[:, order].contiguous(), 4),
            "qzeros": pack_int32(lin.zeros.T[:, order].contiguous(), 4),
            "scales": lin.scales.T.contiguous()}


def awq_unpack(t: dict[str, torch.Tensor], out: int):
    rev = torch.tensor([j * 8 + r for j in range(out // 8) for r in AWQ_REVERSE])
    u = unpack_int32(t["qweight"], 4, out)[:, rev].T.contiguous()
    z = unpack_int32(t["qzeros"], 4, out)[:, rev].T.contiguous()
    return u, z, t["scales"].T.contiguous()


def gptq_pack_reference(u: list[list[int]], zeros: list[list[int]], bits: int) -> tuple[list[list[int]], list[list[int]]]:
    """qweight and qzeros (v1) with plain integers: u[o][c] codes, zeros[o][g] (the tests' reference)."""
    f = 32 // bits
    out, cols, G = len(u), len(u[0]), len(zeros[0])

    def signed(w: int) -> int:
        return w - (1 << 32) if w >= 1 << 31 else w

    qweight = [[signed(sum(u[o][j * f + i] << (bits * i) for i in range(f))) for o in range(out)]
               for j in range(cols // f)]
    qzeros = [[signed(sum((zeros[j * f + i][g] - 1) << (bits * i) for i in range(f))) for j in range(out // f)]
              for g in range(G)]
    return qweight, qzeros


# -- export -----------------------------------------------------------------------------------------------

def _uniform(mods: dict[str, nn.Module], fmt: str):
    schemes = {m.scheme for m in mods.values()}
    if len(schemes) > 1:
        raise LowbitError(f"{fmt}: the layers use {len(schemes)} different schemes ("
                          f"{', '.join(sorted(s.describe() for s in schemes))}); the format holds one: "
                          "use compressed-tensors")
    return schemes.pop()


def _static_groups(model: nn.Module) -> bool:
    cfg = (state_of(model).quant or QuantRecord(None)).config
    if cfg is None:
        return False
    src = option(cfg, "source") or {}
    if src.get("format") == "gptq":
        return bool(src.get("static_groups", False))
    return cfg.method in ("gptq", "awq+gptq") and bool(option(cfg, "act_order", True))


def export_gptq(model: nn.Module, tokenizer, out: str | os.PathLike, dtype: str | None = None,
                overwrite: bool = False, awq: bool = False) -> dict:
    fmt = "awq" if awq else "gptq"
    mods = quantized_modules(model, fmt)
    for n, m in mods.items():
        if isinstance(m, W8A8Linear):
            raise LowbitError(f"{fmt}: {n} is W8A8 (int8 activations): no equivalent in this weight-only format; "
                              "use compressed-tensors")
    s = _uniform(mods, fmt)
    bits_ok = (4,) if awq else GPTQ_BITS
    if s.bits not in bits_ok:
        raise LowbitError(f"{fmt}: {s.describe()}: the format is written for {'/'.join(map(str, bits_ok))}-bit "
                          "codes here (no 3-bit equivalent)")
    if s.granularity == "tensor":
        raise LowbitError(f"{fmt}: one scale per tensor has no equivalent: quantize with --group-size -1 or a group")
    if awq and s.symmetric:
        raise LowbitError("awq: the GEMM format stores zero points: quantize with --asym (or export gptq)")
    if s.scale_dtype != "float16":
        raise LowbitError(f"{fmt}: scales are {s.scale_dtype}; the format stores fp16 scales (use compressed-tensors)")
    tensors: dict[str, torch.Tensor] = {}
    for n, m in mods.items():
        check_group(n, m, fmt)
        lin = int_linear(n, m)
        if not awq and not lin.symmetric and int(lin.zeros.min()) == 0:
            o, g = (lin.zeros == 0).nonzero()[0].tolist()
            raise LowbitError(f"gptq: {n} has zero point 0 (row {o}, group {g}), which the GPTQ v1 format cannot "
                              "store; quantize with --sym, or export compressed-tensors")
        packed = awq_pack(lin) if awq else gptq_pack(lin)
        for k, v in packed.items():
            tensors[f"{n}.{k}"] = v
        if m.bias is not None:
            tensors[f"{n}.bias"] = m.bias.detach()
    fdtype = export_dtype(model, dtype, {torch.float16})
    for n in mods:
        if f"{n}.bias" in tensors:
            tensors[f"{n}.bias"] = tensors[f"{n}.bias"].to(fdtype).contiguous()
    tensors.update(float_state(model, set(mods), fdtype))
    group = -1 if s.granularity == "channel" else s.group_size
    if awq:
        qc = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm",
              "modules_to_not_convert": None, "meta": {"quantizer": [producer().replace(" ", ":")]}}
    else:
        qc = {"quant_method": "gptq", "bits": s.bits, "group_size": group, "desc_act": False, "sym": s.symmetric,
              "static_groups": _static_groups(model), "true_sequential": True, "lm_head": False,
              "checkpoint_format": "gptq", "pack_dtype": "int32", "damp_percent": 0.01,
              "meta": {"quantizer": [producer().replace(" ", ":")]}}
    path = write_folder(model, tokenizer, out, tensors, qc, fdtype, overwrite=overwrite)
    return {"format": fmt, "path": str(path), "layers": len(mods), "dtype": dtype_name(fdtype)}


# -- reading ----------------------------------------------------------------------------------------------

def load_gptq(folder: str | os.PathLike, dtype: torch.dtype = torch.float32, skeleton=None):
    """A GPTQ (v1 or v2) or AWQ (GEMM) folder -> (model, tokenizer) with QuantLinear modules holding its codes."""
    folder = Path(folder)
    tensors = Tensors(folder)
    conf = read_config(folder, tensors)
    qc = dict(conf["quantization_config"])
    method = qc.get("quant_method")
    awq = method == "awq"
    if awq:
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise LowbitError(f"{folder}: AWQ version {version!r} is not read by lowbit (gemm is)")
        if not qc.get("zero_point", True):
            raise LowbitError(f"{folder}: AWQ without zero points is not read by lowbit")
    else:
        fmt = qc.get("checkpoint_format", qc.get("format", "gptq"))
        if fmt not in ("gptq", "gptq_v2"):
            raise LowbitError(f"{folder}: GPTQ checkpoint format {fmt!r} is not read by lowbit (gptq, gptq_v2 are)")
    bits = int(qc.get("bits", qc.get("w_bit", 0)))
    if bits not in ((4,) if awq else GPTQ_BITS):
        raise LowbitError(f"{folder}: {bits}-bit {method} weights are not read by lowbit")
    group = int(qc.get("group_size", qc.get("q_group_size", -1)))
    model = empty_model(conf, skeleton)
    quantized, schemes, used = {}, {}, set()
    for key in sorted(tensors.keys()):
        if not key.endswith(".qweight"):
            continue
        n = key[: -len(".qweight")]
        try:
            old = model.get_submodule(n)
        except AttributeError:
            raise LowbitError(f"{folder}: quantized layer {n} is not part of the model") from None
        out_f, cols = old.out_features, old.in_features
        g = cols if group == -1 else group
        names = ("qweight", "qzeros", "scales") + (() if awq else ("g_idx",))
        t = {k: tensors.get(f"{n}.{k}") for k in names if k != "g_idx" or f"{n}.g_idx" in tensors}
        f = 32 // bits
        G = -(-cols // g)
        want = {"qweight": (cols, out_f // 8) if awq else (cols // f, out_f), "qzeros": (G, out_f // f),
                "scales": (G, out_f)}
        for k, shape in want.items():
            if tuple(t[k].shape) != shape:
                raise LowbitError(f"{folder}: {n}.{k} has shape {list(t[k].shape)}, expected {list(shape)}")
        if awq:
            u, z, scales = awq_unpack(t, out_f)
        else:
            u, z, scales, g_idx = gptq_unpack({**t, "g_idx": t.get("g_idx")}, bits, out_f, cols, v1=fmt == "gptq")
            if g_idx is not None and not torch.equal(g_idx.to(torch.int64), torch.arange(cols) // g):
                raise LowbitError(f"{folder}: {n}: a permuted g_idx (desc_act with dynamic groups) is not read by "
                                  "lowbit")
        if int(z.max()) >= 1 << bits or int(z.min()) < 0:
            raise LowbitError(f"{folder}: {n}: zero points outside 0..{(1 << bits) - 1} (a v1 zero point of 0 "
                              "that the format cannot hold)")
        sym = not awq and bool(qc.get("sym", True)) and bool((z == 1 << (bits - 1)).all())
        lin = IntLinear(n, bits, sym, g, u, scales, z, tensors.get(f"{n}.bias") if f"{n}.bias" in tensors else None,
                        channel=group == -1)
        m = quant_linear(lin, scheme_of(lin, scales.dtype), dtype)
        quantized[n], schemes[n] = m, m.scheme
        used |= {f"{n}.{k}" for k in ("qweight", "qzeros", "scales", "g_idx", "bias")}
    if not quantized:
        raise LowbitError(f"{folder}: {method} config but no quantized layer found")
    assemble(model, quantized, tensors, used, dtype, folder)
    src = {"format": "awq" if awq else "gptq", "dtype": source_dtype(conf, tensors, used)}
    if not awq:
        src["static_groups"] = bool(qc.get("static_groups", False))
    return finish(model, folder, schemes, src, skeleton)
