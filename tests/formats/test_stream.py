"""formats/stream.py: streamed quantization (each block to disk as it is done), resume after a kill, dtypes."""
import os

import pytest
import torch

from lowbit import api
from lowbit.core.config import QuantConfig
from lowbit.core.scheme import Scheme
from lowbit.errors import LowbitError
from lowbit.formats import stream
from lowbit.formats.stream import work_folder


def cfg(method):
    return QuantConfig(method=method, scheme=Scheme(4, False, "group", 32), seed=3,
                       options={"nsamples": 8, "calib_seqlen": 64} if method != "rtn" else {})


def files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (no cleanup, no except Exception)."""


@pytest.mark.parametrize("method", ["gptq", "awq", "rtn"])
def test_streamed_checkpoint_equals_in_memory_quantization(tiny_dir, calib, tmp_path, method):
    full, tok = api.load(tiny_dir)
    api.quantize(full, cfg(method), calib_ids=calib)
    m, tok = api.load(tiny_dir, lazy=True)
    out = api.quantize_to(m, cfg(method), tmp_path / "s", tokenizer=tok, calib_ids=calib, single_file_max=0)
    assert (out / "lowbit.safetensors.index.json").is_file() and not (out / "lowbit.safetensors").exists()
    assert not work_folder(out).exists()  # the resume state goes once the checkpoint is complete
    back, _ = api.load(out)
    ids = calib[:2]
    assert torch.equal(logits(back, ids), logits(full, ids))
    m, tok = api.load(tiny_dir, lazy=True)
    one = api.quantize_to(m, cfg(method), tmp_path / "one", tokenizer=tok, calib_ids=calib)  # small: one file
    assert sorted(p.name for p in one.glob("lowbit*")) == ["lowbit.safetensors"]
    assert torch.equal(logits(api.load(one)[0], ids), logits(full, ids))


@pytest.mark.parametrize("method,kill_at,single", [("gptq", 1, 0), ("gptq", 2, 0), ("gptq", 1, None), ("rtn", 1, 0),
                                                  ("awq", 1, 0)])
def test_killed_run_resumes_to_identical_bytes(tiny_dir, calib, tmp_path, monkeypatch, method, kill_at, single):
    m, tok = api.load(tiny_dir, lazy=True)
    ref = api.quantize_to(m, cfg(method), tmp_path / "ref", tokenizer=tok, calib_ids=calib, single_file_max=single)

    real = stream.StreamSink.finish_block
    calls = []

    def dying(self, index, *a, **k):
        calls.append(index)
        if len(calls) == kill_at:  # kill_at 1: inside block 1's commit, before state.json; 2: after block 1
            if kill_at == 1:
                raise Killed
            real(self, index, *a, **k)
            raise Killed
        return real(self, index, *a, **k)

    monkeypatch.setattr(stream.StreamSink, "finish_block", dying)
    m, tok = api.load(tiny_dir, lazy=True)
    out = tmp_path / "out"
    with pytest.raises(Killed):
        api.quantize_to(m, cfg(method), out, tokenizer=tok, calib_ids=calib)
    monkeypatch.setattr(stream.StreamSink, "finish_block", real)
    assert not out.exists() and (work_folder(out) / "state.json").is_file()
    m, tok = api.load(tiny_dir, lazy=True)
    with pytest.raises(LowbitError, match="--resume"):  # a fresh start must be asked for
        api.quantize_to(m, cfg(method), out, tokenizer=tok, calib_ids=calib)
    other = cfg(method)
    other.seed = 4
    with pytest.raises(LowbitError, match="another run"):
        api.quantize_to(m, other, out, tokenizer=tok, calib_ids=calib, resume=True)
    m, tok = api.load(tiny_dir, lazy=True)
    api.quantize_to(m, cfg(method), out, tokenizer=tok, calib_ids=calib, resume=True, single_file_max=single)
    assert files(out) == files(ref)
    assert not work_folder(out).exists()


def test_torn_block_file_is_not_counted(tiny_dir, calib, tmp_path, monkeypatch):
    """A kill inside a block's write leaves a .part file or an uncommitted block: resume redoes that block."""
    m, tok = api.load(tiny_dir, lazy=True)
    ref = api.quantize_to(m, cfg("gptq"), tmp_path / "ref", tokenizer=tok, calib_ids=calib)
    real_write = stream._durable_write
    n = []

    def torn(path, write):
        n.append(path.name)
        if path.name.startswith("carry-00000"):
            write(path.with_name(path.name + ".part"))  # written, not fsynced nor renamed
            raise Killed
        return real_write(path, write)

    monkeypatch.setattr(stream, "_durable_write", torn)
    m, tok = api.load(tiny_dir, lazy=True)
    with pytest.raises(Killed):
        api.quantize_to(m, cfg("gptq"), tmp_path / "out", tokenizer=tok, calib_ids=calib)
    monkeypatch.setattr(stream, "_durable_write", real_write)
    m, tok = api.load(tiny_dir, lazy=True)
    api.quantize_to(m, cfg("gptq"), tmp_path / "out", tokenizer=tok, calib_ids=calib, resume=True)
    assert files(tmp_path / "out") == files(ref)


def test_bfloat16_loading_halves_float_weights_and_keeps_norms_stored(tiny_dir, calib, tmp_path):
    f32, _ = api.load(tiny_dir, dtype="float32")
    bf, _ = api.load(tiny_dir, dtype="bfloat16")
    auto, _ = api.load(tiny_dir, dtype="auto")  # stored as float32
    size = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    assert size(bf) * 2 == size(f32) and size(auto) == size(f32)
    m, tok = api.load(tiny_dir, dtype="bfloat16", lazy=True)
    out = api.quantize_to(m, cfg("gptq"), tmp_path / "bf", tokenizer=tok, calib_ids=calib)
    back, _ = api.load(out)
    assert back.model.layers[0].input_layernorm.weight.dtype == torch.bfloat16
    assert back.model.norm.weight.dtype == torch.bfloat16
    with pytest.raises(LowbitError, match="--dtype"):
        api.load(tiny_dir, dtype="float64")


def test_cli_quantize_resume_and_dtype(tiny_dir, tmp_path, cli, text_file):
    out = tmp_path / "q"
    code, _, err = cli("quantize", tiny_dir, out, "--method", "gptq", "--bits", "4", "--group-size", "32",
                       "--calib", text_file, "--nsamples", "4", "--calib-seqlen", "32", "--dtype", "bfloat16")
    assert code == 0, err
    assert (out / "lowbit.safetensors").is_file()  # small: one file
    code, _, err = cli("quantize", tiny_dir, tmp_path / "x", "--dtype", "float64")
    assert code == 2 and err.startswith("lowbit: error:") and not (tmp_path / "x").exists()
    code, _, err = cli("quantize", tiny_dir, tmp_path / "y", "--device", "tpu")
    assert code == 2 and "--device" in err
    code, _, err = cli("quantize", tiny_dir, tmp_path / "z", "--method", "w8a8", "--resume")
    assert code == 2 and "--resume" in err
    code, out_, err = cli("eval", out, "--text", text_file, "--limit-tokens", "64", "--seqlen", "32", "--dtype",
                          "bfloat16", "--device", "cpu")
    assert code == 0, err


def test_streamed_output_into_folders_that_do_not_exist_yet(tiny_dir, tmp_path, cli):
    """README's `make demo` writes out/smollm2-w4g128 on a fresh clone: OUT's parent folders are made."""
    out = tmp_path / "new" / "deeper" / "q"
    code, _, err = cli("quantize", tiny_dir, out, "--method", "rtn", "--bits", "4", "--group-size", "32", "--sym")
    assert code == 0, err
    assert (out / "lowbit.safetensors").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["q"]  # no resume state left beside it


def test_ctrl_c_says_how_to_resume(tiny_dir, tmp_path, cli, text_file, monkeypatch):
    real = stream.StreamSink.finish_block

    def interrupted(self, index, *a, **k):
        real(self, index, *a, **k)
        if index == 0:
            raise KeyboardInterrupt

    args = ["quantize", tiny_dir, tmp_path / "q", "--method", "gptq", "--bits", "4", "--group-size", "32",
            "--calib", text_file, "--nsamples", "4", "--calib-seqlen", "32"]
    monkeypatch.setattr(stream.StreamSink, "finish_block", interrupted)
    code, _, err = cli(*args)
    assert code == 130 and "--resume" in err and not (tmp_path / "q").exists()
    monkeypatch.setattr(stream.StreamSink, "finish_block", real)
    code, _, err = cli(*args)
    assert code == 2 and "--resume" in err  # refused: the unfinished state is kept
    code, _, err = cli(*args, "--resume")
    assert code == 0, err
    assert "resuming after 1 finished blocks" in err and not work_folder(tmp_path / "q").exists()


def test_sharded_checkpoint_with_a_changed_shard_is_refused(tiny_dir, calib, tmp_path):
    m, tok = api.load(tiny_dir, lazy=True)
    out = api.quantize_to(m, cfg("rtn"), tmp_path / "s", tokenizer=tok, single_file_max=0)
    shard = sorted(out.glob("lowbit-*.safetensors"))[0]
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 1
    shard.write_bytes(bytes(raw))
    with pytest.raises(LowbitError, match="checksum"):
        api.load(out)


def test_write_safetensors_reads_back_with_safetensors(tmp_path):
    from safetensors.torch import load_file

    t = {"b": torch.randn(3, 5).to(torch.bfloat16), "a": torch.arange(7, dtype=torch.uint8),
         "c": torch.zeros(0, 4), "d": torch.randn(2, 2, dtype=torch.float16)}
    stream.write_safetensors(tmp_path / "x.safetensors", t, {"format": "pt"})
    back = load_file(str(tmp_path / "x.safetensors"))
    assert back.keys() == t.keys() and all(torch.equal(back[k], t[k]) for k in t)
    stream.write_safetensors(tmp_path / "y.safetensors", dict(reversed(list(t.items()))), {"format": "pt"})
    assert (tmp_path / "x.safetensors").read_bytes() == (tmp_path / "y.safetensors").read_bytes()
