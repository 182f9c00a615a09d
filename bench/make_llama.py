"""Write a LLaMA-architecture model of a real model's shape with random bf16 weights, as a Hugging Face folder:
config.json, sharded safetensors with model.safetensors.index.json, a tokenizer.

    nice -n 10 python bench/make_llama.py 8b /work/runs/llama-8b [--shard-gb 2] [--seed 0]

Shapes: 1b (Llama-3.2-1B), 8b (Llama-3-8B), 13b (Llama-2-13B), tiny (for tests). The weights are N(0, 0.02²)
(the scale of trained LLaMA projections; runs of a pool of 16 M draws from random offsets, so writing is
bound by the disk, not by the random generator), norms 1: the perplexity of such a model means nothing, its
memory, time and byte counts are real. The tokenizer is SmolLM2's (49,152 entries, from lowbit's zoo cache);
the vocabulary is max(the shape's, 49,152), so Llama-2-13B's 32,000 becomes 49,152 (+88 M parameters).
Tensors are generated and written one shard at a time: memory is one shard, not the model. --layers N
writes the shape with N decoder blocks only (every block and the embeddings at full size): per-block
figures and peak memory are the real model's, totals scale with the number of blocks.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab, tied embeddings
    "tiny": (64, 160, 2, 4, 2, 320, True),
    "1b": (2048, 8192, 16, 32, 8, 128256, True),
    "8b": (4096, 14336, 32, 32, 8, 128256, False),
    "13b": (5120, 13824, 40, 40, 40, 32000, False),
}
TOKENIZER_VOCAB = 49152
POOL = 1 << 24  # random values drawn once; every weight is a run of them from a random offset


def config(shape: str, layers: int | None = None) -> dict:
    """The shape's config; layers: fewer decoder blocks than the real model (same block and embedding sizes)."""
    h, inter, full, heads, kv, vocab, tied = SHAPES[shape]
    layers = layers or full
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
            "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv, "vocab_size": max(vocab, TOKENIZER_VOCAB), "tie_word_embeddings": tied,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu",
            "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16", "attention_bias": False,
            "mlp_bias": False}


def tensors(cfg: dict):
    """(name, shape) of every tensor, in HF's order."""
    h, inter, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_key_value_heads"]
    hd = h // cfg["num_attention_heads"]
    yield "model.embed_tokens.weight", (cfg["vocab_size"], h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (h,)
        yield p + "self_attn.q_proj.weight", (h, h)
        yield p + "self_attn.k_proj.weight", (kv * hd, h)
        yield p + "self_attn.v_proj.weight", (kv * hd, h)
        yield p + "self_attn.o_proj.weight", (h, h)
        yield p + "post_attention_layernorm.weight", (h,)
        yield p + "mlp.gate_proj.weight", (inter, h)
        yield p + "mlp.up_proj.weight", (inter, h)
        yield p + "mlp.down_proj.weight", (h, inter)
    yield "model.norm.weight", (h,)
    if not cfg["tie_word_embeddings"]:
        yield "lm_head.weight", (cfg["vocab_size"], h)


def tokenizer_source() -> Path:
    from lowbit.formats.gguf.convert import gguf_to_cache
    from lowbit.models.zoo import fetch_gguf

    return gguf_to_cache(Path(fetch_gguf("smollm2-135m")))


def write(shape: str, out: Path, shard_bytes: int, seed: int, layers: int | None = None) -> dict:
    cfg = config(shape, layers)
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn(POOL, generator=gen).mul_(0.02).to(torch.bfloat16)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size, total, params = 0, 0, 0
    names: list[list[str]] = [[]]
    pending: dict[str, torch.Tensor] = {}

    def flush(final: bool = False) -> None:
        nonlocal pending, size
        if pending:
            names[-1] = list(pending)
            save_file(pending, str(tmp / f"shard-{len(names):05d}.tmp"), metadata={"format": "pt"})
            pending, size = {}, 0
            if not final:
                names.append([])

    t0 = time.time()
    for name, shp in tensors(cfg):
        n = 1
        for d in shp:
            n *= d
        if name.endswith("norm.weight"):
            t = torch.ones(shp, dtype=torch.bfloat16)
        else:  # tiles of a random pool from random offsets: drawing 13 G normals would take this CPU an hour
            t = torch.empty(n, dtype=torch.bfloat16)
            for r in range(0, n, POOL // 2):
                k = min(POOL // 2, n - r)
                off = int(torch.randint(0, POOL - k + 1, (1,), generator=gen))
                t[r:r + k] = pool[off:off + k]
            t = t.view(shp)
        if size and size + 2 * n > shard_bytes:
            flush()
        pending[name] = t
        size += 2 * n
        total += 2 * n
        params += n
        print(f"{name} ({total / 2**30:.1f} GiB)", file=sys.stderr)
    flush(final=True)
    k = len(names)
    weight_map = {}
    for i, group in enumerate(names):
        fname = f"model-{i + 1:05d}-of-{k:05d}.safetensors"
        os.replace(tmp / f"shard-{i + 1:05d}.tmp", tmp / fname)
        weight_map.update({n: fname for n in group})
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    src = tokenizer_source()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / f, tmp / f)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    print(file=sys.stderr)
    return {"shape": shape, "layers": cfg["num_hidden_layers"], "out": str(out), "params": params, "bytes": total, "shards": k,
            "seconds": round(time.time() - t0, 1), "loadavg_1m": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("out", type=Path)
    ap.add_argument("--shard-gb", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=None, help="fewer decoder blocks than the real shape")
    a = ap.parse_args()
    print(json.dumps(write(a.shape, a.out, int(a.shard_gb * 2**30), a.seed, a.layers)))


if __name__ == "__main__":
    main()
