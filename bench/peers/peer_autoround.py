"""AutoRound (Intel's auto-round: sign-gradient learned rounding and weight clipping, block by block), run inside
its own venv by bench/peers/run.py.

    python peer_autoround.py quantize MODEL_DIR OUT TOKENS.safetensors --bits 4 --group-size 128 [--asym]
                             [--iters 200] [--lr LR] [--batch 8]
    python peer_autoround.py eval OUT TOKENS.safetensors
Its defaults otherwise (symmetric, lr 1/iters unless --lr, minmax lr = lr, sign-SGD over every decoder block); the
calibration windows are the shared token file's (handed over as token ids, its seqlen and count), not its
default pile-10k download. float32 on the CPU. Saved in its "auto_round" format (GPTQ-style packed int32 codes,
fp16 scales, packed zero points), which transformers loads with auto-round installed."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ppl import peak_rss_line, peer_args, scores, stored_bpw  # noqa: E402


@torch.no_grad()
def load_dequantized(out: Path):
    """The float32 model auto-round's own CPU kernel computes with. transformers' loader of this auto-round
    version picks a "fake" backend on this CPU and leaves the linears randomly initialised (the packed tensors
    reported UNEXPECTED), so the model is built from its config without the quantization entry, every
    non-linear tensor is loaded as saved, and every quantized linear's weight is what auto-round's torch
    QuantLinear (auto_gptq packing, zero points stored minus one) computes on the identity matrix (its
    g_idx path slices scales by input columns, so it is built without one, over whole groups: a 576-column
    layer at g128 as 640 columns, the padding sliced off). Every parameter must come from the file."""
    from auto_round_extension.torch.qlinear_torch_zp import QuantLinear
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(out)
    q = cfg.quantization_config
    bits, group = int(q["bits"]), int(q["group_size"])
    del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    t = {}
    for f in sorted(out.glob("*.safetensors")):
        t.update(load_file(f))
    params = dict(model.named_parameters())
    done = set()
    for name in sorted({k.rsplit(".", 1)[0] for k in t if k.endswith(".qweight")}):
        lin = model.get_submodule(name)
        k = -(-lin.in_features // group) * group  # its kernel repeats each scale `group` times: whole groups
        ql = QuantLinear(bits, group, k, lin.out_features, bias=False)
        qw = t[f"{name}.qweight"]
        ql.qweight.zero_()[: qw.shape[0]].copy_(qw)  # padded input columns: code 0, sliced off below
        ql.qzeros.copy_(t[f"{name}.qzeros"])
        ql.scales.copy_(t[f"{name}.scales"])
        lin.weight.copy_(ql(torch.eye(k, dtype=torch.float32)).float()[: lin.in_features].T)
        done.add(f"{name}.weight")
        if lin.bias is not None:
            lin.bias.copy_(t[f"{name}.bias"])
            done.add(f"{name}.bias")
    for k, v in t.items():
        if k in params and k not in done:
            params[k].data.copy_(v.float())
            done.add(k)
    if getattr(cfg, "tie_word_embeddings", False):
        done.add("lm_head.weight")
    missing = [k for k in params if k not in done]
    if missing:
        raise SystemExit(f"{out}: no saved tensor for {missing[:3]} ({len(missing)} parameters)")
    return model.eval(), len([k for k in t if k.endswith(".qweight")])


def pop_option(flag: str, default: str | None) -> str | None:
    """The value of `flag VALUE` or `flag=VALUE` in sys.argv, removed from it (peer_args does not know it)."""
    for i, arg in enumerate(sys.argv):
        if arg == flag:
            value = sys.argv[i + 1]
            del sys.argv[i: i + 2]
            return value
        if arg.startswith(flag + "="):
            del sys.argv[i]
            return arg.split("=", 1)[1]
    return default


def flatten_output(out: Path) -> None:
    """auto-round 0.16 saves into OUT/<model folder name>-w<bits>g<group>/ rather than OUT: move that one
    folder's files up, so OUT is the checkpoint."""
    if (out / "config.json").exists():
        return
    subs = [d for d in out.iterdir() if d.is_dir() and (d / "config.json").exists()]
    if len(subs) != 1:
        raise SystemExit(f"auto-round saved no checkpoint folder under {out}")
    for f in subs[0].iterdir():
        f.rename(out / f.name)
    subs[0].rmdir()


def main() -> None:
    iters = int(pop_option("--iters", "200"))
    lr = pop_option("--lr", None)
    lr = float(lr) if lr is not None else None
    a = peer_args(default_group=128)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if a.cmd == "quantize":
        from auto_round import AutoRound

        model_dir, out, tokens = a.paths
        calib = load_file(tokens)["calib"]
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(model_dir)
        batches = list(calib.split(a.batch))
        ar = AutoRound(model, tok, bits=a.bits, group_size=a.group_size, sym=not a.asym, dataset=batches,
                       iters=iters, lr=lr, nsamples=calib.shape[0], seqlen=calib.shape[1], batch_size=a.batch,
                       device_map="cpu", amp=False, enable_torch_compile=False)
        ar.quantize_and_save(out, format="auto_round")
        flatten_output(Path(out))
        print(json.dumps({**stored_bpw(out, model_dir), "iters": iters, "lr": lr}))
    else:
        out, tokens = a.paths
        model, n = load_dequantized(Path(out))
        print(json.dumps({**scores(model, tokens), "dequantized_linears": n}))
    print(peak_rss_line(), file=sys.stderr)


if __name__ == "__main__":
    main()
