"""Quantization-aware training end to end: load MODEL (and the float teacher), train it with fake quantization
(algorithms/qat.py: the block-wise phase, then the end-to-end steps), score held-out text before and after,
convert and save a packed checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import replace
from pathlib import Path

from ..algorithms.qat import STATE_META, BlockConfig, QatOptions, TrainConfig, convert, prepare, train, train_blockwise
from ..calibration.data import _TEST_SHA256
from ..core.config import QuantConfig
from ..core.text import CALIB_TEXT, TEST_TEXT, read_text
from ..core.tokens import tokenize
from ..errors import LowbitError
from ..eval.perplexity import evaluate
from ..formats.checkpoint import save_checkpoint
from ..core.io import check_output
from ..formats.load import load_model


def split_text(text: str, held_out: float = 0.1) -> tuple[str, str]:
    """(training part, held-out part): the last `held_out` share of the text, cut at a line break."""
    cut = text.rfind("\n", 0, int(len(text) * (1 - held_out)))
    cut = cut if cut > 0 else int(len(text) * (1 - held_out))
    return text[:cut], text[cut:]


def run(model_src: str, out: str | os.PathLike, config: QuantConfig, tcfg: TrainConfig, init: str | None = None,
        train_text: str | None = None, eval_text: str | None = None, learn_scale: bool = False,
        learn_zero: bool = False, state_dir: str | os.PathLike | None = None, resume: bool = False,
        eval_tokens: int | None = 16384, overwrite: bool = False, progress: bool = True,
        block: BlockConfig | None = None) -> dict:
    """Train MODEL (or the PTQ checkpoint ``init``) with fake quantization, convert, save to ``out``.
    With ``block.epochs`` > 0 a block-wise phase (``train_blockwise``) runs first, then the
    end-to-end steps of ``tcfg`` (none when tcfg.steps == 0).

    Training text: ``train_text`` (default WikiText-2 valid, minus its last 10% which is then the
    held-out text); never the test text. Returns the training log and held-out perplexities."""
    block = block or BlockConfig()
    opts = QatOptions(train=tcfg, block=block if block.epochs >= 1 else None, learn_scale=learn_scale,
                      learn_zero=learn_zero, init=init)  # checked before the long work
    out = check_output(out, overwrite=overwrite)
    def not_test(path):
        t, lab = read_text(path)
        if hashlib.sha256(t.encode()).hexdigest() == _TEST_SHA256 or os.path.realpath(lab) == os.path.realpath(TEST_TEXT):
            raise LowbitError(f"{lab}: this is the WikiText-2 test text; train and choose on other text")
        return t, lab

    text, label = not_test(train_text if train_text is not None else CALIB_TEXT)
    if eval_text is None:
        text, held = split_text(text)
        held_label = f"{os.path.basename(label)} (last 10%, not trained on)"
    else:
        held, held_label = not_test(eval_text)
    state_dir = Path(state_dir) if state_dir is not None else Path(str(out) + ".qat-state")
    teacher, tok = load_model(model_src)
    student, _ = load_model(init) if init else load_model(model_src)
    modules = prepare(student, config, learn_scale=learn_scale, learn_zero=learn_zero)
    schemes = sorted({s.describe() for s in modules.values()})
    ids = tokenize(tok, text)
    before = evaluate(student, tok, text=held, limit_tokens=eval_tokens, progress=progress)["ppl"]
    log_path = state_dir / "log.jsonl"
    state_dir.mkdir(parents=True, exist_ok=True)
    logf = open(log_path, "a")
    t0 = time.time()
    try:
        blocks = train_blockwise(student, teacher, ids, block, state_dir=state_dir, resume=resume, progress=progress,
                                 log=lambda r: (logf.write(json.dumps(r) + "\n"), logf.flush()))
        block_seconds = time.time() - t0
        if blocks and not (state_dir / STATE_META).is_file():
            resume = False  # interrupted before the end-to-end phase began: it starts from step 0
        hist = train(student, teacher if tcfg.distill else None, ids, tcfg, state_dir=state_dir, resume=resume,
                     progress=progress, log=lambda r: (logf.write(json.dumps(r) + "\n"), logf.flush()))
    finally:
        logf.close()
    seconds = time.time() - t0
    block_tokens = block.epochs * block.nsamples * block.seqlen if blocks else 0
    after = evaluate(student, tok, text=held, limit_tokens=eval_tokens, progress=progress)["ppl"]
    config.options = replace(opts, block=block if blocks else None, train_text=os.path.basename(label),
                             tokens_seen=tcfg.steps * tcfg.batch * tcfg.seqlen)
    if config.scheme is None or (init and len(schemes) == 1):
        config.scheme = next(iter(modules.values()))
    convert(student, config)
    save_checkpoint(student, tok, out, overwrite=overwrite)
    return {"out": str(out), "schemes": schemes, "steps": tcfg.steps, "tokens_seen": tcfg.steps * tcfg.batch * tcfg.seqlen,
            "block_epochs": block.epochs if blocks else 0, "block_tokens_per_block": block_tokens,
            "block_seconds": round(block_seconds, 1), "block_mse": [(b["mse_before"], b["mse_after"]) for b in blocks],
            "train_seconds": round(seconds, 1), "heldout_text": held_label, "heldout_ppl_before": before,
            "heldout_ppl_after": after, "final_loss": hist[-1]["loss"] if hist else None, "state_dir": str(state_dir)}
