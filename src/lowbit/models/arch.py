"""The architecture table: what lowbit knows about a model family, as data, and the lookups that read it.

One `Arch` entry per Hugging Face `model_type` says, as names and regexes on module names:
    blocks, linears        where the decoder blocks are and which linears a block holds (quantization targets)
    embeddings, head       the input embeddings and the output projection (tied weights, GGUF export)
    sequential             true-sequential order of a block's linears (GPTQ: quantize a group, then the next
                           group's inputs are computed with it quantized)
    awq_no_clip            linears AWQ does not clip (q/k, as the reference implementation)
    mappings               where activation scales fold (AWQ, SmoothQuant)
    decoder                the parts the lean runtime runs (runtime/decoder.py, runtime/lean.py), or None
    gguf                   llama.cpp's architecture name, Q/K row permutation and tensor names, or None

Every consumer (algorithms, runtime, GGUF export, api) takes layer names from here: no other module spells
them. Unknown architectures get `GENERIC`: the blocks are the longest nn.ModuleList whose children contain
Linear layers, every Linear of a block is a target, no scale mappings, no lean decoder, no GGUF export.
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
    live, for the lean runtime (runtime/decoder.py) and its transformers-free skeleton (runtime/lean.py).
    Model-level names are full, block-level ones relative."""

    embed: str = "model.embed_tokens"
    layers: str = "model.layers"  # the nn.ModuleList of blocks
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
    # biases of the skeleton's projections: True/False always/never, None as the config's attention_bias
    qkv_bias: bool | None = None
    o_bias: bool | None = None


@dataclass(frozen=True)
class GGUFArch:
    """How llama.cpp names the model: `arch` (general.architecture), the GGUF names of the tensors (a module's
    `.weight`/`.bias` become the GGUF name's), and the rows permuted from HF's rotary layout (two halves per
    head) to GGUF's (interleaved pairs): `permute` = (GGUF name of Q, of K), empty where the layouts agree."""

    arch: str
    tensors: tuple[tuple[str, str], ...]  # full HF module name -> GGUF name, outside the blocks
    block_tensors: tuple[tuple[str, str], ...]  # HF module name relative to a block -> GGUF name in blk.N
    permute: tuple[str, ...] = ()


# true-sequential order: attention inputs, attention output, MLP inputs, MLP output (last name components)
_SEQUENTIAL = (("q_proj", "k_proj", "v_proj", "qkv_proj"), ("o_proj",), ("gate_proj", "up_proj", "gate_up_proj"),
               ("down_proj",))


@dataclass(frozen=True)
class Arch:
    blocks: str | None  # regex for a decoder block's full module name (None: found by structure)
    linears: tuple[str, ...] = ()  # regexes of linears within a block (relative names); empty = all
    embeddings: tuple[str, ...] = ()  # full names of input embeddings
    head: tuple[str, ...] = ()  # full names of the output projection
    # groups of a block's linears by the last part of their names, in true-sequential order; linears in
    # no group form a last group of their own
    sequential: tuple[tuple[str, ...], ...] = _SEQUENTIAL
    awq_no_clip: tuple[str, ...] = ("q_proj", "k_proj")  # endings of linear names AWQ does not clip
    mappings: tuple[ScaleMapping, ...] = ()  # where activation scales fold (AWQ, SmoothQuant)
    decoder: DecoderLayout | None = None  # set where the lean runtime can run the model
    gguf: GGUFArch | None = None  # set where lowbit writes the model as GGUF

    def gguf_name(self, param: str) -> str | None:
        """The GGUF tensor name of an HF parameter name (`model.layers.3.mlp.up_proj.weight` ->
        `blk.3.ffn_up.weight`), or None where the table has none."""
        if self.gguf is None:
            return None
        module, _, attr = param.rpartition(".")
        if attr not in ("weight", "bias"):
            return None
        top = dict(self.gguf.tensors).get(module)
        if top is not None:
            return f"{top}.{attr}"
        parts = module.split(".")
        inner = dict(self.gguf.block_tensors)
        for i in range(1, len(parts)):
            block, rel = ".".join(parts[:i]), ".".join(parts[i:])
            if self.blocks is not None and re.search(self.blocks, block) and rel in inner:
                return f"blk.{parts[i - 1]}.{inner[rel]}.{attr}"  # the block's index: its name's last part
        return None


_LLAMA_LAYOUT = DecoderLayout()
_L = _LLAMA_LAYOUT
_LLAMA_GGUF = GGUFArch(
    arch="llama",
    tensors=((_L.embed, "token_embd"), (_L.final_norm, "output_norm"), (_L.head, "output")),
    block_tensors=((_L.attn_norm, "attn_norm"), *zip(_L.qkv, ("attn_q", "attn_k", "attn_v")), (_L.o, "attn_output"),
                   (_L.mlp_norm, "ffn_norm"), *zip(_L.gate_up, ("ffn_gate", "ffn_up")), (_L.down, "ffn_down")),
    permute=("attn_q", "attn_k"),
)

_LLAMA_LIKE = Arch(
    blocks=r"^model\.layers\.\d+$",
    linears=(r"self_attn\.(q|k|v|o)_proj$", r"mlp\.(gate|up|down)_proj$"),
    embeddings=(_L.embed,),
    head=(_L.head,),
    mappings=(
        ScaleMapping(_L.attn_norm, _L.qkv),
        ScaleMapping(_L.qkv[2], (_L.o,)),  # only where v's rows match o's columns (no GQA)
        ScaleMapping(_L.mlp_norm, _L.gate_up),
        ScaleMapping(_L.gate_up[1], (_L.down,)),
    ),
    decoder=_LLAMA_LAYOUT,
    gguf=_LLAMA_GGUF,
)

ARCHITECTURES: dict[str, Arch] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    # Qwen2: biases on q/k/v always, on o never; llama.cpp's qwen2 keeps HF's rotary layout (no permutation)
    "qwen2": dataclasses.replace(_LLAMA_LIKE, decoder=dataclasses.replace(_LLAMA_LAYOUT, qkv_bias=True, o_bias=False),
                                 gguf=dataclasses.replace(_LLAMA_GGUF, arch="qwen2", permute=())),
    "qwen3": dataclasses.replace(_LLAMA_LIKE, decoder=None, gguf=None),  # q/k norms: not in the lean runtime
    # Gemma's RMSNorm multiplies by (1 + weight): scales cannot be folded by dividing the weight.
    "gemma": dataclasses.replace(_LLAMA_LIKE, mappings=(), decoder=None, gguf=None),
    "gemma2": dataclasses.replace(_LLAMA_LIKE, mappings=(), decoder=None, gguf=None),
    "phi3": Arch(blocks=r"^model\.layers\.\d+$", linears=(r"self_attn\.(qkv|o)_proj$", r"mlp\.(gate_up|down)_proj$"),
                 embeddings=(_L.embed,), head=(_L.head,)),
    "gpt2": Arch(blocks=r"^transformer\.h\.\d+$", embeddings=("transformer.wte",), head=(_L.head,)),
    "opt": Arch(blocks=r"^model\.decoder\.layers\.\d+$", embeddings=("model.decoder.embed_tokens",), head=(_L.head,)),
}

# Unknown model types: blocks found by structure, every linear, no mappings, no lean decoder, no GGUF export;
# a tied output projection is assumed to be called as in LLaMA.
GENERIC = Arch(blocks=None, head=(_L.head,))


def arch_for(model_type: str | None) -> Arch:
    """The table's entry of a model_type, GENERIC where it has none."""
    return ARCHITECTURES.get(model_type or "", GENERIC)


def arch_of(model: nn.Module) -> Arch:
    """The table's entry of a model (by its config's model_type), GENERIC where it has none."""
    return arch_for(_model_type(model))


def lean_types() -> tuple[str, ...]:
    """Model types the lean runtime describes (entries with a decoder layout)."""
    return tuple(t for t, a in ARCHITECTURES.items() if a.decoder is not None)


def sequential_groups(model: nn.Module, names) -> list[list[str]]:
    """A block's linears (full names, in module order) in true-sequential groups (the table's `sequential`)."""
    groups, seen = [], set()
    for suffixes in arch_of(model).sequential:
        g = [n for n in names if n.rsplit(".", 1)[-1] in suffixes]
        if g:
            groups.append(g)
            seen.update(g)
    rest = [n for n in names if n not in seen]
    return groups + ([rest] if rest else [])


def awq_clips(model: nn.Module, name: str) -> bool:
    """Whether AWQ searches a clipping range for this linear (not for the table's `awq_no_clip`)."""
    return not name.endswith(arch_of(model).awq_no_clip)


def short_name(name: str) -> str:
    """A layer name with the lean layouts' block list shortened to L (`...layers.3.mlp` -> `L3.mlp`), for plots."""
    for layers in dict.fromkeys(a.decoder.layers for a in ARCHITECTURES.values() if a.decoder is not None):
        name = name.replace(layers + ".", "L")
    return name


def scale_mappings(model: nn.Module, block: nn.Module) -> list[tuple[nn.Module, list[str]]]:
    """The architecture's mappings that apply to this block, as (prev module, [linear names])."""
    out = []
    for mp in arch_of(model).mappings:
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
    return arch_of(model).decoder


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The decoder blocks in order, as (full name, module)."""
    arch = arch_of(model)
    if arch.blocks is not None:
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
    arch = arch_of(model)
    out = []
    for rel, mod in block.named_modules():
        if isinstance(mod, nn.Linear):
            if not arch.linears or any(re.search(p, rel) for p in arch.linears):
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


# Names that the file checks (models/validate.py) read before any model is built, whatever the architecture:
# stored tensors whose rows are the vocabulary or the positions, and buffers older checkpoints store that
# transformers drops on load.
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")
POSITION_SUFFIXES = ("wpe.weight", "embed_positions.weight", "position_embeddings.weight")
STALE_BUFFERS = (r"rotary_emb\.inv_freq$", r"(^|\.)position_ids$")
