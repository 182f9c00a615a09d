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


def _raw_file(path, header: dict, data: bytes = b"") -> None:
    import json
    import struct

    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


@pytest.mark.parametrize("header,match", [
    ({"w": {"dtype": "F32", "shape": [65536, 65536], "data_offsets": [0, 17179869184]}}, "file ends inside the tensor"),
    ({"w": {"dtype": "F32", "shape": [65536, 65536], "data_offsets": [0, 16]}}, "16 bytes stored for shape"),
    ({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, "bad shape"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [8, 4]}}, "bad data offsets"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, "16"]}}, "bad data offsets"),
    ({"w": {"dtype": "X9", "shape": [4], "data_offsets": [0, 16]}}, "unknown dtype 'X9'"),
    ({"w": [1, 2]}, "not a tensor entry"),
])
def test_header_entries_are_checked_before_anything_is_allocated(tmp_path, monkeypatch, header, match):
    """A header giving a 17 GB tensor in a 16-byte file used to allocate it before looking at the file."""
    import lowbit.models.safetensors_read as R

    path = tmp_path / "t.safetensors"
    _raw_file(path, header, b"\0" * 16)
    sizes = []
    real_empty = torch.empty
    monkeypatch.setattr(R.torch, "empty", lambda *a, **k: sizes.append(a) or real_empty(*a, **k))
    with pytest.raises(LowbitError, match=match):
        list(read_tensors(path, ["w"]))
    assert sizes == []


def test_header_longer_than_the_file_is_refused(tmp_path):
    import struct

    path = tmp_path / "t.safetensors"
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(LowbitError, match="not a safetensors file \\(header of 1099511627776 bytes"):
        list(read_tensors(path, ["w"]))
