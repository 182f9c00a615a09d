"""llm-compressor, run inside its own venv by bench/peers/run.py.

    python peer_llmcompressor.py quantize MODEL_DIR OUT TOKENS.safetensors --bits 4 --group-size 64 [--asym] [--batch 8]
    python peer_llmcompressor.py eval OUT TOKENS.safetensors
GPTQModifier with its defaults otherwise (dampening 0.01, actorder "static"); lm_head left float."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ppl import peak_rss_line, peer_args, scores, stored_bpw  # noqa: E402


def main() -> None:
    a = peer_args(default_group=64)
    from transformers import AutoModelForCausalLM

    if a.cmd == "quantize":
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import GPTQModifier

        model_dir, out, tokens = a.paths
        calib = load_file(tokens)["calib"]
        ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
        weights = QuantizationArgs(num_bits=a.bits, type="int", symmetric=not a.asym, strategy="group",
                                   group_size=a.group_size)
        recipe = GPTQModifier(config_groups={"g": QuantizationScheme(targets=["Linear"], weights=weights)},
                              ignore=["lm_head"])
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=calib.shape[0],
                max_seq_length=calib.shape[1], batch_size=a.batch, shuffle_calibration_samples=False)
        model.save_pretrained(out, save_compressed=True)
        print(json.dumps(stored_bpw(out, model_dir)))
    else:
        out, tokens = a.paths
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        print(json.dumps(scores(model, tokens)))
    print(peak_rss_line(), file=sys.stderr)


if __name__ == "__main__":
    main()
