"""--device: GPTQ/AWQ with calibration on CUDA against the CPU (skipped where torch sees no GPU)."""
import pytest
import torch

from lowbit import api
from lowbit.core.config import QuantConfig
from lowbit.core.scheme import Scheme
from lowbit.errors import LowbitError

# tolerances: float sums on another device round differently; codes may flip on rounding ties
CODE_FLIP_MAX = 0.01  # fraction of codes that may differ
LOGIT_ATOL = 5e-2  # times the largest |logit|


def test_unknown_or_missing_device_refused():
    with pytest.raises(LowbitError, match="--device"):
        api.resolve_device("tpu")
    assert api.resolve_device("cpu") == "cpu"
    assert api.resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(LowbitError, match="no CUDA"):
            api.resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: the GPU path is unverified here")
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_cuda_calibration_matches_cpu(tiny_dir, calib, method):
    cfg = lambda: QuantConfig(method=method, scheme=Scheme(4, False, "group", 32), seed=3,  # noqa: E731
                              options={"nsamples": 8, "calib_seqlen": 64})
    cpu, _ = api.load(tiny_dir)
    api.quantize(cpu, cfg(), calib_ids=calib)
    gpu, _ = api.load(tiny_dir)
    api.quantize(gpu, cfg(), calib_ids=calib, device="cuda")
    a, b = cpu.state_dict(), gpu.state_dict()
    q = [k for k in a if k.endswith("qweight")]
    diff = sum(int((a[k].cpu() != b[k].cpu()).sum()) for k in q)
    assert diff <= CODE_FLIP_MAX * sum(a[k].numel() for k in q)
    ids = calib[:2]
    la, lb = cpu(ids).logits, gpu.cpu()(ids).logits
    assert torch.allclose(la, lb, rtol=0, atol=LOGIT_ATOL * float(la.abs().max()))
