"""Text generation with a KV cache (transformers' generate), streaming to a callback."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .errors import LowbitError


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
) -> str:
    """Greedy (temperature 0) or sampled continuation; `on_text` receives text as it is produced."""
    from transformers import TextStreamer

    if max_new_tokens < 1:
        raise LowbitError(f"max new tokens must be at least 1, got {max_new_tokens}")
    ids = build_prompt(tokenizer, prompt, chat)
    streamer = None
    if on_text is not None:
        class _Stream(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                on_text(text)

        streamer = _Stream(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(max_new_tokens=max_new_tokens, streamer=streamer, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    if temperature > 0:
        torch.manual_seed(seed)
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
