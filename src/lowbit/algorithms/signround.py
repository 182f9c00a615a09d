"""SignRound (Cheng et al. 2023, the method of Intel's AutoRound): learned rounding and clipping, block by block.

Every selected linear of a decoder block gets, per weight, a rounding offset v ∈ [−0.5, 0.5] and, per group, two
range factors α, β ∈ [0.5, 1] (the group's max is α·b, its min β·a; symmetric grids use α only). The block's
fake-quantized forward is

    s = round_up_fp16((α·b − β·a) / (2^k − 1)),  z = −round(β·a / s),  Ŵ = s · (clamp(round(W/s + v) + z) − z)

with straight-through rounding, and (v, α, β) follow signed gradient descent, lr decaying linearly to zero, on
the mean squared error between the block's output on the inputs the already-quantized blocks produce and the
float block's output on the float model's inputs (errors of earlier blocks are compensated, not copied). A
batch of windows per step, drawn with a seeded generator; the parameters of the step of least loss are kept.
Then each linear stores the codes round(W/s + v) + z with the scale it was trained with (fp16, as stored).

With 0 iterations it is RTN exactly (v = 0, α = β = 1: min/max scales and round-to-nearest), the differential
test of tests/algorithms/test_signround.py.

Calibration windows as every calibrated method (WikiText-2 valid). The whole model is in memory (the float
stream of inputs is kept beside the quantized one: 2 × windows × seqlen × hidden floats), and the output is
written at the end (no resume).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..calibration.sequential import layer_sequential, run_block
from ..core.config import QuantConfig, option
from ..core.quant import QTensor, group_range, grouped, round_scale_up, ungrouped
from ..core.scheme import Scheme
from ..errors import LowbitError
from ..models.arch import block_linears, select_modules, set_module
from ..nn.qlinear import QuantLinear
from .registry import CalibOptions, MethodSpec, Schemes, register


@dataclass(frozen=True)
class SignRoundOptions(CalibOptions):
    iters: int = option(200, "Signed-gradient steps per decoder block (AutoRound's default 200; its 'light' "
                             "recipe 50).", flag="--round-iters")
    lr: float | None = option(None, "Step size of the rounding offsets, decaying linearly to 0 [default: "
                                    "1/--round-iters].", flag="--round-lr")
    minmax_lr: float | None = option(None, "Step size of the range factors [default: --round-lr].",
                                     flag="--round-minmax-lr")
    batch: int = option(8, "Calibration windows per step.", flag="--round-batch")
    seed: int = option(0, "Seed of the batches.", cli=False)

    def check(self) -> None:
        super().check()
        if self.iters < 0 or self.batch < 1:
            raise LowbitError(f"need --round-iters >= 0 and --round-batch >= 1, got {self.iters} and {self.batch}")
        for name, v in (("--round-lr", self.lr), ("--round-minmax-lr", self.minmax_lr)):
            if v is not None and not 0 < v < float("inf"):
                raise LowbitError(f"{name} must be a positive number, got {v}")


class RoundingLinear(nn.Module):
    """A linear whose forward uses its weight on the grid with learned rounding offsets and range factors."""

    def __init__(self, lin: nn.Linear, scheme: Scheme) -> None:
        super().__init__()
        if scheme.granularity == "tensor":
            raise LowbitError("signround takes per-channel or per-group schemes")
        self.scheme = scheme
        W = lin.weight.detach().float()
        self.rows, self.cols = W.shape
        self.register_buffer("Wg", grouped(W, scheme))  # [R, G, g]
        a, b = group_range(self.Wg, scheme)  # [R, G]: the min/max range ∋ 0
        self.register_buffer("a", a)
        self.register_buffer("b", b)
        self.bias = None if lin.bias is None else lin.bias.detach().float()
        self.v = nn.Parameter(torch.zeros_like(self.Wg))
        self.alpha = nn.Parameter(torch.ones_like(a))
        self.beta = None if scheme.symmetric else nn.Parameter(torch.ones_like(a))

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scale (as stored, with a straight-through gradient for its rounding up) and zero point (straight-
        through rounding), [R, G]; at α = β = 1 exactly range_qparams' min/max ones."""
        s_ = self.scheme
        b = self.b * self.alpha
        a = -b if s_.symmetric else self.a * self.beta
        s = (b - a) / (s_.levels - 1)
        s = torch.where(s > 0, s, torch.ones_like(s))
        s = s + (round_scale_up(s.detach(), s_.torch_scale_dtype).float() - s).detach()
        if s_.symmetric:
            return s, None
        z = -a / s
        z = z + (torch.round(z).clamp(0, s_.qmax) - z).detach()
        return s, z

    def weight_hat(self) -> torch.Tensor:
        s, z = self.qparams()
        u = self.Wg / s.unsqueeze(-1) + self.v
        q = u + (torch.round(u) - u).detach()
        if z is not None:
            zz = z.unsqueeze(-1)
            q = (q + zz).clamp(self.scheme.qmin, self.scheme.qmax) - zz
        else:
            q = q.clamp(self.scheme.qmin, self.scheme.qmax)
        return ungrouped(q * s.unsqueeze(-1), self.rows, self.cols)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_hat().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def learned(self) -> list[nn.Parameter]:
        return [p for p in (self.v, self.alpha, self.beta) if p is not None]

    @torch.no_grad()
    def clamp_(self) -> None:
        self.v.clamp_(-0.5, 0.5)
        self.alpha.clamp_(0.5, 1.0)
        if self.beta is not None:
            self.beta.clamp_(0.5, 1.0)

    @torch.no_grad()
    def qtensor(self) -> QTensor:
        """The codes and parameters it computes with: scale in the stored dtype, zero point int16."""
        s, z = self.qparams()
        scale = s.to(self.scheme.torch_scale_dtype)
        q = torch.round(self.Wg / scale.float().unsqueeze(-1) + self.v)
        zero = None
        if z is not None:
            zero = z.to(torch.int16)
            q = q + zero.unsqueeze(-1).float()
        q = q.clamp(self.scheme.qmin, self.scheme.qmax).to(torch.int32)
        codes = ungrouped(q, self.rows, self.cols).to(torch.int8 if self.scheme.symmetric else torch.uint8)
        return QTensor(codes=codes, scale=scale, zero=zero, scheme=self.scheme,
                       shape=torch.Size((self.rows, self.cols)))


def train_block(block: nn.Module, wrapped: dict[str, RoundingLinear], q_in: list[torch.Tensor],
                target: list[torch.Tensor], kw: dict, opts: SignRoundOptions, index: int) -> dict:
    """Signed gradient descent of the wrapped linears' (v, α, β) on the block's output MSE; keeps the step of
    least loss. Returns the losses (first, best) for the log."""
    if opts.iters == 0 or not wrapped:
        return {}
    lr = opts.lr if opts.lr is not None else 1.0 / opts.iters
    mlr = opts.minmax_lr if opts.minmax_lr is not None else lr
    x_all, y_all = torch.cat(q_in), torch.cat(target)  # [N, L, hidden]
    frozen = [p for p in block.parameters() if p.requires_grad and all(p is not q for w in wrapped.values()
                                                                       for q in w.learned())]
    for p in frozen:
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(opts.seed * 1_000_003 + index)
    best, first, best_state = float("inf"), None, None
    try:
        with torch.enable_grad():
            for it in range(opts.iters):
                idx = torch.randperm(len(x_all), generator=g)[: opts.batch]
                out = block(x_all[idx], **kw)
                out = out[0] if isinstance(out, (tuple, list)) else out
                loss = F.mse_loss(out, y_all[idx])
                lv = loss.item()
                if first is None:
                    first = lv
                if lv < best:  # the parameters this loss was computed with
                    best = lv
                    best_state = [p.detach().clone() for w in wrapped.values() for p in w.learned()]
                loss.backward()
                decay = 1.0 - it / opts.iters
                with torch.no_grad():
                    for w in wrapped.values():
                        w.v.sub_(lr * decay * w.v.grad.sign())
                        for p in (w.alpha, w.beta):
                            if p is not None:
                                p.sub_(mlr * decay * p.grad.sign())
                        for p in w.learned():
                            p.grad = None
                        w.clamp_()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    with torch.no_grad():  # the last step's parameters have no loss yet: one more look on a batch
        idx = torch.randperm(len(x_all), generator=g)[: opts.batch]
        out = block(x_all[idx], **kw)
        out = out[0] if isinstance(out, (tuple, list)) else out
        last = F.mse_loss(out, y_all[idx]).item()
        if last >= best and best_state is not None:
            for p, t in zip((p for w in wrapped.values() for p in w.learned()), best_state):
                p.copy_(t)
    return {"loss_first": first, "loss_best": min(best, last)}


def signround_block(model: nn.Module, config: QuantConfig, selected: set[str]):
    """process_block for the sequential pipeline (it also keeps the float model's stream of block inputs)."""
    opts: SignRoundOptions = config.options
    state: dict = {"f_in": None, "index": 0}

    def process(block_name: str, block: nn.Module, inputs, kw):
        if state["f_in"] is None:
            state["f_in"] = inputs  # block 0: the float and the quantized inputs are the same
        with torch.no_grad():
            target = run_block(block, state["f_in"], kw)  # the float block on the float inputs
        linears = {n: m for n, m in block_linears(model, block_name, block) if n in selected}
        wrapped = {n: RoundingLinear(m, config.scheme_for(n)) for n, m in linears.items()}
        for n, w in wrapped.items():
            set_module(model, n, w)
        try:
            rec = train_block(block, wrapped, inputs, target, kw, opts, state["index"])
        except BaseException:
            for n, m in linears.items():  # interrupted: the float layers back in place
                set_module(model, n, m)
            raise
        done = {}
        for n, w in wrapped.items():
            q = QuantLinear.from_linear(linears[n], w.scheme, qt=w.qtensor())
            set_module(model, n, q)
            done[n] = w.scheme
        if rec:
            tqdm.write(f"lowbit: signround {block_name}: loss {rec['loss_first']:.4g} -> {rec['loss_best']:.4g}",
                       file=sys.stderr)
        state["f_in"], state["index"] = target, state["index"] + 1
        return done

    return process


def signround(model: nn.Module, config: QuantConfig, ctx) -> dict[str, Scheme]:
    selected = set(select_modules(model, config.include, config.exclude, tuple(config.overrides)))
    return layer_sequential(model, ctx.calib_ids(), signround_block(model, config, selected), desc="signround")


SPEC = register(MethodSpec(
    name="signround", run=signround, options=SignRoundOptions,
    help="learned rounding and clipping by signed gradient descent on each block's output (AutoRound's SignRound)",
    schemes=Schemes(granularities=("channel", "group")), calibration=True,
))
