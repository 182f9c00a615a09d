"""Atomic output: build in a temporary sibling, then move it into place.

- OUT is never replaced without `--force`, even when another process creates it meanwhile: the finished
  temporary is moved onto OUT with renameat2(RENAME_NOREPLACE) (a plain rename would silently replace
  what the other process wrote); where the kernel or file system lacks it, a hard link (files) or an
  exclusive mkdir (folders) claims the name instead.
- `--force` replaces only what lowbit writes (`kind`): a lowbit checkpoint folder, or a file of the requested
  format by its magic (GGUF, PNG); an empty file or folder too. The swap is one renameat2(RENAME_EXCHANGE),
  so a failure at any point leaves the old OUT in place (fallback: rename aside, rename in, roll back).
- Every temporary sibling carries the writer's pid in its name and is flock()ed while it is written: a
  kill -9 leaves it behind, and the next run writing into that folder sweeps it (lock free, and its writer
  gone or the entry older than a minute).
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import re
import shutil
import stat
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import LowbitError

# what --force may replace: kind -> (is a folder, magic bytes of a file)
KINDS = {
    "checkpoint": (True, None),
    "gguf": (False, b"GGUF"),
    "png": (False, b"\x89PNG\r\n\x1a\n"),
    "file": (False, None),  # any regular file (callers that write no known format)
}
_DESCRIBE = {"checkpoint": "a lowbit checkpoint folder", "gguf": "a GGUF file", "png": "a PNG file",
             "file": "a regular file"}

# .NAME.tmp-PID-RANDOM / .NAME.old-PID-RANDOM (this version); .NAME.tmp-RANDOM (earlier versions, no pid)
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-[A-Za-z0-9_]{4,16}$")
_LEGACY = re.compile(r"^\.(?P<name>.+)\.tmp-[a-z0-9_]{8}$")
_LEGACY_CACHE = re.compile(r"^(?P<name>[^.].*)\.tmp-[a-z0-9_]{8}$")
STALE_AFTER_S = 60.0  # a temporary without its writer's lock, this old, is stale even if its pid runs again
LEGACY_STALE_AFTER_S = 3600.0


# ----------------------------------------------------------------------------- renameat2


RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100
_SYSCALL_RENAMEAT2 = {"x86_64": 316, "aarch64": 276, "arm64": 276, "ppc64le": 357, "s390x": 347, "riscv64": 276}
_renameat2_fn = None


def _renameat2_impl():
    global _renameat2_fn
    if _renameat2_fn is None:
        _renameat2_fn = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                if hasattr(libc, "renameat2"):
                    f = libc.renameat2
                    f.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
                    _renameat2_fn = lambda a, b, flags: f(_AT_FDCWD, a, _AT_FDCWD, b, flags)  # noqa: E731
                else:
                    nr = _SYSCALL_RENAMEAT2.get(os.uname().machine)
                    if nr is not None:
                        sc = libc.syscall
                        _renameat2_fn = lambda a, b, flags: sc(  # noqa: E731
                            ctypes.c_long(nr), ctypes.c_int(_AT_FDCWD), ctypes.c_char_p(a), ctypes.c_int(_AT_FDCWD),
                            ctypes.c_char_p(b), ctypes.c_uint(flags))
            except (OSError, AttributeError):
                _renameat2_fn = False
    return _renameat2_fn


def renameat2(src: str | os.PathLike, dst: str | os.PathLike, flags: int) -> bool:
    """rename(2) with flags. True when done; False where the kernel or file system does not support the flags;
    OSError (EEXIST for RENAME_NOREPLACE onto an existing name, ENOENT, ...) otherwise."""
    fn = _renameat2_impl()
    if not fn:
        return False
    if fn(os.fsencode(src), os.fsencode(dst), flags) == 0:
        return True
    e = ctypes.get_errno()
    if e in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(e, os.strerror(e), str(dst))


# ----------------------------------------------------------------------------- what lowbit wrote


def _read_head(path: Path, n: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        return os.read(fd, n)
    finally:
        os.close(fd)


def is_lowbit_checkpoint(folder: Path) -> bool:
    """A folder lowbit wrote: a lowbit checkpoint, or an export of one (what --force may replace)."""
    cfg = folder / "config.json"
    try:
        st = os.lstat(cfg)
        if not stat.S_ISREG(st.st_mode) or st.st_size > (16 << 20):
            return False
        qc = json.loads(_read_head(cfg, st.st_size + 1)).get("quantization_config")
        return isinstance(qc, dict) and (qc.get("quant_method") == "lowbit" or _exported_by_lowbit(qc))
    except (OSError, ValueError, AttributeError):
        return False


def _exported_by_lowbit(qc: dict) -> bool:
    """A compressed-tensors / GPTQ / AWQ folder that `lowbit export` wrote (its producer fields say so)."""
    producer = qc.get("producer")
    if isinstance(producer, dict) and producer.get("name") == "lowbit":
        return True
    meta = qc.get("meta")
    quantizer = meta.get("quantizer") if isinstance(meta, dict) else None
    return isinstance(quantizer, list) and any(isinstance(q, str) and q.startswith("lowbit:") for q in quantizer)


def _not_replaceable(out: Path, kind: str) -> str | None:
    """Why --force must not replace `out` (None: it is lowbit's to replace)."""
    is_dir, magic = KINDS[kind]
    try:
        st = os.lstat(out)
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"cannot inspect it ({e.strerror})"
    what = _DESCRIBE[kind]
    if stat.S_ISLNK(st.st_mode):
        return f"is a symbolic link, not {what}"
    if is_dir:
        if not stat.S_ISDIR(st.st_mode):
            return f"is not a folder, so not {what}"
        try:
            empty = not any(os.scandir(out))
        except OSError as e:
            return f"cannot list it ({e.strerror})"
        return None if empty or is_lowbit_checkpoint(out) else f"is not {what} (no lowbit config.json)"
    if not stat.S_ISREG(st.st_mode):
        return f"is not a regular file, so not {what}"
    if magic is None or st.st_size == 0:
        return None
    try:
        head = _read_head(out, len(magic))
    except OSError as e:
        return f"cannot read it ({e.strerror})"
    return None if head == magic else f"is not {what} (wrong magic bytes)"


def check_output(out: str | os.PathLike, overwrite: bool = False, kind: str = "checkpoint") -> Path:
    """Validate OUT before any long work: refuse what cannot be written, and what --force may not replace."""
    out = Path(out).expanduser()
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    if os.path.lexists(out):
        if not overwrite:
            raise LowbitError(f"{out}: already exists (pass --force to replace it)")
        why = _not_replaceable(out, kind)
        if why:
            raise LowbitError(f"{out}: already exists and {why}; --force replaces only what lowbit writes "
                              "(move it away yourself)")
    ancestor = out.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise LowbitError(f"{out}: cannot create output folder ({ancestor} is not a folder)")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise LowbitError(f"{out}: cannot create output folder (no write permission in {ancestor})")
    return out


# ----------------------------------------------------------------------------- temporaries and their sweep


def _pid_runs(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lock(path: Path, blocking: bool = False) -> int | None:
    """An flock()ed descriptor of `path` (a file or folder), or None if another descriptor holds the lock."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:
        os.close(fd)
        raise
    return fd


def _remove(path: str | os.PathLike) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _stale(path: str, pid: int | None, now: float) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if stat.S_ISLNK(st.st_mode) or not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
        return False  # not something lowbit made
    age = now - st.st_mtime
    if pid is None:  # an earlier version's temporary: no pid, no lock
        return age > LEGACY_STALE_AFTER_S
    try:
        fd = _lock(Path(path))
    except OSError:
        return False
    if fd is None:
        return False  # its writer holds it
    os.close(fd)
    return not _pid_runs(pid) or age > STALE_AFTER_S


def sweep_stale(folder: str | os.PathLike, cache: bool = False) -> list[str]:
    """Remove the temporaries that killed lowbit runs left in `folder` (see the module docstring).
    cache=True: lowbit's own cache folder, where earlier versions named them NAME.tmp-RANDOM (no dot)."""
    removed = []
    now = time.time()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for e in entries:
        m = _TEMP.match(e.name)
        pid = int(m["pid"]) if m else None
        if m is None and not (_LEGACY.match(e.name) or (cache and _LEGACY_CACHE.match(e.name))):
            continue
        if _stale(e.path, pid, now):
            _remove(e.path)
            removed.append(e.path)
    return removed


def temp_sibling(out: Path, is_dir: bool, tag: str = "tmp") -> tuple[Path, int]:
    """A new temporary next to `out` (.NAME.tmp-PID-RANDOM), flock()ed: (path, descriptor holding the lock)."""
    prefix = f".{out.name}.{tag}-{os.getpid()}-"
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=out.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=out.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        lock = _lock(tmp, blocking=True)
    except OSError:
        _remove(tmp)
        raise
    return tmp, lock


@contextmanager
def locked_temp_dir(target: Path):
    """A locked temporary folder next to `target`, in a folder of lowbit's own (its cache: stale temporaries of
    killed runs, this version's and earlier ones', are swept first); removed on exit unless moved away."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(target.parent, cache=True)
        tmp, lock = temp_sibling(target, is_dir=True)
    except OSError as e:
        raise LowbitError(f"{target.parent}: cannot write ({e.strerror})") from None
    try:
        yield tmp
    finally:
        _remove(tmp)
        os.close(lock)


def install_new(tmp: Path, out: Path) -> bool:
    """Move the finished `tmp` to `out` unless something is there already (then False; tmp stays)."""
    try:
        if renameat2(tmp, out, RENAME_NOREPLACE):
            return True
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            return False
        raise
    # no renameat2 here: claim the name exclusively, then move into it
    if tmp.is_dir():
        try:
            os.mkdir(out)
        except FileExistsError:
            return False
        try:
            os.rename(tmp, out)  # onto our own empty folder
        except OSError:
            os.rmdir(out)
            raise
        return True
    try:
        os.link(tmp, out)
    except FileExistsError:
        return False
    os.unlink(tmp)
    return True


def _replace(tmp: Path, out: Path, kind: str) -> None:
    """Put `tmp` in place of the existing `out` (which lowbit may replace); the old one ends at `tmp`'s name
    (removed by the caller). On any failure `out` is what it was."""
    why = _not_replaceable(out, kind)  # again: it may have changed during the long work
    if why:
        raise LowbitError(f"{out}: already exists and {why}; --force replaces only what lowbit writes "
                          "(move it away yourself)")
    try:
        if renameat2(tmp, out, RENAME_EXCHANGE):
            return
    except FileNotFoundError:  # OUT went away meanwhile
        if install_new(tmp, out):
            return
        raise LowbitError(f"{out}: created meanwhile by another process; run again to replace it") from None
    # no RENAME_EXCHANGE here: rename aside, rename in, roll back on failure
    old = out.parent / f".{out.name}.old-{os.getpid()}-{os.urandom(4).hex()}"
    os.rename(out, old)
    try:
        if not install_new(tmp, out):
            raise LowbitError(f"{out}: created meanwhile by another process; the old one is kept")
    except BaseException:
        try:
            os.rename(old, out)
        except OSError:
            pass
        raise
    _remove(old)


def _default_permissions(path: Path) -> None:
    """mkdtemp/mkstemp create private (0700/0600) entries; give the result the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    entries = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in entries:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


@contextmanager
def atomic_path(out: str | os.PathLike, overwrite: bool = False, is_dir: bool = True, kind: str | None = None):
    """Yield a temporary path; on success it becomes `out`, on any failure it is removed and `out` is
    untouched. `kind` (default: "checkpoint" for folders, "file" otherwise): what --force may replace."""
    kind = kind or ("checkpoint" if is_dir else "file")
    out = check_output(out, overwrite, kind)
    parent = out.absolute().parent
    created = []  # parent folders made here, removed again if nothing lands in them
    p = parent
    while not p.exists():
        created.append(p)
        p = p.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(parent)
        tmp, lock = temp_sibling(out, is_dir)
    except OSError as e:
        _remove_empty(created)
        raise LowbitError(f"{out}: cannot write ({e.strerror})") from None
    ok = False
    try:
        yield tmp
        _default_permissions(tmp)
        try:
            if overwrite and os.path.lexists(out):
                _replace(tmp, out, kind)
            elif not install_new(tmp, out):
                raise LowbitError(f"{out}: already exists (another process created it meanwhile; "
                                  "pass --force to replace it)")
        except OSError as e:
            raise LowbitError(f"{out}: cannot write ({e.strerror})") from None
        ok = True
    finally:
        _remove(tmp)  # a failure's partial output, or the replaced old OUT
        os.close(lock)
        if not ok:
            _remove_empty(created)


def _remove_empty(folders: list[Path]) -> None:
    for f in folders:  # deepest first
        try:
            f.rmdir()
        except OSError:
            break


_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """A .safetensors file written straight from the tensors' memory (safetensors' save_file first copies every
    tensor into one bytes object: twice the shard's size at the peak -- 2 GB more for an 8B shape's embedding
    and head). Tensors in name order, header padded to 8 bytes: the same input gives the same bytes."""
    names = sorted(tensors)
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    off = 0
    for n in names:
        t = tensors[n]
        size = t.numel() * t.element_size()
        header[n] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + size]}
        off += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for n in names:
            t = tensors[n].detach().to("cpu").contiguous()
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
