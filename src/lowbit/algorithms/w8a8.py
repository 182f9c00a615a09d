"""W8A8: int8 weights and integer activations, with optional SmoothQuant (smoothquant.py) and rotations.

Options: act "dynamic" (per token, default), "static" (one scale per tensor from calibration), "tensor"
(per tensor, computed at run time — the naive scheme); act_bits 8 or 7; act_symmetric (False: a zero
point per token or tensor, dynamic only); smooth α (None = no smoothing); rotate (default: on for
"dynamic", off for the naive "tensor"; refused for "static"): every linear's input and weight are turned by
an orthogonal Hadamard-based R (core/rotation.py, QuaRot-style but online, per linear) before
quantization, so x Wᵀ = (x R)(W R)ᵀ is unchanged in float and the outlier channels are spread over
all channels; pair_bound (default: on for 8-bit activations): weight scales chosen so that neighbouring
codes sum to at most 128 in magnitude (nn/int8.pair_bounded_qtensor), which lets AVX2 CPUs without VNNI
run 8-bit activations in one exact u8 x s8 GEMM. Calibration (layer-sequential, max |x| per input channel
of each linear) runs only when the activations are static or smoothing is asked for.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..core.config import Options, QuantConfig, option
from ..core.scheme import Scheme
from ..errors import LowbitError
from ..models.arch import input_groups
from ..nn.int8 import ActQuant, W8A8Linear
from .registry import INT8_WEIGHTS, CalibOptions, MethodSpec, register
from .rtn import replace_linears
from .smoothquant import calibrated_linears

ACT_MODES = {"dynamic": ("token", False), "static": ("tensor", True), "tensor": ("tensor", False)}


def act_quant(mode: str, bits: int, symmetric: bool) -> ActQuant:
    """The activation quantizer of an --act mode (ACT_MODES: granularity, static)."""
    gran, static = ACT_MODES[mode]
    return ActQuant(granularity=gran, static=static, bits=bits, symmetric=symmetric)


@dataclass(frozen=True)
class ActOptions(Options):
    """Integer activations quantized at run time (w8a8, llm-int8)."""

    act_bits: int = option(8, "Activation bits: 8, or 7 (exact on the fast int8 kernel of CPUs without VNNI).")
    act_symmetric: bool = option(True, "Symmetric activations, or asymmetric ones (a zero point per token).",
                                 flag="--act-sym/--act-asym")

    def check(self) -> None:
        if self.act_bits not in (7, 8):
            raise LowbitError(f"--act-bits must be 7 or 8, got {self.act_bits}")


@dataclass(frozen=True)
class W8A8Options(CalibOptions, ActOptions):
    act: str = option("dynamic", "Activations: dynamic (per token), static (per tensor, calibrated) or tensor "
                                 "(per tensor at run time: naive).")
    smooth: float | None = option(None, "SmoothQuant migration strength alpha in [0, 1] (calibrates).")
    rotate: bool | None = option(None, "Turn every linear's input and weight by one orthogonal Hadamard-based "
                                       "matrix before quantizing, spreading outlier channels [default: on for "
                                       "--act dynamic].")
    pair_bound: bool | None = option(None, "Weight scales such that neighbouring codes sum to at most 128 in "
                                           "magnitude, so 8-bit activations run in one exact int8 GEMM on CPUs "
                                           "without VNNI [default: on for 8-bit activations].")

    def check(self) -> None:
        if self.act not in ACT_MODES:
            raise LowbitError(f"--act must be one of {', '.join(ACT_MODES)}, got {self.act!r}")
        if self.smooth is not None and not 0.0 <= self.smooth <= 1.0:
            raise LowbitError(f"--smooth must be in [0, 1], got {self.smooth}")
        if self.rotate and self.act == "static":
            raise LowbitError("--rotate needs activation scales computed at run time (--act dynamic or tensor): "
                              "static scales are calibrated on unrotated inputs")
        if not self.act_symmetric and self.act == "static":
            raise LowbitError("--act-asym needs dynamic activations (--act dynamic or tensor)")

    @property
    def calibrates(self) -> bool:
        """Static activation scales and smoothing need calibration; the rest is computed at run time."""
        return self.act == "static" or self.smooth is not None


def w8a8(model: nn.Module, config: QuantConfig, ctx) -> dict[str, Scheme]:
    o: W8A8Options = config.options
    act = act_quant(o.act, o.act_bits, o.act_symmetric)
    alpha = o.smooth
    rotate = (act.granularity == "token") if o.rotate is None else o.rotate
    pair_bound = (act.bits == 8) if o.pair_bound is None else o.pair_bound

    def make(lin: nn.Linear, scheme: Scheme, amax: float | None = None) -> W8A8Linear:
        return W8A8Linear.from_linear(lin, scheme, act=act, input_amax=amax, rotate=rotate, pair_bound=pair_bound)

    groups = input_groups(model)  # before the linears are replaced (the mappings name nn.Linear modules)
    if o.calibrates:
        done = calibrated_linears(model, config, ctx, make, alpha, desc="smoothquant" if alpha is not None else "w8a8")
    else:
        done = replace_linears(model, config, make, desc="w8a8")
    for name, share in groups.items():
        mod = model.get_submodule(name)
        if isinstance(mod, W8A8Linear):
            mod.share = share  # q/k/v (gate/up) quantize their common input once: kernels/int8.quantized_input
    return done


SPEC = register(MethodSpec(
    name="w8a8", run=w8a8, options=W8A8Options,
    help="int8 weights and activations, rotated inputs, SmoothQuant with --smooth",
    default_scheme=Scheme(bits=8, symmetric=True, granularity="channel", group_size=None), schemes=INT8_WEIGHTS,
    calibration=lambda o: o.calibrates, streams_blocks=True,  # layer-sequential when calibrating, else per layer
))
