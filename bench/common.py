"""Helpers shared by the bench scripts: timing, peak RSS, folder sizes, markdown."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def folder_bytes(path: str | os.PathLike) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def peak_rss_bytes() -> int:
    from lowbit.eval.speed import peak_rss_bytes as peak

    return peak()


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def markdown(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (key, header, format spec)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "| " + " | ".join("---" for _ in columns) + " |"
    body = []
    for r in rows:
        cells = []
        for key, _, fmt in columns:
            v = r.get(key)
            cells.append("—" if v is None else format(v, fmt))
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *body])


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def report(rows: list[dict], columns: list[tuple[str, str, str]], markdown_path: Path | None, summary: dict) -> None:
    """The closing output of a bench: the table on stderr (and to a file if asked), then one JSON summary line."""
    table = markdown(rows, columns)
    log(table)
    if markdown_path:
        Path(markdown_path).write_text(table + "\n")
    emit({"rows": rows, **summary})
