"""Shared fixtures: a tiny random LLaMA with a real (tiny) tokenizer, built in the test."""
from __future__ import annotations

import contextlib
import io
import sys

import pytest
import torch

TEXT = (
    "The quick brown fox jumps over the lazy dog. A quantized model keeps its codes packed.\n"
    "Perplexity is the exponential of the mean negative log likelihood of the next token.\n"
) * 40


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<eos>")


def make_tiny_llama(tie: bool = True, seed: int = 0):
    """2 layers, hidden 72 (so group 32 leaves a short last group), GQA 4/2, vocab 320."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=320, hidden_size=72, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=tie, eos_token_id=0, bos_token_id=0, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture()
def tiny():
    return make_tiny_llama(), make_tokenizer()


@pytest.fixture()
def calib(tiny):
    """[8, 64] calibration token windows for the tiny model."""
    _, tok = tiny
    ids = tok(TEXT, add_special_tokens=False, return_tensors="pt").input_ids[0]
    return ids[: 8 * 64].reshape(8, 64)


@pytest.fixture()
def tiny_dir(tmp_path):
    """A tiny LLaMA saved as a Hugging Face folder (a MODEL source like any other)."""
    model, tok = make_tiny_llama(), make_tokenizer()
    d = tmp_path / "tiny-hf"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture()
def text_file(tmp_path):
    p = tmp_path / "text.txt"
    p.write_text(TEXT)
    return p


@pytest.fixture()
def cli():
    """Run the CLI in-process: cli(*args) -> (exit code, stdout, stderr)."""
    from lowbit.cli import main

    def run(*args: str):
        out, err = io.StringIO(), io.StringIO()
        argv = sys.argv
        sys.argv = ["lowbit", *map(str, args)]
        code = 0
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        finally:
            sys.argv = argv
        return code, out.getvalue(), err.getvalue()

    return run
