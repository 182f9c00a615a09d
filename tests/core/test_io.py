"""Atomic outputs: never replace OUT without --force (even in a race), --force replaces only lowbit's own
outputs, a failure mid-replace keeps the old OUT, and killed runs' temporaries are swept."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import time

import pytest

from lowbit.errors import LowbitError
from lowbit.core import io as lio
from lowbit.core.io import atomic_path, check_output, sweep_stale


def lowbit_folder(path, tag="old"):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "lowbit"}, "tag": tag}))
    (path / "model.safetensors").write_bytes(b"x" * 100)
    return path


def write_ckpt(out, tag, **kw):
    with atomic_path(out, **kw) as tmp:
        (tmp / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "lowbit"}, "tag": tag}))


def tag_of(out):
    return json.loads((out / "config.json").read_text())["tag"]


def siblings(folder, keep):
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def _racer(out, tag, barrier, q):
    try:
        with atomic_path(out) as tmp:
            (tmp / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "lowbit"},
                                                         "tag": tag}))
            barrier.wait(10)  # both passed check_output and hold a finished temporary
        q.put((tag, "ok"))
    except LowbitError as e:
        q.put((tag, f"error: {e}"))


@pytest.mark.parametrize("have_renameat2", [True, False])
def test_two_processes_racing_for_one_out(tmp_path, monkeypatch, have_renameat2):
    if not have_renameat2:
        monkeypatch.setattr(lio, "renameat2", lambda *a: False)
    ctx = mp.get_context("fork")
    barrier, q = ctx.Barrier(2), ctx.Queue()
    out = tmp_path / "out"
    procs = [ctx.Process(target=_racer, args=(out, t, barrier, q)) for t in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    res = dict(q.get(timeout=5) for _ in procs)
    assert sorted(v == "ok" for v in res.values()) == [False, True], res
    winner = next(t for t, v in res.items() if v == "ok")
    loser = next(v for v in res.values() if v != "ok")
    assert "already exists" in loser
    assert tag_of(out) == winner  # the loser did not replace it
    assert siblings(tmp_path, {"out"}) == []


def test_out_created_during_the_work_is_not_replaced(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(LowbitError, match="already exists"):
        with atomic_path(out) as tmp:
            (tmp / "config.json").write_text("{}")
            lowbit_folder(out, "theirs")  # another process, meanwhile
    assert tag_of(out) == "theirs" and siblings(tmp_path, {"out"}) == []


def test_force_replaces_only_lowbit_outputs(tmp_path):
    # a lowbit checkpoint or an empty folder: replaced
    out = lowbit_folder(tmp_path / "ck")
    write_ckpt(out, "new", overwrite=True)
    assert tag_of(out) == "new" and not (out / "model.safetensors").exists()
    (tmp_path / "empty").mkdir()
    write_ckpt(tmp_path / "empty", "new", overwrite=True)
    # anything else: refused, left as it was
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"meow")
    plain = tmp_path / "notes.txt"
    plain.write_text("keep me")
    link = tmp_path / "link"
    link.symlink_to(out)
    for target in (other, plain, link):
        with pytest.raises(LowbitError, match="replaces only what lowbit writes"):
            write_ckpt(target, "new", overwrite=True)
    assert (other / "cat.jpg").read_bytes() == b"meow" and plain.read_text() == "keep me" and link.is_symlink()
    # files: by the format's magic
    g = tmp_path / "m.gguf"
    g.write_bytes(b"GGUF" + b"\0" * 20)
    with atomic_path(g, overwrite=True, is_dir=False, kind="gguf") as tmp:
        tmp.write_bytes(b"GGUF new")
    assert g.read_bytes() == b"GGUF new"
    with pytest.raises(LowbitError, match="not a GGUF file"):
        check_output(plain, overwrite=True, kind="gguf")
    with pytest.raises(LowbitError, match="not a GGUF file"):
        check_output(out, overwrite=True, kind="gguf")  # a folder is no GGUF file
    with pytest.raises(LowbitError, match="pass --force"):
        check_output(g, kind="gguf")
    assert siblings(tmp_path, {"ck", "empty", "photos", "notes.txt", "link", "m.gguf"}) == []


def test_failure_mid_replace_keeps_the_old_out(tmp_path, monkeypatch):
    out = lowbit_folder(tmp_path / "ck")

    def exchange_fails(src, dst, flags):
        raise OSError(5, "Input/output error", str(dst))

    monkeypatch.setattr(lio, "renameat2", exchange_fails)
    with pytest.raises(LowbitError, match="cannot write"):
        write_ckpt(out, "new", overwrite=True)
    assert tag_of(out) == "old" and (out / "model.safetensors").exists()
    assert siblings(tmp_path, {"ck"}) == []


def test_failure_mid_replace_without_exchange_rolls_back(tmp_path, monkeypatch):
    """Where RENAME_EXCHANGE is missing: rename aside, rename in; a failure of the second rename puts the old
    OUT back (the case that used to leave OUT absent with .old and .tmp beside it)."""
    out = lowbit_folder(tmp_path / "ck")
    monkeypatch.setattr(lio, "renameat2", lambda *a: False)
    real = os.rename
    calls = []

    def rename(a, b):
        calls.append((str(a), str(b)))
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(a, b)

    monkeypatch.setattr(lio.os, "rename", rename)
    with pytest.raises(LowbitError, match="No space left"):
        write_ckpt(out, "new", overwrite=True)
    assert tag_of(out) == "old" and (out / "model.safetensors").exists()
    assert siblings(tmp_path, {"ck"}) == []
    monkeypatch.setattr(lio.os, "rename", real)
    write_ckpt(out, "new", overwrite=True)  # the fallback replaces when nothing fails
    assert tag_of(out) == "new" and siblings(tmp_path, {"ck"}) == []


def _killed_writer(out, is_dir, ready):
    with atomic_path(out, is_dir=is_dir, kind=None if is_dir else "gguf") as tmp:
        if is_dir:
            (tmp / "model.safetensors").write_bytes(b"x" * 1000)
        else:
            tmp.write_bytes(b"GGUF" + b"x" * 1000)
        ready.set()
        time.sleep(60)


@pytest.mark.parametrize("is_dir", [True, False])
def test_temporaries_of_a_killed_run_are_swept_by_the_next(tmp_path, is_dir):
    ctx = mp.get_context("fork")
    ready = ctx.Event()
    out = tmp_path / ("out" if is_dir else "out.gguf")
    p = ctx.Process(target=_killed_writer, args=(out, is_dir, ready))
    p.start()
    assert ready.wait(30)
    (left,) = [x for x in tmp_path.iterdir()]
    assert left.name.startswith(f".{out.name}.tmp-{p.pid}-")
    assert sweep_stale(tmp_path) == []  # its writer runs and holds the lock: not stale
    os.kill(p.pid, signal.SIGKILL)
    p.join(10)
    assert left.exists()
    # the next run writing there sweeps it
    if is_dir:
        write_ckpt(out, "new")
    else:
        with atomic_path(out, is_dir=False, kind="gguf") as tmp:
            tmp.write_bytes(b"GGUF")
    assert sorted(x.name for x in tmp_path.iterdir()) == [out.name]


def test_sweep_keeps_what_is_not_stale(tmp_path):
    live = tmp_path / f".a.tmp-{os.getpid()}-abcdefgh"  # our pid, fresh, unlocked: an instant before its lock
    live.mkdir()
    user = tmp_path / ".a.tmp-notes"  # not lowbit's pattern
    user.write_text("x")
    legacy_new = tmp_path / ".b.tmp-abcd1234"  # an earlier version's, recent
    legacy_new.mkdir()
    legacy_old = tmp_path / ".c.tmp-wxyz5678"
    legacy_old.mkdir()
    os.utime(legacy_old, (time.time() - 7200, time.time() - 7200))
    dead = tmp_path / ".d.tmp-999999999-abcdefgh"  # no such pid
    dead.write_bytes(b"x")
    removed = sorted(os.path.basename(p) for p in sweep_stale(tmp_path))
    assert removed == sorted([dead.name, legacy_old.name])
    assert live.exists() and user.exists() and legacy_new.exists()


def test_cli_quantize_race_and_force(cli, tiny_dir, tmp_path, monkeypatch):
    """Through the CLI: OUT made by someone else during the work is kept (exit 2, one line); --force refuses
    a folder that is no lowbit checkpoint before any work, and replaces a checkpoint."""
    from lowbit import api

    out = tmp_path / "q"
    real = api.quantize

    def quantize_then_collide(*a, **k):
        res = real(*a, **k)
        lowbit_folder(out, "theirs")
        return res

    monkeypatch.setattr(api, "quantize", quantize_then_collide)
    code, _, err = cli("quantize", tiny_dir, out)
    assert code == 2 and err.strip().splitlines()[-1].startswith("lowbit: error:") and "already exists" in err
    assert tag_of(out) == "theirs" and siblings(tmp_path, {"q", "tiny-hf"}) == []
    monkeypatch.setattr(api, "quantize", real)
    code, _, err = cli("quantize", tiny_dir, out, "--force")
    assert code == 0, err
    assert "tag" not in json.loads((out / "config.json").read_text())
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    code, _, err = cli("quantize", tiny_dir, mine, "--force")
    assert code == 2 and "replaces only what lowbit writes" in err
    assert (mine / "thesis.tex").read_text() == "years of work"
    code, _, err = cli("export-gguf", tiny_dir, mine / "thesis.tex", "--type", "F32", "--force")
    assert code == 2 and "not a GGUF file" in err
    assert (mine / "thesis.tex").read_text() == "years of work"
    assert siblings(tmp_path, {"q", "tiny-hf", "mine"}) == [] and siblings(mine, {"thesis.tex"}) == []
