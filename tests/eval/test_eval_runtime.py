"""lowbit eval through the lean runtime (issue 25): the same perplexity, KL and top-1 as transformers' forward."""
import math

import pytest

import lowbit
from lowbit.core.config import QuantConfig
from lowbit.core.scheme import Scheme
from tests.conftest import TEXT, make_tokenizer
from tests.runtime.test_decoder import native_available, tiny_llama

# float32 sums in another order (fused projections, SDPA, C norms): relative perplexity difference
PPL_FLOAT_RTOL = 1e-5
# quantized weights dequantized once and multiplied in float32 (the transformers path's math), other order
PPL_QUANT_RTOL = 1e-4
# --int8-activations: activations rounded to int8 per 32 columns in every projection
PPL_INT8_RTOL = 5e-2


def models():
    base = tiny_llama()  # hidden 128, inter 256: 4-bit codes tile for the native GEMM (K % 64)
    q = tiny_llama()
    lowbit.quantize(q, QuantConfig(scheme=Scheme(4, True, "group", 64)))
    return base, q


def run(model, runtime, base=None, **kw):
    return lowbit.evaluate(model, make_tokenizer(), text=TEXT * 4, seqlen=64, limit_tokens=512, base=base,
                           progress=False, runtime=runtime, **kw)


def test_float_model_scores_the_same_on_both_runtimes():
    base, _ = models()
    lean, hf = run(base, "lean"), run(base, "transformers")
    assert lean["runtime"] == "lean" and hf["runtime"] == "transformers"
    assert lean["predicted"] == hf["predicted"] and lean["windows"] > 1
    assert math.isclose(lean["ppl"], hf["ppl"], rel_tol=PPL_FLOAT_RTOL)


@pytest.mark.parametrize("native", [False, pytest.param(True, marks=pytest.mark.skipif(
    not native_available(), reason="no C compiler: the lean runtime keeps torch ops"))])
def test_quantized_model_scores_the_same_with_kl_and_top1(native, monkeypatch):
    if not native:
        monkeypatch.setenv("LOWBIT_NATIVE", "0")
        monkeypatch.setattr("lowbit.kernels.native._LIB", [None])
    base, q = models()
    lean, hf = run(q, "lean", base=base), run(q, "transformers", base=base)
    assert math.isclose(lean["ppl"], hf["ppl"], rel_tol=PPL_QUANT_RTOL)
    assert math.isclose(lean["base_ppl"], hf["base_ppl"], rel_tol=PPL_FLOAT_RTOL)
    assert math.isclose(lean["kl"], hf["kl"], rel_tol=1e-3, abs_tol=1e-6)
    assert abs(lean["top1"] - hf["top1"]) <= 2 / hf["predicted"]  # a near-tie may flip
    if native:
        int8 = run(q, "lean", int8_activations=True)
        assert int8["runtime"] == "lean-int8"
        assert math.isclose(int8["ppl"], hf["ppl"], rel_tol=PPL_INT8_RTOL)


def test_auto_picks_lean_for_llama_and_transformers_is_kept():
    base, _ = models()
    assert run(base, "auto")["runtime"] == "lean"
    assert run(base, "transformers")["runtime"] == "transformers"
