"""Quantization-aware training: fake quantization with a straight-through estimator (STE).

    forward:  ŵ = s · (clamp(round(w/s) + z, qmin, qmax) − z)       (the lowbit grid, exactly)
    backward: ∂ŵ/∂w = 1 where the code was not clamped, 0 where it was  (clipped STE)
              ∂ŵ/∂s = round(w/s) − w/s inside, (q − z) outside         (LSQ, Esser et al. 2020)

The weights train in float; every forward sees them on the grid, so the loss is the loss of the
quantized model. Scales train optionally (LSQ), zero points optionally (rounded with an STE).
Scales are used as fp16 (as stored in checkpoints) through an STE, so ``convert`` turns the
trained model into packed QuantLinear layers whose dequantized weights equal ŵ bit for bit.

Training: AdamW, linear warm-up then cosine decay, gradient clipping, optional distillation
(KL of the student's next-token distribution from the float teacher's). Batches are a pure
function of (seed, step), and the state (trainable tensors, AdamW moments, step) is saved as
safetensors + JSON, so ``--resume`` continues exactly where an interrupted run stopped.
Loading, scoring and saving around the training: workflows/qat.py.
"""
from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..core.config import Options, QuantConfig, option
from ..core.quant import QTensor, compute_qparams, grouped, quantize_codes, ungrouped
from ..core.scheme import Scheme
from ..core.state import QuantRecord, state_of, set_quant
from ..errors import LowbitError
from ..models.arch import get_module, select_modules, set_module
from ..nn.qlinear import QuantLinear
from .registry import CalibOptions, MethodSpec, register


MIN_SCALE = 1e-5  # learned scales stay above this: still > 0 once stored as fp16 (its subnormals end at 6e-8)


class _FixedGridSTE(torch.autograd.Function):
    """ŵ = s·(clamp(round(w/s) + z) − z) for fixed s, z; ∂ŵ/∂w = 1 inside the range, 0 where clamped."""

    @staticmethod
    def forward(ctx, w, s, z, qmin, qmax):  # type: ignore[override]
        q = torch.round(w / s)
        if z is not None:
            q += z
        inside = (q >= qmin) & (q <= qmax)
        q.clamp_(qmin, qmax)
        if z is not None:
            q -= z
        ctx.save_for_backward(inside)
        return q.mul_(s)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return torch.where(inside, grad, 0.0), None, None, None, None


class FakeQuantLinear(nn.Module):
    """A Linear trained in float whose forward uses its weight quantized-dequantized on ``scheme``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, scheme: Scheme, scale: torch.Tensor,
                 zero: torch.Tensor | None, learn_scale: bool = False, learn_zero: bool = False) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.scheme = scheme
        self.weight = nn.Parameter(weight.detach().float().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        self.scale = nn.Parameter(scale.detach().float().clone(), requires_grad=learn_scale)  # [R, G]
        self.zero = None
        if zero is not None:
            self.zero = nn.Parameter(zero.detach().float().clone(), requires_grad=learn_zero)

    @classmethod
    def from_linear(cls, lin: nn.Linear, scheme: Scheme, **kw) -> "FakeQuantLinear":
        """Initialized as RTN: min/max scales of the float weight."""
        s, z = compute_qparams(lin.weight.detach(), scheme)
        return cls(lin.weight, lin.bias, scheme, s, z, **kw)

    @classmethod
    def from_quant(cls, q: QuantLinear, **kw) -> "FakeQuantLinear":
        """Initialized from a PTQ result (RTN, GPTQ, AWQ): its dequantized weight, scales and zero points,
        so that step 0 reproduces the PTQ model exactly."""
        return cls(q.dequantize_weight(), q.bias, q.scheme, q.scales.detach(), q.zero_points(), **kw)

    def _scale(self) -> torch.Tensor:
        """The scale as stored (fp16), with a straight-through gradient for the rounding."""
        s = self.scale.clamp(min=MIN_SCALE)
        return s + (s.to(self.scheme.torch_scale_dtype).float() - s).detach()

    def _zero(self) -> torch.Tensor | None:
        if self.zero is None:
            return None
        z = self.zero
        return z + (torch.round(z).clamp(0, self.scheme.qmax) - z).detach()

    def quantized_weight(self) -> torch.Tensor:
        rows, cols = self.weight.shape
        wg = grouped(self.weight, self.scheme)  # [R, G, g]
        if self.scale.requires_grad or (self.zero is not None and self.zero.requires_grad):
            s = self._scale().unsqueeze(-1)
            z = self._zero()
            z = None if z is None else z.unsqueeze(-1)
            v = wg / s
            q = v + (torch.round(v) - v).detach()  # STE: round in the forward, identity in the backward
            if z is not None:
                q = q + z
            q = q.clamp(self.scheme.qmin, self.scheme.qmax)  # zero gradient where clamped
            if z is not None:
                q = q - z
            return ungrouped(q * s, rows, cols)
        with torch.no_grad():  # fixed grid: one fused op in each direction
            s = self.scale.clamp(min=MIN_SCALE).to(self.scheme.torch_scale_dtype).float().unsqueeze(-1)
            z = None if self.zero is None else torch.round(self.zero).clamp(0, self.scheme.qmax).unsqueeze(-1)
        return ungrouped(_FixedGridSTE.apply(wg, s, z, self.scheme.qmin, self.scheme.qmax), rows, cols)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def qtensor(self) -> QTensor:
        scale = self.scale.clamp(min=MIN_SCALE).to(self.scheme.torch_scale_dtype)
        zero = None
        if self.zero is not None:
            zero = torch.round(self.zero).clamp(0, self.scheme.qmax).to(torch.int16)
        q = quantize_codes(grouped(self.weight.detach(), self.scheme), scale, zero, self.scheme)
        codes = ungrouped(q, self.out_features, self.in_features)
        codes = codes.to(torch.int8 if self.scheme.symmetric else torch.uint8)
        return QTensor(codes=codes, scale=scale, zero=zero, scheme=self.scheme, shape=self.weight.shape)

    @torch.no_grad()
    def to_quant_linear(self) -> QuantLinear:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        lin.weight.data.copy_(self.weight.detach())
        if self.bias is not None:
            lin.bias.data.copy_(self.bias.detach())
        return QuantLinear.from_linear(lin, self.scheme, qt=self.qtensor())

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.scheme.describe()}"


def prepare(model: nn.Module, config: QuantConfig, learn_scale: bool = False, learn_zero: bool = False) -> dict[str, Scheme]:
    """Swap the selected layers for FakeQuantLinear, in place: float Linears start as RTN, packed
    QuantLinears (a PTQ checkpoint given as the model) start from their codes. Everything else is frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    done: dict[str, Scheme] = {}
    names = select_modules(model, config.include, config.exclude, tuple(config.overrides))
    if not names:
        quantized = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
        names = quantized
    for name in names:
        mod = get_module(model, name)
        if isinstance(mod, QuantLinear):
            fq = FakeQuantLinear.from_quant(mod, learn_scale=learn_scale, learn_zero=learn_zero)
        elif isinstance(mod, nn.Linear):
            fq = FakeQuantLinear.from_linear(mod, config.scheme_for(name), learn_scale=learn_scale,
                                             learn_zero=learn_zero)
        else:
            raise LowbitError(f"qat trains Linear layers only: {name} is {type(mod).__name__}")
        set_module(model, name, fq)
        done[name] = fq.scheme
    return done


def pack(model: nn.Module) -> dict[str, Scheme]:
    """Replace every FakeQuantLinear by the packed QuantLinear it stands for; returns {name: scheme}."""
    modules: dict[str, Scheme] = {}
    for name, mod in list(model.named_modules()):
        if isinstance(mod, FakeQuantLinear):
            set_module(model, name, mod.to_quant_linear())
            modules[name] = mod.scheme
    for p in model.parameters():
        p.requires_grad_(False)
    return modules


def convert(model: nn.Module, config: QuantConfig) -> nn.Module:
    """pack(), and record the quantization."""
    modules = pack(model)
    set_quant(model, QuantRecord(config, modules))
    return model


# ----------------------------------------------------------------------------- training


@dataclass
class TrainConfig:
    steps: int = option(200, "Optimizer steps.")
    lr: float = option(1e-5, "Peak learning rate of the weights (AdamW, warm-up then cosine).")
    scale_lr: float | None = option(None, "Learning rate of scales/zero points [default: --lr].")
    batch: int = option(4, "Windows per step.")
    seqlen: int = option(256, "Tokens per training window.")
    warmup: int | None = option(None, "Warm-up steps [default: 5% of --steps].")
    clip: float = option(1.0, "Gradient clipping (global norm).")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    distill: bool = option(False, "Loss = KL(float teacher || student) on the next-token distribution.")
    seed: int = option(0, "Seed of the training windows (the config's seed).", cli=False)
    save_every: int = option(50, "Save the training state every K steps (for --resume).", cli=False)  # lowbit qat

    def lr_factor(self, step: int) -> float:
        warm = self.warmup if self.warmup is not None else max(1, self.steps // 20)
        if step < warm:
            return (step + 1) / warm
        prog = (step - warm) / max(1, self.steps - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, prog)))


def batch_at(ids: torch.Tensor, cfg: TrainConfig, step: int) -> torch.Tensor:
    """The training windows of one step: a pure function of (seed, step), so a resumed run sees the same."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    starts = torch.randint(0, ids.numel() - cfg.seqlen, (cfg.batch,), generator=g)
    return torch.stack([ids[s: s + cfg.seqlen] for s in starts.tolist()])


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    params = trainable(model)
    weights = [p for n, p in params.items() if not n.endswith((".scale", ".zero"))]
    qparams = [p for n, p in params.items() if n.endswith((".scale", ".zero"))]
    groups = [{"params": weights, "lr": cfg.lr, "base_lr": cfg.lr}]
    if qparams:
        slr = cfg.scale_lr if cfg.scale_lr is not None else cfg.lr
        groups.append({"params": qparams, "lr": slr, "base_lr": slr, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=cfg.weight_decay, fused=True)


def loss_fn(student: nn.Module, teacher: nn.Module | None, x: torch.Tensor, distill: bool) -> torch.Tensor:
    logits = student(x).logits[:, :-1].float()
    if distill:
        with torch.no_grad():
            t = teacher(x).logits[:, :-1].float()
        logp = F.log_softmax(logits, dim=-1).flatten(0, 1)
        logq = F.log_softmax(t, dim=-1).flatten(0, 1)
        return F.kl_div(logp, logq, log_target=True, reduction="batchmean")  # KL(teacher || student) per token
    return F.cross_entropy(logits.flatten(0, 1), x[:, 1:].reshape(-1))


STATE_TENSORS = "state.safetensors"
STATE_META = "state.json"


def save_state(path: Path, model: nn.Module, opt: torch.optim.AdamW, step: int, meta: dict) -> None:
    """Trainable tensors + AdamW moments (safetensors) and the step (JSON), replaced atomically."""
    from safetensors.torch import save_file

    params = trainable(model)
    by_id = {id(p): n for n, p in params.items()}
    tensors = {f"param.{n}": p.detach().contiguous() for n, p in params.items()}
    for p, st in opt.state.items():
        n = by_id[id(p)]
        for k in ("exp_avg", "exp_avg_sq"):
            tensors[f"adam.{k}.{n}"] = st[k].contiguous()
        tensors[f"adam.step.{n}"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / (STATE_TENSORS + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path / STATE_TENSORS)
    tmpj = path / (STATE_META + ".tmp")
    tmpj.write_text(json.dumps({**meta, "step": step}))
    os.replace(tmpj, path / STATE_META)


def load_state(path: Path, model: nn.Module, opt: torch.optim.AdamW) -> dict:
    from safetensors import safe_open

    meta = json.loads((path / STATE_META).read_text())
    params = trainable(model)
    with safe_open(str(path / STATE_TENSORS), framework="pt") as f:
        keys = set(f.keys())
        for n, p in params.items():
            if f"param.{n}" not in keys:
                raise LowbitError(f"{path}: resume state has no tensor for {n} (a different model or options?)")
            with torch.no_grad():
                p.copy_(f.get_tensor(f"param.{n}"))
            if f"adam.exp_avg.{n}" in keys:
                opt.state[p] = {"step": torch.tensor(float(f.get_tensor(f"adam.step.{n}")[0])),
                                "exp_avg": f.get_tensor(f"adam.exp_avg.{n}"),
                                "exp_avg_sq": f.get_tensor(f"adam.exp_avg_sq.{n}")}
    return meta


def train(student: nn.Module, teacher: nn.Module | None, ids: torch.Tensor, cfg: TrainConfig,
          state_dir: Path | None = None, resume: bool = False, progress: bool = True, log=None) -> list[dict]:
    """Run cfg.steps optimizer steps (from the saved step when resuming). Returns the per-step log."""
    from tqdm.auto import tqdm

    if ids.numel() <= cfg.seqlen + 1:
        raise LowbitError(f"training text: {ids.numel()} tokens, too short for windows of {cfg.seqlen}")
    if cfg.distill and teacher is None:
        raise LowbitError("distillation needs the float teacher model")
    opt = make_optimizer(student, cfg)
    start = 0
    if resume:
        if state_dir is None or not (state_dir / STATE_META).is_file():
            raise LowbitError(f"--resume: no saved state in {state_dir}")
        meta = load_state(state_dir, student, opt)
        if meta.get("train_config") != asdict(cfg):
            raise LowbitError(f"{state_dir}: saved with other training options {meta.get('train_config')}")
        start = int(meta["step"])
    params = list(trainable(student).values())
    history: list[dict] = []
    student.train()
    meta = {"train_config": asdict(cfg)}
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="qat", unit="step",
               file=sys.stderr, disable=not progress)
    step = start
    try:
        for step in bar:
            t0 = time.perf_counter()
            f = cfg.lr_factor(step)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * f
            x = batch_at(ids, cfg, step)
            loss = loss_fn(student, teacher, x, cfg.distill)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip))
            opt.step()
            dt = time.perf_counter() - t0
            rec = {"step": step + 1, "loss": loss.item(), "grad_norm": gnorm, "lr": opt.param_groups[0]["lr"],
                   "tok_s": x.numel() / dt}
            history.append(rec)
            if log is not None:
                log(rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tok_s']:.0f}")
            if state_dir is not None and cfg.save_every and (step + 1) % cfg.save_every == 0:
                save_state(state_dir, student, opt, step + 1, meta)
    except KeyboardInterrupt:
        done = history[-1]["step"] if history else start
        if state_dir is not None and done > start:
            save_state(state_dir, student, opt, done, meta)
            print(f"lowbit: interrupted after step {done}; state saved in {state_dir} (continue with --resume)",
                  file=sys.stderr)
        raise
    finally:
        bar.close()
        student.eval()
    if state_dir is not None and history:
        save_state(state_dir, student, opt, history[-1]["step"], meta)
    return history


# ----------------------------------------------------------------------------- block-wise phase


@dataclass
class BlockConfig:
    """Block-wise training (Block-AP of EfficientQAT, Chen et al. 2024, after OmniQuant): each decoder
    block's fake-quant weights and scales learn to reproduce the float block's output, one block at a time."""
    epochs: int = option(0, "Block-wise phase first (EfficientQAT's Block-AP): epochs over --block-samples "
                            "windows per decoder block; 0 = none.")
    lr: float = option(1e-3, "Block-wise phase: peak learning rate of the weights.")
    scale_lr: float | None = option(None, "Block-wise phase: learning rate of scales/zero points [default: "
                                          "--block-lr].")
    batch: int = option(2, "Block-wise phase: windows per step.")
    nsamples: int = option(64, "Block-wise phase: training windows (from the training text).", flag="--samples")
    seqlen: int = option(512, "Block-wise phase: tokens per window.")
    seed: int = option(0, "Seed of the training windows (the config's seed).", cli=False)

    def steps_per_block(self) -> int:
        return self.epochs * math.ceil(self.nsamples / self.batch)


def _block_state(path: Path) -> tuple[int, dict]:
    meta_f = path / "blocks.json"
    if not meta_f.is_file():
        return 0, {}
    meta = json.loads(meta_f.read_text())
    return int(meta["done"]), meta


def _save_block_state(path: Path, index: int, block_name: str, block: nn.Module, meta: dict,
                      history: list[dict]) -> None:
    """The trained tensors of block `index` (its own file, written once), then the progress (JSON):
    each replaced atomically, the JSON last, so a crash never records a block whose tensors are missing."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    tensors = {f"{block_name}.{n}": p.detach().contiguous() for n, p in block.named_parameters() if p.requires_grad}
    tmp = path / f"block-{index}.safetensors.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, path / f"block-{index}.safetensors")
    tmpj = path / "blocks.json.tmp"
    tmpj.write_text(json.dumps({**meta, "done": index + 1, "history": history}))
    os.replace(tmpj, path / "blocks.json")


def train_blockwise(student: nn.Module, teacher: nn.Module, ids: torch.Tensor, bcfg: BlockConfig,
                    state_dir: Path | None = None, resume: bool = False, progress: bool = True,
                    log=None) -> list[dict]:
    """For block i (in order): inputs = the outputs of the already-trained quantized blocks 0..i-1,
    target = the float block i on the float model's own inputs (so errors of earlier blocks are
    compensated, not copied); loss = MSE; AdamW with warm-up + cosine over the block's steps on the
    block's trainable tensors (fake-quant weights, and scales/zero points when learned).
    `student` has been through `prepare`; `ids` is the training text's token ids.
    Memory: two models plus three sets of nsamples x seqlen x hidden activations.
    With `state_dir` the trained tensors are saved after every block and `resume` continues after
    the last finished block (its inputs are recomputed through the saved blocks)."""
    from tqdm.auto import tqdm

    from ..calibration.sequential import capture_block_inputs, run_block
    from ..models.arch import find_blocks

    if bcfg.epochs < 1:
        return []
    if ids.numel() <= bcfg.seqlen + 1:
        raise LowbitError(f"training text: {ids.numel()} tokens, too short for windows of {bcfg.seqlen}")
    g = torch.Generator().manual_seed(bcfg.seed)
    starts = torch.randint(0, ids.numel() - bcfg.seqlen, (bcfg.nsamples,), generator=g)
    windows = torch.stack([ids[s: s + bcfg.seqlen] for s in starts.tolist()])  # [N, L]
    s_blocks, t_blocks = find_blocks(student), find_blocks(teacher)
    if len(s_blocks) != len(t_blocks):
        raise LowbitError(f"student has {len(s_blocks)} blocks, the float model {len(t_blocks)}")
    meta = {"block_config": asdict(bcfg)}
    first, history = 0, []
    if resume and state_dir is not None:
        first, saved = _block_state(state_dir)
        if first and saved.get("block_config") != asdict(bcfg):
            raise LowbitError(f"{state_dir}: block-wise phase saved with other options {saved.get('block_config')}")
        if first:
            from safetensors.torch import load_file
            params = dict(student.named_parameters())
            with torch.no_grad():
                for i in range(first):
                    for n, t in load_file(str(state_dir / f"block-{i}.safetensors")).items():
                        if n not in params:
                            raise LowbitError(f"{state_dir}: saved tensor {n} is not in this model")
                        params[n].copy_(t)
            history = saved.get("history", [])
            if first >= len(s_blocks):
                return history
    q_in, kw = capture_block_inputs(student, s_blocks[0][1], windows)
    f_in, _ = capture_block_inputs(teacher, t_blocks[0][1], windows)
    bar = tqdm(total=len(s_blocks), initial=first, desc="qat blocks", unit="block", file=sys.stderr,
               disable=not progress)
    t_start = time.perf_counter()
    try:
        for i, ((name, sb), (_, tb)) in enumerate(zip(s_blocks, t_blocks)):
            target = run_block(tb, f_in, kw)
            if i >= first:
                rec = _train_one_block(name, sb, q_in, target, kw, bcfg, i)
                rec["elapsed_s"] = round(time.perf_counter() - t_start, 1)
                history.append(rec)
                if log is not None:
                    log(rec)
                bar.set_postfix(mse=f"{rec['mse_after']:.3g}", was=f"{rec['mse_before']:.3g}")
                bar.update(1)
                if state_dir is not None:
                    _save_block_state(state_dir, i, name, sb, meta, history)
            with torch.no_grad():
                sb.eval()
                q_in = run_block(sb, q_in, kw)
            f_in = target
    finally:
        bar.close()
        student.eval()
    return history


def _train_one_block(name: str, block: nn.Module, q_in: list[torch.Tensor], target: list[torch.Tensor], kw: dict,
                     bcfg: BlockConfig, index: int) -> dict:
    if not trainable(block):
        raise LowbitError(f"{name}: nothing to train in this block (no fake-quant layers)")
    tcfg = TrainConfig(steps=bcfg.steps_per_block(), lr=bcfg.lr, scale_lr=bcfg.scale_lr)
    opt = make_optimizer(block, tcfg)
    x_all, y_all = torch.cat(q_in), torch.cat(target)  # [N, L, hidden]

    def forward(x: torch.Tensor) -> torch.Tensor:
        out = block(x, **kw)
        return out[0] if isinstance(out, (tuple, list)) else out

    def mse() -> float:
        with torch.no_grad():
            return sum(F.mse_loss(forward(x_all[j: j + 8]), y_all[j: j + 8], reduction="sum").item()
                       for j in range(0, len(x_all), 8)) / y_all.numel()

    block.eval()
    before = mse()
    block.train()
    g = torch.Generator().manual_seed(bcfg.seed * 1_000_003 + index)
    step, losses = 0, []
    for _ in range(bcfg.epochs):
        order = torch.randperm(len(x_all), generator=g)
        for j in range(0, len(order), bcfg.batch):
            idx = order[j: j + bcfg.batch]
            f = tcfg.lr_factor(step)
            for grp in opt.param_groups:
                grp["lr"] = grp["base_lr"] * f
            loss = F.mse_loss(forward(x_all[idx]), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
    block.eval()
    return {"block": name, "steps": step, "mse_before": before, "mse_after": mse(),
            "train_loss_last": sum(losses[-5:]) / len(losses[-5:])}


# ----------------------------------------------------------------------------- options, the method


@dataclass(frozen=True)
class QatOptions(Options):
    """QAT's settings, as `lowbit qat` records them (workflows/qat.py fills in what it did)."""

    train: TrainConfig = option(TrainConfig(), "End-to-end phase.")
    block: BlockConfig | None = option(None, "Block-wise phase (recorded where it ran).", prefix="block-")
    learn_scale: bool = option(False, "Train the scales too (LSQ gradient).", flag="--learn-scales")
    learn_zero: bool = option(False, "Train the zero points too (asymmetric grids).", flag="--learn-zeros")
    init: str | None = option(None, "The PTQ checkpoint training started from.", cli=False)
    train_text: str | None = option(None, "The training text's file name.", cli=False)
    tokens_seen: int | None = option(None, "Tokens of the end-to-end phase.", cli=False)

    def check(self) -> None:
        t, b = self.train, self.block
        blockwise = b is not None and b.epochs >= 1
        if t.steps < 0 or t.batch < 1 or t.seqlen < 2 or not t.lr > 0 or (t.steps == 0 and not blockwise):
            raise LowbitError("need --steps >= 0 (>= 1 without --block-epochs), --batch >= 1, --seqlen >= 2 and "
                              "--lr > 0")
        if b is not None and (b.epochs < 0 or b.nsamples < 1 or b.seqlen < 2 or b.batch < 1 or not b.lr > 0):
            raise LowbitError("need --block-epochs >= 0, --block-samples >= 1, --block-seqlen >= 2, "
                              "--block-batch >= 1 and --block-lr > 0")


@dataclass(frozen=True)
class QatMethodOptions(CalibOptions, QatOptions):
    """`lowbit quantize --method qat`: QAT's settings, trained on the calibration windows."""


def quantize_qat(model: nn.Module, config: QuantConfig, ctx) -> dict[str, Scheme]:
    """`quantize --method qat`: fake-quant training in place on the calibration windows (their tokens one after
    the other as the training text), then packed. Distillation and the block-wise phase learn from a float copy
    of the model taken first. `lowbit qat` (workflows/qat.py) adds held-out scores, --init and --resume."""
    ids = ctx.calib_ids().reshape(-1)
    o: QatMethodOptions = config.options  # after calib_ids(), which records what it drew in them
    tcfg = replace(o.train, seed=config.seed)
    block = replace(o.block, seed=config.seed) if o.block is not None and o.block.epochs >= 1 else None
    teacher = copy.deepcopy(model) if tcfg.distill or block is not None else None
    prepare(model, config, learn_scale=o.learn_scale, learn_zero=o.learn_zero)
    with torch.enable_grad():
        if block is not None:
            train_blockwise(model, teacher, ids, block)
        train(model, teacher if tcfg.distill else None, ids, tcfg)
    config.options = replace(o, train=tcfg, block=block, tokens_seen=tcfg.steps * tcfg.batch * tcfg.seqlen)
    return pack(model)


SPEC = register(MethodSpec(
    name="qat", run=quantize_qat, options=QatMethodOptions,
    help="quantization-aware training on the calibration windows, see also lowbit qat",
    calibration=True,  # the whole model trains at once: no block streaming
))
