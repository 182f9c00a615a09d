"""A lean runtime for LLaMA-family decoders: a static KV cache and one fused matmul per input.

transformers' forward spends most of a decoded token, at this model size, outside the matmuls
(module calls, cache objects, masks). This runtime reads a loaded model (float or lowbit-quantized,
parts found by name: models.arch.DecoderLayout) and runs the same math with as few ops as it can:

    x = embed(ids)                                                   [M, hidden]
    per block:
        h = attn_norm(x);  q|k|v = h @ [Wq; Wk; Wv]ᵀ                  one matmul (fused rows)
        rope(q, k) at positions p..p+M-1 (the model's own cos/sin table)
        K[:, p:p+M], V[:, p:p+M] = k, v                              static cache [kv_heads, max_len, head_dim]
        x += o(softmax(q Kᵀ · scale + causal) V)
        h = mlp_norm(x);  g|u = h @ [Wg; Wu]ᵀ;  x += down(act(g) · u)  one matmul for gate|up
    logits = head(final_norm(x))

One-token steps (decoding) go through kernels/decode.c where it builds (`native`): 4/8-bit weights read in
place by its int8-activation matvec, fused residual+RMSNorm, rope+cache+attention (float16 cache) and
silu·up, four C calls per layer. Without it, fused projections keep torch's kernels: 4-bit layers packed
once, side by side, for torch's int4 matmul (at most kernels.int4.MAX_ROWS rows per call), 8-bit as two
4-bit halves; float layers and everything else call their own modules. Prompts (M > 1 rows) with the native
ops: the projections through decode.c's tiled int8 GEMM (rows equal to the matvec's), residual+RMSNorm, rope+cache
and silu·up in C for all rows, attention through torch's SDPA (`_prefill_native`); prefill="float" multiplies
quantized weights dequantized once instead (evaluation: transformers' numbers). Without them, torch ops.
The model's modules (norms, activation, rotary embedding) are reused, so their numerics are the
model's; the equivalence test compares logits and greedy tokens with transformers'.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LowbitError
from ..kernels.int4 import MAX_ROWS, Int4Kernel, Int8x2Kernel, int4_mm, int8x2_mm
from ..kernels.w8 import W8Kernel, int8_mm
from ..models.arch import decoder_layout, find_blocks, get_module


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the lean runtime cannot run this model, or None."""
    layout = decoder_layout(model)
    if layout is None:
        return f"model type {getattr(getattr(model, 'config', None), 'model_type', None)!r} has no lean decoder layout"
    try:
        for name in (layout.embed, layout.final_norm, layout.head, layout.rotary):
            get_module(model, name)
        _, b = find_blocks(model)[0]
        for name in (layout.attn_norm, *layout.qkv, layout.o, layout.mlp_norm, *layout.gate_up, layout.down, layout.act):
            b.get_submodule(name)
    except (AttributeError, LowbitError) as e:
        return f"missing part: {e}"
    return None


class FusedLinear:
    """y = x [W_1; W_2; ...]ᵀ (+ b) for linears that read the same input, as one call where a kernel allows.

    One class per kind, picked once by fused_linear() (the first of KINDS whose applies() holds); then every
    call goes to that object: __call__(x [M, K]) -> [M, sum N], decode_fn() (a call for one decode row),
    nbytes(). This base is "parts": every module called on its own, outputs concatenated."""

    kind = "parts"
    bf16_io = False  # whether decode_fn takes and returns bfloat16 (the int4 kinds)

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules
        self.bias = None

    @staticmethod
    def applies(modules: list[nn.Module], native: bool) -> bool:
        return True

    def decode_fn(self):
        """A call for one decode row x [1, K] (bf16 where bf16_io, else float32), with as few ops as the kind
        allows; returns [1, N] in the same dtype (native: float32, in a buffer reused by the next call)."""
        return self

    def _tensors(self) -> list[torch.Tensor]:
        """The weight data one call reads (the fused copy where there is one, else the modules')."""
        return [b for m in self.modules for b in (*m.parameters(), *m.buffers())]

    def nbytes(self) -> int:
        """Bytes of weight data one call reads."""
        t = self._tensors() + ([self.bias] if self.bias is not None else [])
        return sum(x.numel() * x.element_size() for x in t)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # x [M, K] -> [M, sum N]
        if len(self.modules) == 1:
            return self.modules[0](x)
        return torch.cat([m(x) for m in self.modules], -1)


class FloatLinear(FusedLinear):
    """Float nn.Linear layers: F.linear on their weights."""

    kind = "float"

    @staticmethod
    def applies(modules, native):
        return all(type(m) is nn.Linear for m in modules)

    def __call__(self, x):
        if len(self.modules) == 1:
            m = self.modules[0]
            return F.linear(x, m.weight, m.bias)
        return torch.cat([F.linear(x, m.weight, m.bias) for m in self.modules], -1)


def _same_quant(modules) -> bool:
    """QuantLinears (exactly) of one scheme and input width: what the fused kinds stack."""
    from ..nn.qlinear import QuantLinear

    return all(type(m) is QuantLinear for m in modules) and len({(m.scheme, m.in_features) for m in modules}) == 1


def _kernel(modules):
    """The one kernels.choose_kernel choice of QuantLinears that can be stacked, or None."""
    from ..kernels import choose_kernel

    if not _same_quant(modules):
        return None
    kinds = {choose_kernel(m) for m in modules}
    return kinds.pop() if len(kinds) == 1 else None


class NativeLinear(FusedLinear):
    """kernels/decode.c on the codes in place: its matvec for decode rows, its tiled GEMM for more (prefill)."""

    kind = "native"

    @staticmethod
    def applies(modules, native):
        from ..kernels import native as nat

        return native and _same_quant(modules) and nat.QWeight.applies(modules) and nat.lib() is not None

    def __init__(self, modules):
        from ..kernels import native

        super().__init__(modules)
        self.qw = native.QWeight(modules)

    def decode_fn(self):
        from ..kernels import native

        L, qw = native.lib(), self.qw
        out = torch.empty(1, qw.N)  # reused: the decode step consumes it before the next call

        def native_fn(x):
            native.linear_q(L, qw, x, out)
            return out
        return native_fn

    def nbytes(self):
        return self.qw.nbytes()

    float_rows = False  # LeanDecoder(prefill="float"): rows > 1 through the dequantized weight (transformers' math)
    _wf = None

    def __call__(self, x):
        from ..kernels import native

        if self.float_rows and x.shape[0] > 1:
            if self._wf is None:  # dequantized once, kept while the decoder lives
                self._wf = torch.cat([m.dequantize_weight() for m in self.modules]).float()
            return F.linear(x.float(), self._wf, self.qw.bias).to(x.dtype)
        x = x.contiguous()
        if x.dtype not in (torch.float32, torch.bfloat16):
            x = x.float()
        y = torch.empty(x.shape[0], self.qw.N, dtype=x.dtype)
        if x.shape[0] == 1:
            native.linear_q(native.lib(), self.qw, x, y)
        else:  # prefill / evaluation rows: the tiled GEMM, each row as the matvec computes it
            native.gemm_q(native.lib(), self.qw, x, y)
        return y


class _Packed(FusedLinear):
    """Modules of one kernels/ kind (`kernel_class`), packed once, side by side, into that kernel's layout;
    their biases concatenated (float32; zeros for modules without one)."""

    kernel_class: type | None = None  # the kernels/ kind these modules must all have chosen

    @classmethod
    def applies(cls, modules, native):
        return type(_kernel(modules)) is cls.kernel_class

    def __init__(self, modules):
        super().__init__(modules)
        self.kernel = _kernel(modules)
        self.packed = self.kernel.pack(modules)
        if any(m.bias is not None for m in modules):
            self.bias = torch.cat([m.bias.float() if m.bias is not None else torch.zeros(m.out_features)
                                   for m in modules])

    def _tensors(self):
        return list(self.packed)


class Int4Linear(_Packed):
    """4-bit layers through torch's int4 matmul (at most kernels.int4.MAX_ROWS rows; more: the modules)."""

    kernel_class = Int4Kernel
    kind = "int4"
    bf16_io = True

    def decode_fn(self):
        op = torch.ops.aten._weight_int4pack_mm_for_cpu
        bias = None if self.bias is None else self.bias.to(torch.bfloat16)
        (packed, sz), G = self.packed, self.kernel.group

        def int4(x):  # bf16 rows (all-int4 blocks); float32 rows where other projections set the dtype
            if x.dtype == torch.bfloat16:
                y = op(x, packed, G, sz)
            else:
                y = op(x.to(torch.bfloat16), packed, G, sz).to(x.dtype)
            return y if bias is None else y + bias.to(y.dtype)
        return int4

    def __call__(self, x):
        if x.shape[0] <= MAX_ROWS:
            y = int4_mm(x, *self.packed, self.kernel.group)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        return super().__call__(x)


class Int8x2Linear(_Packed):
    """8-bit layers as two 4-bit halves through torch's int4 matmul (at most MAX_ROWS rows; more: the modules)."""

    kernel_class = Int8x2Kernel
    kind = "int8x2"
    bf16_io = True

    def decode_fn(self):
        op = torch.ops.aten._weight_int4pack_mm_for_cpu
        bias = None if self.bias is None else self.bias.to(torch.bfloat16)
        (packed, sz), G = self.packed, self.kernel.group

        def int8x2(x):
            y = op(x.to(torch.bfloat16), packed, G, sz)
            n = y.shape[-1] // 2
            y = (y[:, :n].float() + y[:, n:].float()).to(x.dtype)
            return y if bias is None else y + bias.to(y.dtype)
        return int8x2

    def __call__(self, x):
        if x.shape[0] <= MAX_ROWS:
            y = int8x2_mm(x, *self.packed, self.kernel.group)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        return super().__call__(x)


class W8Linear(_Packed):
    """8-bit per-channel symmetric layers through torch's int8 weight matmul (any number of rows)."""

    kernel_class = W8Kernel
    kind = "w8"

    def __call__(self, x):
        y = int8_mm(x, *self.packed).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(y.dtype)


KINDS: tuple[type[FusedLinear], ...] = (NativeLinear, Int4Linear, Int8x2Linear, W8Linear, FloatLinear)


def fused_linear(modules: list[nn.Module], native: bool = True) -> FusedLinear:
    """The kind object for these modules: the first of KINDS that applies (native: kernels/decode.c allowed),
    else calls of the modules themselves."""
    for kind in KINDS:
        if kind.applies(modules, native):
            return kind(modules)
    return FusedLinear(modules)


def _rms_params(module: nn.Module):
    """(weight, eps) of an RMSNorm module (x·rsqrt(mean(x²)+eps)·w), or None for any other norm."""
    eps = getattr(module, "variance_epsilon", None)
    w = getattr(module, "weight", None)
    if type(module).__name__.endswith("RMSNorm") and eps is not None and isinstance(w, torch.Tensor) and w.dim() == 1:
        return w, float(eps)
    return None


def _norm(module: nn.Module):
    """The model's RMSNorm as one fused op (torch's rms_norm: the same formula in one kernel instead of
    eight), or the module itself when it is some other norm."""
    rms = _rms_params(module)
    if rms is None:
        return module
    w, eps = rms
    shape = (w.shape[0],)
    return lambda x: F.rms_norm(x, shape, w, eps)


class _Block:
    def __init__(self, block: nn.Module, layout, native: bool) -> None:
        attn = block.get_submodule(layout.qkv[0].rsplit(".", 1)[0])
        self.attn_norm_module = block.get_submodule(layout.attn_norm)
        self.mlp_norm_module = block.get_submodule(layout.mlp_norm)
        self.attn_norm = _norm(self.attn_norm_module)
        self.mlp_norm = _norm(self.mlp_norm_module)
        self.qkv = fused_linear([block.get_submodule(n) for n in layout.qkv], native)
        self.o = fused_linear([block.get_submodule(layout.o)], native)
        self.gate_up = fused_linear([block.get_submodule(n) for n in layout.gate_up], native)
        self.down = fused_linear([block.get_submodule(layout.down)], native)
        self.act = block.get_submodule(layout.act)
        self.scaling = getattr(attn, "scaling", None)


def _rms_weight(module: nn.Module):
    """(float32 weight, eps) of an RMSNorm module the native ops can run, else None."""
    rms = _rms_params(module)
    return rms if rms is not None and rms[0].dtype == torch.float32 and rms[0].is_contiguous() else None


class LeanDecoder:
    """Prefill + decode of one sequence (batch 1) with a static KV cache of `max_len` positions.

        dec = LeanDecoder(model)
        logits = dec.forward(prompt_ids)        # [M, vocab]: positions 0..M-1
        logits = dec.forward(next_id)           # [1, vocab]: position M, and so on
        dec.reset()                             # a new sequence
    """

    def __init__(self, model: nn.Module, max_len: int = 2048, native: bool | None = None,
                 prefill: str = "native") -> None:
        """prefill: "native" (4/8-bit weights in place, activations int8 per block of up to 128: the decode steps' numerics) or
        "float" (prompts through each quantized weight dequantized once to float32: transformers' numerics, for
        evaluation; decode steps unchanged)."""
        if prefill not in ("native", "float"):
            raise LowbitError(f"lean runtime: prefill must be native or float, got {prefill!r}")
        why = unsupported_reason(model)
        if why:
            raise LowbitError(f"lean runtime: {why}")
        layout = decoder_layout(model)
        cfg = model.config
        window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
        if window and max_len > window:  # within the window, sliding-window attention is full attention
            raise LowbitError(f"lean runtime: {max_len} positions exceed the model's attention window of {window}")
        self.model = model
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.embed = get_module(model, layout.embed)
        self.final_norm_module = get_module(model, layout.final_norm)
        self.final_norm = _norm(self.final_norm_module)
        from ..kernels.native import lib

        if native is None:  # kernels/decode.c where it builds (LOWBIT_NATIVE=0 turns it off)
            native = lib() is not None
        elif native and lib() is None:
            raise LowbitError("lean runtime: native decode ops requested but kernels/decode.c could not be built")
        self.head = fused_linear([get_module(model, layout.head)], native)
        self.blocks = [_Block(b, layout, native) for _, b in find_blocks(model)]
        self.prefill = prefill
        if prefill == "float":
            for f in (self.head, *(x for b in self.blocks for x in (b.qkv, b.o, b.gate_up, b.down))):
                if isinstance(f, NativeLinear):
                    f.float_rows = True
        self.scaling = self.blocks[0].scaling or self.head_dim ** -0.5
        self.max_len = max_len
        self.dtype = self.final_norm_module.weight.dtype  # activations and cache: the model's float dtype
        with torch.no_grad():  # the model's own rotary table (rope scaling variants included)
            rot = get_module(model, layout.rotary)
            pos = torch.arange(max_len).unsqueeze(0)
            cos, sin = rot(torch.zeros(1, dtype=torch.float32), pos)
        self.cos, self.sin = cos[0].to(self.dtype), sin[0].to(self.dtype)  # [max_len, head_dim]
        self.pos = 0
        self.native = self._setup_native() if native else None
        # K/V cache: the model's dtype, or float16 for the native ops (llama.cpp's default cache type)
        self.cache_dtype = torch.float16 if self.native is not None else self.dtype
        shape = (len(self.blocks), self.n_kv, max_len, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=self.cache_dtype)
        self.v_cache = torch.zeros(shape, dtype=self.cache_dtype)
        if self.native is not None:  # per-layer cache views, made once (not two select ops per layer per token)
            self.native["kv"] = list(zip(self.k_cache.unbind(0), self.v_cache.unbind(0)))

    def _setup_native(self):
        """Decode steps through kernels/decode.c (fused norm+residual, rope+cache+attention, silu·mul) where
        the library builds and the model has the parts it implements; else None (torch ops)."""
        from ..kernels import native

        act = type(self.blocks[0].act).__name__
        norms = [_rms_weight(m) for b in self.blocks for m in (b.attn_norm_module, b.mlp_norm_module)]
        norms.append(_rms_weight(self.final_norm_module))
        if (self.dtype != torch.float32 or act not in ("SiLU", "SiLUActivation") or None in norms
                or self.head_dim % 2 or self.head_dim > native.MAX_HEAD_DIM or self.n_heads % self.n_kv):
            return None
        L = native.lib()
        if L is None:
            return None
        bf16 = all(x.bf16_io for b in self.blocks for x in (b.qkv, b.o, b.gate_up, b.down))
        io = torch.bfloat16 if bf16 else torch.float32
        hidden = self.final_norm_module.weight.shape[0]
        inter = self.blocks[0].down.modules[0].in_features
        return {
            "L": L, "io": io, "norms": norms,
            "h": torch.empty(1, hidden, dtype=io),  # normed input of the next projection
            "head_in": torch.empty(1, hidden, dtype=torch.bfloat16 if self.head.bf16_io else torch.float32),
            "attn": torch.empty(1, self.n_heads * self.head_dim, dtype=io),
            "mlp": torch.empty(1, inter, dtype=io),
            "scratch": torch.empty(self.n_heads * self.max_len + (self.n_heads + self.n_kv) * self.head_dim),
            "fns": [(b.qkv.decode_fn(), b.o.decode_fn(), b.gate_up.decode_fn(), b.down.decode_fn()) for b in self.blocks],
            "head": self.head.decode_fn() if self.head.bf16_io else self.head,
        }

    def _decode_native(self, ids: torch.Tensor) -> torch.Tensor:
        """One token at position self.pos through the native ops: ids [1] -> float32 logits [1, vocab]."""
        from ..kernels.native import add_rmsnorm, attn_decode, silu_mul

        nt = self.native
        L, norms, h, attn, mlp, scratch = nt["L"], nt["norms"], nt["h"], nt["attn"], nt["mlp"], nt["scratch"]
        p = self.pos
        nh, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        x = self.embed(ids).float().reshape(-1).contiguous()  # residual stream [hidden], updated in place
        cos, sin = self.cos[p], self.sin[p]
        add_rmsnorm(L, x, None, *norms[0], h)
        n_blocks = len(self.blocks)
        for i, ((qkv, o, gate_up, down), (kc, vc)) in enumerate(zip(nt["fns"], nt["kv"])):
            attn_decode(L, qkv(h), cos, sin, kc, vc, p, nh, nkv, hd, self.scaling, scratch, attn)
            add_rmsnorm(L, x, o(attn), *norms[2 * i + 1], h)
            silu_mul(L, gate_up(h), mlp)
            last = i == n_blocks - 1
            add_rmsnorm(L, x, down(mlp), *norms[2 * i + 2], nt["head_in"] if last else h)
        self.pos = p + 1
        return nt["head"](nt["head_in"]).float()

    def _prefill_native(self, ids: torch.Tensor, all_logits: bool) -> torch.Tensor:
        """M > 1 tokens at positions p..p+M-1 with the native ops for M rows: the projections as their kinds run M
        rows (NativeLinear: the tiled int8 GEMM), fused residual + RMSNorm, rope + cache write, silu·up in C;
        attention through torch's SDPA (flash-style on the CPU: no [heads, M, M] float32 scores), reading the
        fresh float32 k, v at p == 0, the float16 cache after a cached prefix. ids [M] -> float32 logits."""
        from ..kernels.native import add_rmsnorm_rows, rope_rows, silu_mul_rows

        nt = self.native
        L, norms = nt["L"], nt["norms"]
        M, p = ids.numel(), self.pos
        T = p + M
        nh, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        x = self.embed(ids).float().contiguous()  # residual stream [M, hidden], updated in place
        hidden = x.shape[1]
        h = torch.empty(M, hidden)
        add_rmsnorm_rows(L, x, None, *norms[0], h)
        q = torch.empty(nh, M, hd)
        k = torch.empty(nkv, M, hd)
        v = torch.empty(nkv, M, hd)
        mask = None
        if p > 0:  # a chunk after a cached prefix: causal with an offset
            mask = torch.arange(T).unsqueeze(0) <= (p + torch.arange(M)).unsqueeze(1)
        for i, (b, (kc, vc)) in enumerate(zip(self.blocks, nt["kv"])):
            qkv = b.qkv(h).float().contiguous()
            rope_rows(L, qkv, self.cos, self.sin, kc, vc, p, nh, nkv, hd, q, k, v)
            K, V = (k, v) if p == 0 else (kc[:, :T].float(), vc[:, :T].float())
            a = F.scaled_dot_product_attention(q.unsqueeze(0), K.unsqueeze(0), V.unsqueeze(0), attn_mask=mask,
                                               is_causal=p == 0, scale=self.scaling, enable_gqa=nh != nkv)
            attn = a[0].transpose(0, 1).reshape(M, nh * hd)
            add_rmsnorm_rows(L, x, b.o(attn).float().contiguous(), *norms[2 * i + 1], h)
            gu = b.gate_up(h).float().contiguous()
            mlp = torch.empty(M, gu.shape[1] // 2)
            silu_mul_rows(L, gu, mlp)
            add_rmsnorm_rows(L, x, b.down(mlp).float().contiguous(), *norms[2 * i + 2], h)
        self.pos = T
        head_in = h if all_logits else h[-1:]
        if self.head.bf16_io:
            head_in = head_in.to(torch.bfloat16)
        return self.head(head_in.contiguous()).float()

    def decode_bytes(self, length: int) -> int:
        """Bytes a decoded token reads at a context of `length` positions: every projection's weights,
        the norms, and the K/V cache (the memory-bandwidth bound of decoding is bandwidth / this)."""
        n = self.head.nbytes()
        n += sum(x.nbytes() for b in self.blocks for x in (b.qkv, b.o, b.gate_up, b.down))
        n += sum(p.numel() * p.element_size() for b in self.blocks for m in (b.attn_norm_module, b.mlp_norm_module)
                 for p in m.parameters())
        n += 2 * len(self.blocks) * self.n_kv * length * self.head_dim * self.k_cache.element_size()
        return n

    def reset(self) -> None:
        self.pos = 0

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x [M, heads, head_dim]; cos/sin [M, 1, head_dim]; rotate_half as in LLaMA
        half = x.shape[-1] // 2
        rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rot * sin

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, all_logits: bool = True) -> torch.Tensor:
        """ids [M] (or [1, M]) at the next M positions -> float32 logits [M, vocab]
        (only the last position's, [1, vocab], with all_logits=False: what generation needs)."""
        ids = ids.reshape(-1)
        M, p = ids.numel(), self.pos
        if p + M > self.max_len:
            raise LowbitError(f"lean runtime: {p + M} positions exceed the cache of {self.max_len}")
        if M == 1 and self.native is not None:
            return self._decode_native(ids)
        if self.native is not None:
            return self._prefill_native(ids, all_logits)
        nh, nkv, hd = self.n_heads, self.n_kv, self.head_dim
        x = self.embed(ids).to(self.dtype)  # [M, hidden]
        cos = self.cos[p: p + M].unsqueeze(1)
        sin = self.sin[p: p + M].unsqueeze(1)
        T = p + M
        mask = None
        if M > 1 and p > 0:  # a chunk after a cached prefix: causal with an offset
            mask = torch.arange(T).unsqueeze(0) <= (p + torch.arange(M)).unsqueeze(1)
        for i, b in enumerate(self.blocks):
            h = b.attn_norm(x)
            qkv = b.qkv(h)
            qk = self._rope(qkv[:, : (nh + nkv) * hd].view(M, nh + nkv, hd), cos, sin)  # q and k heads at once
            q, k = qk[:, :nh], qk[:, nh:]
            v = qkv[:, (nh + nkv) * hd:].view(M, nkv, hd)
            self.k_cache[i, :, p:T] = k.transpose(0, 1)
            self.v_cache[i, :, p:T] = v.transpose(0, 1)
            K, V = self.k_cache[i, :, :T], self.v_cache[i, :, :T]
            if K.dtype != q.dtype:  # a float16 cache (native decode) read by float32 attention
                K, V = K.to(q.dtype), V.to(q.dtype)
            a = F.scaled_dot_product_attention(
                q.transpose(0, 1).unsqueeze(0), K.unsqueeze(0), V.unsqueeze(0),
                attn_mask=mask, is_causal=M > 1 and p == 0, scale=self.scaling, enable_gqa=nh != nkv)
            x = x + b.o(a[0].transpose(0, 1).reshape(M, nh * hd))
            gu = b.gate_up(b.mlp_norm(x))
            n = gu.shape[-1] // 2
            x = x + b.down(b.act(gu[:, :n]) * gu[:, n:])
        self.pos = T
        if not all_logits:
            x = x[-1:]
        return self.head(self.final_norm(x)).float()
