import pytest
import torch
from safetensors.torch import save_file

from lowbit.errors import LowbitError
from lowbit.models.safetensors_read import read_tensors


def test_plain_reads_equal_safetensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(7, 5, generator=g), "f16": torch.randn(3, 4, generator=g).half(),
        "bf16": torch.randn(9, generator=g).bfloat16(), "i8": torch.randint(-128, 127, (4, 4), dtype=torch.int8),
        "u8": torch.randint(0, 255, (6,), dtype=torch.uint8), "i64": torch.arange(5), "b": torch.tensor([True, False]),
        "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    got = dict(read_tensors(path, tensors))
    assert set(got) == set(tensors)
    for k, t in tensors.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape and torch.equal(got[k], t), k
    assert list(dict(read_tensors(path, ["i8"]))) == ["i8"]


def test_bad_files_fail_with_one_line(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"w": torch.ones(64)}, str(path))
    with pytest.raises(LowbitError, match="no tensor nope"):
        list(read_tensors(path, ["nope"]))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(LowbitError, match="ends inside"):
        list(read_tensors(path, ["w"]))
    (tmp_path / "x").write_bytes(b"abc")
    with pytest.raises(LowbitError, match="not a safetensors file"):
        list(read_tensors(tmp_path / "x", ["w"]))
