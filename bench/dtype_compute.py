"""bf16 vs float32 compute of one LLaMA decoder block's forward on this CPU (the choice of --dtype's compute).

    nice -n 10 python bench/dtype_compute.py [--tokens 2048] [--runs 3]

Prints one JSON line per (shape, dtype): median seconds per forward of `tokens` tokens (batch of 512-token
windows), tokens/s, and the max relative difference of the bf16 output from the float32 one.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from common import emit

SHAPES = {  # hidden, intermediate, heads, kv heads
    "smollm2-135m": (576, 1536, 9, 3),
    "llama-1b": (2048, 8192, 32, 8),
}


def block(hidden, inter, heads, kv):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                      num_key_value_heads=kv, num_hidden_layers=1, max_position_embeddings=4096)
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(cfg, 0).eval()
    for p in layer.parameters():
        p.requires_grad_(False)
        p.normal_(0, 0.02)
    return layer, LlamaRotaryEmbedding(cfg), cfg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    seq = 512
    n = max(1, a.tokens // seq)
    for name, shape in SHAPES.items():
        layer, rope, cfg = block(*shape)
        x32 = torch.randn(n, seq, shape[0])
        pos = torch.arange(seq).unsqueeze(0)
        out = {}
        for dt in (torch.float32, torch.bfloat16):
            layer.to(dt)
            x = x32.to(dt)
            pe = tuple(t.to(dt) for t in rope(x, pos))
            times = []
            with torch.no_grad():
                for r in range(a.runs + 1):
                    t0 = time.perf_counter()
                    y = layer(x, position_embeddings=pe, attention_mask=None)
                    y = y[0] if isinstance(y, tuple) else y
                    if r:
                        times.append(time.perf_counter() - t0)
            out[dt] = y.float()
            med = statistics.median(times)
            rel = float((out[dt] - out[torch.float32]).norm() / out[torch.float32].norm())
            emit({"shape": name, "dtype": str(dt).removeprefix("torch."), "tokens": n * seq, "s_per_forward": round(med, 4),
                  "tokens_per_s": round(n * seq / med, 1), "rel_diff_vs_fp32": rel, "threads": torch.get_num_threads(),
                  "loadavg_1m": os.getloadavg()[0]})


if __name__ == "__main__":
    main()
