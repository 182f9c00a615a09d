"""Layer discovery by name patterns: architectures are data, not isinstance chains.

Each entry says where the decoder blocks are and which linears a block holds,
as regexes on module names. Unknown architectures fall back to the longest
nn.ModuleList whose children contain Linear layers.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LowbitError


@dataclass(frozen=True)
class ScaleMapping:
    """`prev` feeds every linear in `linears` (names relative to the block): a per-input-channel
    scale s can be folded as prev.weight / s (a norm, or the rows of a linear) and linear.weight * s."""

    prev: str
    linears: tuple[str, ...]


@dataclass(frozen=True)
class DecoderLayout:
    """Where the parts of a pre-norm decoder with rotary attention and a gated MLP (the LLaMA family)
    live, for the lean runtime (runtime/decoder.py). Model-level names are full, block-level ones relative."""

    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    head: str = "lm_head"
    rotary: str = "model.rotary_emb"
    attn_norm: str = "input_layernorm"
    qkv: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    o: str = "self_attn.o_proj"
    mlp_norm: str = "post_attention_layernorm"
    gate_up: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    down: str = "mlp.down_proj"
    act: str = "mlp.act_fn"


@dataclass(frozen=True)
class Arch:
    blocks: str  # regex for a decoder block's full module name
    linears: tuple[str, ...] = ()  # regexes of linears within a block (relative names); empty = all
    embeddings: tuple[str, ...] = ()  # full names of input embeddings
    head: tuple[str, ...] = ()  # full names of the output projection
    mappings: tuple[ScaleMapping, ...] = ()  # where activation scales fold (AWQ, SmoothQuant)
    decoder: DecoderLayout | None = None  # set where the lean runtime can run the model


_LLAMA_LIKE = Arch(
    blocks=r"^model\.layers\.\d+$",
    linears=(r"self_attn\.(q|k|v|o)_proj$", r"mlp\.(gate|up|down)_proj$"),
    embeddings=("model.embed_tokens",),
    head=("lm_head",),
    mappings=(
        ScaleMapping("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ScaleMapping("self_attn.v_proj", ("self_attn.o_proj",)),  # only where v's rows match o's columns (no GQA)
        ScaleMapping("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ScaleMapping("mlp.up_proj", ("mlp.down_proj",)),
    ),
    decoder=DecoderLayout(),
)

ARCHITECTURES: dict[str, Arch] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": dataclasses.replace(_LLAMA_LIKE, decoder=None),  # q/k norms: not in the lean runtime
    # Gemma's RMSNorm multiplies by (1 + weight): scales cannot be folded by dividing the weight.
    "gemma": dataclasses.replace(_LLAMA_LIKE, mappings=(), decoder=None),
    "gemma2": dataclasses.replace(_LLAMA_LIKE, mappings=(), decoder=None),
    "phi3": Arch(blocks=r"^model\.layers\.\d+$", linears=(r"self_attn\.(qkv|o)_proj$", r"mlp\.(gate_up|down)_proj$"),
                 embeddings=("model.embed_tokens",), head=("lm_head",)),
    "gpt2": Arch(blocks=r"^transformer\.h\.\d+$", embeddings=("transformer.wte",), head=("lm_head",)),
    "opt": Arch(blocks=r"^model\.decoder\.layers\.\d+$", embeddings=("model.decoder.embed_tokens",), head=("lm_head",)),
}


def scale_mappings(model: nn.Module, block: nn.Module) -> list[tuple[nn.Module, list[str]]]:
    """The architecture's mappings that apply to this block, as (prev module, [linear names])."""
    arch = ARCHITECTURES.get(_model_type(model) or "")
    out = []
    for mp in arch.mappings if arch else ():
        try:
            prev = block.get_submodule(mp.prev)
            lins = [block.get_submodule(n) for n in mp.linears]
        except AttributeError:
            continue
        width = prev.out_features if isinstance(prev, nn.Linear) else getattr(prev, "weight", torch.empty(0)).shape[0]
        if all(isinstance(l, nn.Linear) and l.in_features == width for l in lins):
            out.append((prev, list(mp.linears)))
    return out


def input_groups(model: nn.Module) -> dict[str, tuple[str, int, int]]:
    """Linears that read one tensor, called one after another (q/k/v; gate/up), from the mappings:
    {linear name: (group name, position in the group, group size)}, for groups of two or more."""
    out = {}
    for block_name, block in find_blocks(model):
        for _, rel in scale_mappings(model, block):
            if len(rel) > 1:
                group = f"{block_name}.{'+'.join(rel)}"
                out.update({f"{block_name}.{r}": (group, i, len(rel)) for i, r in enumerate(rel)})
    return out


def _model_type(model: nn.Module) -> str | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "model_type", None)


def decoder_layout(model: nn.Module) -> DecoderLayout | None:
    arch = ARCHITECTURES.get(_model_type(model) or "")
    return arch.decoder if arch else None


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The decoder blocks in order, as (full name, module)."""
    arch = ARCHITECTURES.get(_model_type(model) or "")
    if arch is not None:
        blocks = [(n, m) for n, m in model.named_modules() if re.search(arch.blocks, n)]
        if blocks:
            return blocks
    # Fallback: the longest ModuleList of blocks that contain Linear layers.
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and all(
            any(isinstance(c, nn.Linear) for c in child.modules()) for child in mod
        ):
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    if best is None:
        raise LowbitError(f"cannot find the decoder blocks of {type(model).__name__} (no list of blocks with Linear layers)")
    return [(f"{best[0]}.{i}", child) for i, child in enumerate(best[1])]


def block_linears(model: nn.Module, block_name: str, block: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Linears of one block (full names), filtered by the architecture's patterns if it has any."""
    arch = ARCHITECTURES.get(_model_type(model) or "")
    out = []
    for rel, mod in block.named_modules():
        if isinstance(mod, nn.Linear):
            if arch is None or not arch.linears or any(re.search(p, rel) for p in arch.linears):
                out.append((f"{block_name}.{rel}", mod))
    return out


def select_modules(model: nn.Module, include: tuple[str, ...] = (), exclude: tuple[str, ...] = (),
                   extra: tuple[str, ...] = ()) -> list[str]:
    """Names of modules to quantize.

    Default: every Linear of the decoder blocks, plus every Linear or Embedding
    matching a pattern of `extra` (the patterns of per-layer scheme overrides, so
    `lm_head=8/-1` adds the head). With `include`, every Linear or Embedding whose
    name matches one of the patterns (so lm_head or the embeddings only when
    asked). `exclude` removes matches from either set.
    """
    def matching(patterns):
        return [n for n, m in model.named_modules()
                if isinstance(m, (nn.Linear, nn.Embedding)) and any(re.search(p, n) for p in patterns)]

    if include:
        names = matching(include)
    else:
        names = [n for bn, b in find_blocks(model) for n, _ in block_linears(model, bn, b)]
        names += [n for n in matching(extra) if n not in set(names)] if extra else []
    names = [n for n in names if not any(re.search(p, n) for p in exclude)]
    return names


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
