"""Write a model as a GGUF v3 file that llama.cpp loads: metadata, tokenizer, tensors in llama.cpp's types.

The container is gguf-py's GGUFWriter; the blocks are lowbit's (``blocks.py``); the per-tensor types
follow llama.cpp's mixtures (``mixtures.py``). The GGUF architecture, the tensor names and which rows
are permuted come from the architecture table (models/arch.py, `Arch.gguf`): the Q/K rows the way
llama.cpp's converter permutes them for LLaMA (HF keeps rotary halves, ggml interleaves pairs). The file is written to a temporary sibling and renamed into place when complete.
"""

from __future__ import annotations

import hashlib
import re
import json
import os
import sys
import time
import torch
from torch import nn

from ...core.state import state_of
from ...errors import LowbitError
from ...core.io import atomic_path
from ...models.arch import ARCHITECTURES, Arch, arch_of
from .blocks import TYPES
from .mixtures import FILE_TYPES, TensorInfo, bits_per_weight, choose_types, file_type

# Pre-tokenizers llama.cpp names, recognized by a fingerprint of the BPE merges (sha256 of the first
# 64 merges, computed here from the tokenizers themselves).
KNOWN_PRE = {"50480ad37d7b1993": "smollm"}


def _merges_fingerprint(merges: list[str]) -> str:
    return hashlib.sha256("\n".join(merges[:64]).encode()).hexdigest()[:16]


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rotary layout (two halves per head) -> GGUF's (interleaved pairs), as llama.cpp's converter."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# lowbit schemes whose values a GGUF block type holds exactly: symmetric codes Q in groups of 32 with float16
# scales, x = s·Q, are the blocks' x = d·(q - offset) with d = s and q = Q + offset (ggml dequantizes both in
# float32 as one product). Asymmetric codes have no exact type: Q4_1/Q5_1 store m = -s·z rounded to float16.
EXACT_TYPES = {4: ("Q4_0", 8), 5: ("Q5_0", 16), 8: ("Q8_0", 0)}


def exact_type(mod: nn.Module) -> str | None:
    """The GGUF type that holds a packed linear's dequantized weight exactly, else None (it is re-rounded)."""
    s = getattr(mod, "scheme", None)
    if s is None or not callable(getattr(mod, "codes", None)) or getattr(mod, "kind", None) != "linear":
        return None
    ok = (s.symmetric and s.granularity == "group" and s.group_size == 32 and s.bits in EXACT_TYPES
          and mod.scales.dtype == torch.float16 and mod.in_features % 32 == 0)
    return EXACT_TYPES[s.bits][0] if ok else None


def exact_blocks(mod: nn.Module, n_heads: int | None) -> torch.Tensor:
    """uint8 numpy [out, blocks·type_size]: the module's codes and scales as exact_type's blocks (rows permuted as
    permute_qk where n_heads is given). No rounding happens here."""
    name, offset = EXACT_TYPES[mod.scheme.bits]
    q = mod.codes() + offset  # [out, in]
    d = mod.scales.float()  # [out, in / 32]
    if n_heads is not None:
        q, d = permute_qk(q, n_heads), permute_qk(d, n_heads)
    rows = q.shape[0]
    data = TYPES[name]._pack({"d": d.reshape(-1)}, q.reshape(-1, 32))
    return data.reshape(rows, -1).numpy()


def float_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """HF parameter name -> float32 tensor; packed lowbit layers are dequantized."""
    out: dict[str, torch.Tensor] = {}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    head = arch_of(model).head
    for mname, mod in model.named_modules():
        prefix = f"{mname}." if mname else ""
        if hasattr(mod, "dequantize_weight"):
            out[prefix + "weight"] = mod.dequantize_weight().float()
            b = getattr(mod, "bias", None)
            if isinstance(b, torch.Tensor):
                out[prefix + "bias"] = b.detach().float()
            continue
        for pname, p in mod.named_parameters(recurse=False):
            out[prefix + pname] = p.detach().float()
    if tied:
        for h in head:
            out.pop(f"{h}.weight", None)
    return out


def _gguf_names(names: list[str], arch: Arch) -> dict[str, str]:
    out = {}
    for n in names:
        g = arch.gguf_name(n)
        if g is None:
            raise LowbitError(f"{n}: no GGUF tensor name for this parameter (architecture {arch.gguf.arch})")
        out[n] = g
    return out


def _hparams(w, cfg, arch: str) -> None:
    n_head = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(getattr(cfg, "num_key_value_heads", None) or n_head)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // n_head:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", None))
    if theta is not None:
        w.add_rope_freq_base(float(theta))
    rtype = rope.get("rope_type", "default")
    if rtype not in ("default", None):
        if rtype == "linear":
            import gguf

            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(rope["factor"]))
        else:
            raise LowbitError(f"rope scaling {rtype!r}: not supported by lowbit's GGUF export yet")
    w.add_vocab_size(cfg.vocab_size)


def _copy_tokenizer(w, source_gguf: str) -> None:
    """Every tokenizer.* key of the source GGUF, as it was."""
    import gguf

    r = gguf.GGUFReader(source_gguf)
    for key, f in r.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, f.contents(), vtype, sub)


def _build_tokenizer(w, tok, vocab_size: int) -> None:
    """A GPT-2 style BPE tokenizer (tokenizers' ByteLevel BPE) from a transformers tokenizer."""
    import gguf

    try:
        spec = json.loads(tok.backend_tokenizer.to_str())
    except Exception:
        raise LowbitError("tokenizer: only fast (tokenizer.json) tokenizers export to GGUF") from None
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise LowbitError(f"tokenizer: {model.get('type')} tokenizers do not export to GGUF yet (BPE only)")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    id_to_tok = {i: t for t, i in tok.get_vocab().items()}
    added = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        t = id_to_tok.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(t)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(t)
            types.append(gguf.TokenType.NORMAL)
    pre = KNOWN_PRE.get(_merges_fingerprint(merges))
    if pre is None:
        pt = spec.get("pre_tokenizer") or {}
        pre = "gpt-2" if pt.get("type") == "ByteLevel" and pt.get("use_regex", True) else "default"
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for what, tid in (("bos", tok.bos_token_id), ("eos", tok.eos_token_id), ("unk", tok.unk_token_id),
                      ("pad", tok.pad_token_id)):
        if tid is not None:
            getattr(w, f"add_{what}_token_id")(int(tid))
    w.add_add_bos_token(bool(getattr(tok, "add_bos_token", False)))
    if getattr(tok, "chat_template", None):
        w.add_chat_template(tok.chat_template)


def source_gguf_of(model: nn.Module) -> str | None:
    """The .gguf file a model was loaded from, if any (its tokenizer metadata is copied as is)."""
    from ...models.loading import resolve

    src = state_of(model).source
    if not src:
        return None
    try:
        s = resolve(src)
    except LowbitError:
        return None
    return s.location if s.kind == "gguf" else None


def export_gguf(model: nn.Module, tok, out: str | os.PathLike, ftype: str = "Q4_K_M",
                overrides: list[tuple[str, str]] = (), imatrix: dict[str, torch.Tensor] | None = None,
                hessians: dict[str, torch.Tensor] | None = None, overwrite: bool = False, progress: bool = True,
                extra_kv: dict[str, str] | None = None, writer_only: bool = False) -> dict:
    """Write ``model`` to ``out`` as GGUF of file type ``ftype`` (a tensor type or a mixture such as Q4_K_M).

    ``imatrix``: HF module name -> mean x² per input column (from calibration); with it, every block
    chooses its scales to minimize the error weighted by it. ``hessians``: module name -> E[x xᵀ]; with
    them the codes of every quantized 2-D tensor are then chosen by GPTQ on the stored grid (the imatrix
    defaults to their diagonals). Returns a summary (types, bytes, bpw).
    """
    if hessians is not None and imatrix is None:
        imatrix = {k: torch.diagonal(h).clone() for k, h in hessians.items()}
    import gguf

    ftype = file_type(ftype)
    cfg = model.config
    mtype = getattr(cfg, "model_type", None)
    table = arch_of(model)
    if table.gguf is None:
        supported = [t for t, a in ARCHITECTURES.items() if a.gguf is not None]
        raise LowbitError(f"model type {mtype!r}: GGUF export supports {', '.join(supported)}")
    arch = table.gguf.arch
    # Q's rows permuted by attention heads, K's by KV heads (where the table says so)
    q_name, k_name = (f"{p}.weight" for p in table.gguf.permute) if table.gguf.permute else (None, None)
    tensors = float_tensors(model)
    names = _gguf_names(list(tensors), table)
    n_head = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    infos = [TensorInfo(names[n], tuple(t.shape)) for n, t in tensors.items()]
    types = choose_types(infos, ftype, cfg.num_hidden_layers, n_head // n_kv, list(overrides),
                         imatrix=imatrix is not None)
    # packed layers whose grid a GGUF type holds exactly keep their codes (unless --tensor-type names them)
    modules = dict(model.named_modules())
    exact: dict[str, nn.Module] = {}
    for hf_name in tensors:
        mod = modules.get(hf_name.rpartition(".")[0]) if hf_name.endswith(".weight") else None
        et = exact_type(mod) if mod is not None else None
        if et is not None and not any(re.search(p, names[hf_name]) for p, _ in overrides):
            types[names[hf_name]] = et
            exact[hf_name] = mod
    rerounded = sum(1 for n in tensors if n not in exact and n.rpartition(".")[0] in modules
                    and callable(getattr(modules[n.rpartition(".")[0]], "codes", None)) and n.endswith(".weight"))
    shapes = {i.name: i.shape for i in infos}
    src = source_gguf_of(model)

    def new_writer(path):
        w = gguf.GGUFWriter(str(path), arch)
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(str(state_of(model).source or getattr(cfg, "_name_or_path", "") or "model"))
        _hparams(w, cfg, arch)
        w.add_file_type(int(FILE_TYPES[ftype][1]))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if src is not None:
            _copy_tokenizer(w, src)
        elif tok is not None:
            _build_tokenizer(w, tok, cfg.vocab_size)
        else:
            raise LowbitError("no tokenizer: llama.cpp needs one in the GGUF file")
        for k, v in (extra_kv or {}).items():
            w.add_string(k, v)
        return w

    if writer_only:  # the budget planner measures the header this way (formats/gguf/budget.py)
        return {"new_writer": new_writer, "tensors": tensors, "names": names, "shapes": shapes}
    with atomic_path(out, overwrite=overwrite, is_dir=False, kind="gguf") as tmp:
        w = new_writer(tmp)
        t0 = time.time()
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(tensors), desc=f"GGUF {ftype}", unit="tensor", file=sys.stderr)
        for hf_name, t in tensors.items():
            g = names[hf_name]
            if q_name is not None and g.endswith(q_name):
                t = permute_qk(t, n_head)
            elif k_name is not None and g.endswith(k_name):
                t = permute_qk(t, n_kv)
            ttype = TYPES[types[g]]
            qw = None
            if imatrix is not None and t.dim() == 2:
                mod = hf_name.rsplit(".", 1)[0]
                qw = imatrix.get(mod)  # per input column: the Q/K row permutation leaves it as is
            H = hessians.get(hf_name.rsplit(".", 1)[0]) if hessians is not None and t.dim() == 2 else None
            if hf_name in exact:
                heads = n_head if (q_name is not None and g.endswith(q_name)) else \
                    n_kv if (k_name is not None and g.endswith(k_name)) else None
                data = exact_blocks(exact[hf_name], heads)
            elif H is not None and ttype.name not in ("F32", "F16", "BF16"):
                data = ttype.quantize_gptq(t, H, qw)
            else:
                data = ttype.quantize(t.reshape(-1, t.shape[-1]), qw)
            # uint8 rows of blocks: gguf-py derives the element shape from the byte shape and the type
            w.add_tensor(g, data.reshape(*t.shape[:-1], -1) if t.dim() > 1 else data.reshape(-1), raw_dtype=ttype.qtype)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        size = os.path.getsize(tmp)
    counts: dict[str, int] = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    return {"file": str(out), "type": ftype, "bytes": size, "bpw": bits_per_weight(types, shapes),
            "tensor_types": counts, "calibrated": imatrix is not None, "gptq": hessians is not None,
            "exact": len(exact), "rerounded": rerounded,
            "seconds": round(time.time() - t0, 1)}
