"""Atomic output: build in a temporary sibling, then rename into place."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..errors import LowbitError


def check_output(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Validate OUT before any long work: refuse what cannot be written."""
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise LowbitError(f"{out}: already exists (pass --force to replace it)")
    ancestor = out.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise LowbitError(f"{out}: cannot create output folder ({ancestor} is not a folder)")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise LowbitError(f"{out}: cannot create output folder (no write permission in {ancestor})")
    return out


def _default_permissions(path: Path) -> None:
    """mkdtemp/mkstemp create private (0700/0600) entries; give the result the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    entries = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in entries:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


@contextmanager
def atomic_path(out: str | os.PathLike, overwrite: bool = False, is_dir: bool = True):
    """Yield a temporary path; on success it replaces `out`, on any failure it is removed."""
    out = check_output(out, overwrite)
    parent = out.absolute().parent
    created = []  # parent folders made here, removed again if nothing lands in them
    p = parent
    while not p.exists():
        created.append(p)
        p = p.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        if is_dir:
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
        else:
            fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=parent)
            os.close(fd)
            tmp = Path(name)
    except OSError as e:
        _remove_empty(created)
        raise LowbitError(f"{out}: cannot write ({e.strerror})") from None
    ok = False
    try:
        yield tmp
        _default_permissions(tmp)
        if out.exists():
            old = parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
        else:
            os.replace(tmp, out)
        ok = True
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        if not ok:
            _remove_empty(created)


def _remove_empty(folders: list[Path]) -> None:
    for f in folders:  # deepest first
        try:
            f.rmdir()
        except OSError:
            break
