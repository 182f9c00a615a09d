"""Text generation with a KV cache, streaming to a callback.

Two runtimes, the same choices of the next token:
    lean          runtime/decoder.py: static cache, fused kernels (LLaMA-family models; the default where it applies)
    transformers  model.generate with transformers' cache (every other model)
Greedy (temperature 0) takes the argmax; sampling divides the logits by the temperature, keeps
the smallest set of tokens whose probability reaches top_p, and draws from a generator seeded
with `seed`. Generation stops at the tokenizer's EOS token or after max_new_tokens.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..core.state import state_of
from ..errors import LowbitError

RUNTIMES = ("auto", "lean", "transformers")


def build_prompt(tokenizer, prompt: str, chat: bool = False) -> torch.Tensor:
    if tokenizer is None:
        raise LowbitError("the model has no tokenizer: cannot generate text")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise LowbitError("the model's tokenizer has no chat template (drop --chat)")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        return ids
    return tokenizer(prompt, return_tensors="pt").input_ids


def pick_runtime(model: nn.Module, runtime: str = "auto") -> str:
    from .decoder import unsupported_reason

    if runtime not in RUNTIMES:
        raise LowbitError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime == "transformers":
        return runtime
    why = unsupported_reason(model)
    if why and runtime == "lean":
        raise LowbitError(f"lean runtime: {why}")
    return "transformers" if why else "lean"


def check_logits(logits: torch.Tensor, model: nn.Module | None = None, masked: bool = False) -> None:
    """Non-finite logits (NaN or Inf weights or scales) choose no token: an error, not arbitrary text.
    masked: logits after transformers' processors, which set -inf where a token is ruled out."""
    bad = bool(torch.isnan(logits).any() or torch.isposinf(logits).any()) if masked else not bool(torch.isfinite(logits).all())
    if bad:
        raise LowbitError(f"{state_of(model).source or 'model'}: the model's logits are not finite "
                          "(NaN or Inf in its weights or scales)")


def next_token(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> int:
    """logits [vocab] -> the next token id."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        p, idx = probs.sort(descending=True)
        keep = p.cumsum(0) - p < top_p  # the smallest prefix whose mass reaches top_p (at least one token)
        probs = torch.zeros_like(probs).scatter_(0, idx[keep], p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


def generate_ids(model: nn.Module, ids: torch.Tensor, max_new_tokens: int, eos: set[int] = frozenset(),
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 on_token: Callable[[int], None] | None = None, decoder=None) -> list[int]:
    """New token ids after the prompt ids [1, M] on the lean runtime (or the given LeanDecoder)."""
    from .decoder import LeanDecoder

    dec = decoder or LeanDecoder(model, max_len=ids.shape[-1] + max_new_tokens)
    dec.reset()
    gen = torch.Generator().manual_seed(seed) if temperature > 0 else None
    logits = dec.forward(ids.reshape(-1), all_logits=False)[-1]
    out: list[int] = []
    for i in range(max_new_tokens):
        check_logits(logits, model)
        t = next_token(logits, temperature, top_p, gen)
        out.append(t)
        if on_token is not None:
            on_token(t)
        if t in eos or i == max_new_tokens - 1:
            break
        logits = dec.forward(torch.tensor([t]))[-1]
    return out


@torch.inference_mode()
def generate(
    model: nn.Module,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 64,
    chat: bool = False,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    on_text: Callable[[str], None] | None = None,
    runtime: str = "auto",
) -> str:
    """Greedy (temperature 0) or sampled continuation; `on_text` receives text as it is produced."""
    from transformers import TextStreamer

    if max_new_tokens < 1:
        raise LowbitError(f"max new tokens must be at least 1, got {max_new_tokens}")
    if not 0.0 < top_p <= 1.0:
        raise LowbitError(f"top-p must be in (0, 1], got {top_p}")
    ids = build_prompt(tokenizer, prompt, chat)
    from ..models.validate import check_token_ids

    check_token_ids(ids, model)
    streamer = None
    if on_text is not None:
        class _Stream(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                on_text(text)

        streamer = _Stream(tokenizer, skip_prompt=True, skip_special_tokens=True)
    if pick_runtime(model, runtime) == "lean":
        eos = tokenizer.eos_token_id
        eos = set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())
        if streamer is not None:
            streamer.put(ids)  # the prompt (skipped)
        new = generate_ids(model, ids, max_new_tokens, eos=eos, temperature=temperature, top_p=top_p, seed=seed,
                           on_token=None if streamer is None else lambda t: streamer.put(torch.tensor([t])))
        if streamer is not None:
            streamer.end()
        return tokenizer.decode(new, skip_special_tokens=True)
    from transformers import LogitsProcessor, LogitsProcessorList

    class _Finite(LogitsProcessor):
        def __call__(self, input_ids, scores):
            check_logits(scores, model, masked=True)
            return scores

    kwargs = dict(max_new_tokens=max_new_tokens, streamer=streamer, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                  logits_processor=LogitsProcessorList([_Finite()]))
    if temperature > 0:
        torch.manual_seed(seed)
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
