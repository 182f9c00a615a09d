"""Data-parallel calibration (core/dist.py): 2 gloo ranks on loopback against one process."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lowbit import api
from lowbit.core.config import QuantConfig
from lowbit.core.packing import unpack
from lowbit.core.scheme import Scheme

HERE = Path(__file__).resolve().parent


def codes(folder: Path) -> dict[str, torch.Tensor]:
    t = load_file(str(folder / "lowbit.safetensors"))
    return {k: unpack(v, 4, v.shape[1] * 2) if k.endswith("qweight") else v for k, v in t.items()}


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_two_gloo_ranks_match_one_process(tiny_dir, calib, tmp_path, method, monkeypatch):
    """Each rank takes whole calibration batches (2 samples here, 8 windows: two batches per rank). GPTQ's
    Hessians are replayed in the global batch order: the checkpoint equals one process's exactly. AWQ's mean
    |x| sums are all-reduced: codes may flip where a value sits on a rounding tie."""
    from lowbit.calibration import sequential

    monkeypatch.setattr(sequential, "BATCH", 2)
    calib_path = tmp_path / "calib.pt"
    torch.save(calib, calib_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(HERE / "dist_worker.py"), str(tiny_dir), str(calib_path), str(tmp_path / "dp"), method, "2"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    r0, r1 = codes(tmp_path / "dp" / "rank0"), codes(tmp_path / "dp" / "rank1")
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)  # the same decisions on every rank
    m, tok = api.load(tiny_dir, lazy=True)
    api.quantize(m, QuantConfig(method=method, scheme=Scheme(4, False, "group", 32), seed=3,
                                options={"nsamples": calib.shape[0], "calib_seqlen": calib.shape[1]}), calib_ids=calib)
    api.save(m, tok, tmp_path / "one")
    one = codes(tmp_path / "one")
    assert one.keys() == r0.keys()
    total = diff = 0
    for k in one:
        if k.endswith("qweight"):
            total += one[k].numel()
            diff += int((one[k] != r0[k]).sum())
    if method == "gptq":
        assert diff == 0 and all(torch.equal(one[k], r0[k]) for k in one), f"{diff} of {total} codes differ"
        a = load_file(str(tmp_path / "one" / "lowbit.safetensors"))
        b = load_file(str(tmp_path / "dp" / "rank0" / "lowbit.safetensors"))
        bits = [k for k in a if not torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8))]
        assert not bits, f"tensors differing in their bits: {bits}"
        assert (tmp_path / "one" / "lowbit.safetensors").read_bytes() == \
            (tmp_path / "dp" / "rank0" / "lowbit.safetensors").read_bytes()
    else:  # the |x| sums are added in another order across ranks
        assert diff <= 0.002 * total, f"{diff} of {total} codes differ"
    ids = calib[:2]
    a = api.load(tmp_path / "one")[0](ids).logits
    b = api.load(tmp_path / "dp" / "rank0")[0](ids).logits
    assert torch.allclose(a, b, rtol=0, atol=5e-2 * float(a.abs().max())), float((a - b).abs().max())
