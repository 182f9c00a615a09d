"""LLaMA-family models without transformers' modeling code, for the lean runtime (runtime/decoder.py).

`lowbit.load(checkpoint, lean=True)` builds this skeleton from a lowbit checkpoint's config.json: the same
module names as transformers', read from the architecture table's decoder layout (models/arch.py,
`DecoderLayout`), so the checkpoint's tensors and layer table load unchanged, with plain torch modules:

    LeanCausalLM (LLaMA's names)
      embed           nn.Embedding (or lowbit's QuantEmbedding)                [vocab, hidden]
      layers.N        attn_norm, q/k/v/o linears, mlp_norm, gate/up/down linears, act (SiLU)
      final_norm, rotary (default rope: inv_freq = theta^(-2i/d)), head

Its only forward is the LeanDecoder's; what it saves is transformers' import and module graph (a large
share of a small model's process memory). Models it does not describe (rope scaling, other activations, q/k norms) raise
`Unsupported`, and the caller loads them through transformers instead.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from ..models.arch import DecoderLayout, arch_for, lean_types


class Unsupported(Exception):
    """This config needs transformers' model class."""


class LeanRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = _meta(dim)
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.variance_epsilon)


class LeanRotary(nn.Module):
    """Default rotary embedding: forward(x, positions [B, T]) -> cos, sin [B, T, head_dim] in x's dtype."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)

    def forward(self, x: torch.Tensor, positions: torch.Tensor):
        freqs = positions.float().unsqueeze(-1) * self.inv_freq  # [B, T, head_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def _meta(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, device="meta"), requires_grad=False)


def _linear(i: int, o: int, bias: bool) -> nn.Linear:
    """An nn.Linear with meta tensors, built without its initializer: any op on a meta tensor (normal_, ...)
    imports torch's meta registrations (sympy, mpmath: a large share of a lean process's memory)."""
    m = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(m)
    m.in_features, m.out_features = i, o
    m.weight = _meta(o, i)
    m.bias = _meta(o) if bias else None
    return m


def _embedding(n: int, d: int) -> nn.Embedding:
    m = nn.Embedding.__new__(nn.Embedding)
    nn.Module.__init__(m)
    m.num_embeddings, m.embedding_dim, m.padding_idx = n, d, None
    m.max_norm, m.norm_type, m.scale_grad_by_freq, m.sparse = None, 2.0, False, False
    m.weight = _meta(n, d)
    return m


def _put(root: nn.Module, path: str, module: nn.Module) -> None:
    """root.<path> = module, with plain nn.Modules for the parents that do not exist yet."""
    *parents, leaf = path.split(".")
    for p in parents:
        if p not in root._modules:
            setattr(root, p, nn.Module())
        root = root._modules[p]
    setattr(root, leaf, module)


class LeanCausalLM(nn.Module):
    def __init__(self, config: SimpleNamespace, layout: DecoderLayout | None = None) -> None:
        super().__init__()
        c = config
        L = layout or arch_for(c.model_type).decoder
        hd = c.head_dim
        attention_bias = bool(getattr(c, "attention_bias", False))
        qkv_bias = attention_bias if L.qkv_bias is None else L.qkv_bias
        o_bias = attention_bias if L.o_bias is None else L.o_bias
        mlp_bias = bool(getattr(c, "mlp_bias", False))
        self.config = c
        _put(self, L.embed, _embedding(c.vocab_size, c.hidden_size))
        layers = []
        qkv_rows = (c.num_attention_heads * hd, c.num_key_value_heads * hd, c.num_key_value_heads * hd)
        for _ in range(c.num_hidden_layers):
            b = nn.Module()
            _put(b, L.attn_norm, LeanRMSNorm(c.hidden_size, c.rms_norm_eps))
            _put(b, L.mlp_norm, LeanRMSNorm(c.hidden_size, c.rms_norm_eps))
            for name, rows in zip(L.qkv, qkv_rows):
                _put(b, name, _linear(c.hidden_size, rows, qkv_bias))
            _put(b, L.o, _linear(c.num_attention_heads * hd, c.hidden_size, o_bias))
            b.get_submodule(L.qkv[0].rpartition(".")[0]).scaling = hd ** -0.5  # the attention module's
            for name in L.gate_up:
                _put(b, name, _linear(c.hidden_size, c.intermediate_size, mlp_bias))
            _put(b, L.down, _linear(c.intermediate_size, c.hidden_size, mlp_bias))
            _put(b, L.act, nn.SiLU())
            layers.append(b)
        _put(self, L.layers, nn.ModuleList(layers))
        _put(self, L.final_norm, LeanRMSNorm(c.hidden_size, c.rms_norm_eps))
        _put(self, L.rotary, LeanRotary(hd, float(getattr(c, "rope_theta", 10000.0))))
        _put(self, L.head, _linear(c.hidden_size, c.vocab_size, False))

    def forward(self, *args, **kwargs):
        raise TypeError("a lean model runs through runtime.decoder.LeanDecoder (load without lean=True for forward())")


def lean_config(model_type: str, conf: dict) -> SimpleNamespace:
    """The config as attributes, with the defaults transformers would fill in; Unsupported where the skeleton
    would compute something else than transformers' model."""
    if model_type not in lean_types():
        raise Unsupported(f"model type {model_type!r}")
    c = SimpleNamespace(**conf)
    c.model_type = model_type
    rope = conf.get("rope_scaling") or conf.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type != "default":
        raise Unsupported(f"rope type {rope_type!r}")
    if isinstance(rope, dict) and "rope_theta" in rope:
        c.rope_theta = rope["rope_theta"]
    if conf.get("hidden_act", "silu") != "silu":
        raise Unsupported(f"activation {conf.get('hidden_act')!r}")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(conf.get(key), int):
            raise Unsupported(f"config has no {key}")
    c.num_key_value_heads = conf.get("num_key_value_heads") or c.num_attention_heads
    c.head_dim = conf.get("head_dim") or c.hidden_size // c.num_attention_heads
    c.rms_norm_eps = conf.get("rms_norm_eps", 1e-6)
    c.tie_word_embeddings = conf.get("tie_word_embeddings", False)
    return c


def lean_skeleton(model_type: str, conf: dict) -> LeanCausalLM | None:
    """The empty LeanCausalLM of a lowbit checkpoint's config (formats/checkpoint.load_checkpoint's skeleton),
    or None where it does not describe the model."""
    try:
        return LeanCausalLM(lean_config(model_type, conf))
    except Unsupported:
        return None
