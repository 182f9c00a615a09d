"""Input files lowbit reads whole (texts, JSON): regular files only, of bounded size, checked before reading.

A FIFO given as a text would block the open (and then the read) forever, /dev/zero would never end, a
directory or a socket cannot be read: the path is stat()ed first and only regular files (or symbolic links
to them) are opened, without blocking, then fstat()ed again (the path may have been replaced meanwhile), and
at most `limit` bytes are read.
"""
from __future__ import annotations

import os
import stat

from ..errors import LowbitError

TEXT_LIMIT = 1 << 30  # 1 GiB: WikiText-103 is 0.5 GB


def _size(n: int) -> str:
    for unit, k in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << k and n % (1 << k) == 0:
            return f"{n >> k} {unit}"
    return f"{n:,} bytes"


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "is a folder"
    if stat.S_ISFIFO(mode):
        return "is a named pipe (FIFO)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device"
    if stat.S_ISSOCK(mode):
        return "is a socket"
    return "is not a regular file"


def open_regular(path: str | os.PathLike, what: str = "file") -> tuple[int, os.stat_result]:
    """A read-only descriptor of the regular file at `path` and its stat; LowbitError for anything else."""
    p = os.fspath(path)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise LowbitError(f"{p}: no such {what}") from None
    except OSError as e:
        raise LowbitError(f"{p}: cannot read ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise LowbitError(f"{p}: {_kind(st.st_mode)}, not a {what}")
    try:
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise LowbitError(f"{p}: cannot read ({e.strerror})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):  # replaced between stat and open
        os.close(fd)
        raise LowbitError(f"{p}: {_kind(st.st_mode)}, not a {what}")
    return fd, st


def read_regular(path: str | os.PathLike, limit: int, what: str = "file") -> bytearray:
    """The bytes of a regular file of at most `limit` bytes (refused beyond, before reading)."""
    fd, st = open_regular(path, what)
    p = os.fspath(path)
    try:
        if st.st_size > limit:
            raise LowbitError(f"{p}: {what} of {st.st_size:,} bytes, more than {_size(limit)} (the limit)")
        with os.fdopen(fd, "rb", buffering=0) as f:
            fd = -1
            buf = bytearray(st.st_size + 1)  # +1: notice a file that grew since its stat
            n = 0
            while True:
                if n == len(buf):
                    if n > limit:
                        raise LowbitError(f"{p}: {what} of more than {_size(limit)} (the limit)")
                    buf.extend(bytes(min(max(n, 1 << 16), limit + 1 - n)))
                got = f.readinto(memoryview(buf)[n:])
                if not got:
                    break
                n += got
            del buf[n:]
    except OSError as e:
        raise LowbitError(f"{p}: cannot read ({e.strerror})") from None
    finally:
        if fd >= 0:
            os.close(fd)
    return buf
