"""Streamed, resumable quantization output: each finished decoder block goes to disk as it is done.

    .OUT.lowbit-resume/              beside OUT, while the run lasts
        state.json                   what is done: fingerprint of the run, one record per finished block
        block-00007.safetensors      block 7's tensors (packed codes, scales, its norms), written once
        carry-00007.safetensors      the inputs of block 8 (calibrated methods): the calibration state
        lock                         flock()ed by the run that owns the folder

A block is finished when state.json says so; state.json is replaced atomically (written beside it, fsynced,
renamed) only after the block's files are fsynced, so a kill at any point (SIGKILL included) leaves either
the old state or the new one, never a half-written block that counts. `--resume` reads it back: the
finished blocks are skipped (their float weights are never read again), calibration continues from the
saved inputs, and the checkpoint is the same bytes as an uninterrupted run's.

The final checkpoint (one lowbit.safetensors when it is at most SINGLE_FILE_MAX bytes) is otherwise sharded: `lowbit-0000K-of-0000N.safetensors` per block (hard links of the block
files: no copy) plus one shard for everything outside the blocks, `lowbit.safetensors.index.json`, and
config.json whose quantization_config holds every shard's sha256. Memory while it runs: the parts outside
the blocks, one block, its calibration state; never the whole float or quantized model.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

from ..core.config import QuantConfig
from ..core.scheme import Scheme
from ..core.state import QuantRecord, state_of
from ..core.version import __version__
from ..errors import LowbitError
from .checkpoint import INDEX, WEIGHTS, ZERO_LAYOUT, _dedupe, _sha256, layer_entry, write_side_files
from ..core.io import atomic_path, check_output, write_safetensors

STATE = "state.json"


def work_folder(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.absolute().parent / f".{out.name}.lowbit-resume"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _durable_write(path: Path, write) -> None:
    """write(tmp path), fsync it, rename it onto `path`, fsync the folder."""
    tmp = path.with_name(path.name + ".part")
    write(tmp)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _free(block: nn.Module) -> None:
    """Every tensor of the block onto the meta device: its memory goes back, its names stay."""
    for mod in block.modules():
        for table in (mod._parameters, mod._buffers):
            for k, t in table.items():
                if t is not None and not t.is_meta:
                    meta = torch.empty(t.shape, dtype=t.dtype, device="meta")
                    table[k] = nn.Parameter(meta, requires_grad=False) if isinstance(t, nn.Parameter) else meta
        if hasattr(mod, "kstate"):
            from ..kernels.state import KernelState

            mod.kstate = KernelState()


class StreamSink:
    """core.state.BlockSink writing into the work folder of OUT (see the module's docstring)."""

    def __init__(self, out: str | os.PathLike, fingerprint: dict, resume: bool, overwrite: bool = False) -> None:
        self.out = Path(out)
        self.dir = work_folder(out)
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True))
        self.blocks: list[dict] = []
        self.prefixes: list[str] = []
        state_path = self.dir / STATE
        if self.dir.exists() and not self.dir.is_dir():
            raise LowbitError(f"{self.dir}: in the way of the resume state (not a folder)")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)  # OUT's folder may not exist yet (out/model: make demo)
        except OSError as e:
            raise LowbitError(f"{self.dir}: cannot write ({e.strerror})") from None
        self._lock_fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            raise LowbitError(f"{self.dir}: another lowbit run is writing this output") from None
        if state_path.is_file():
            if not resume and not overwrite:
                self.close()
                raise LowbitError(f"{self.out}: an unfinished run's state is in {self.dir}: add --resume to continue "
                                  f"it (or --force to start over)")
            if resume:
                try:
                    st = json.loads(state_path.read_text())
                    ok = st.get("fingerprint") == self.fingerprint
                    blocks = st["blocks"]
                except (ValueError, KeyError, TypeError, AttributeError):
                    self.close()
                    raise LowbitError(f"{state_path}: unreadable resume state (delete {self.dir} to start over)") from None
                if not ok:
                    self.close()
                    raise LowbitError(f"--resume: {self.dir} was made by another run (other model, method or options): "
                                      f"use the same command, or --force to start over")
                self.blocks = blocks
                self.prefixes = [b["name"] + "." for b in blocks]
                if blocks:
                    print(f"lowbit: resuming after {len(blocks)} finished blocks ({self.dir})", file=sys.stderr)
        if not self.blocks:  # a fresh start: nothing from an earlier run may remain
            for p in self.dir.iterdir():
                if p.name != "lock":
                    p.unlink()
            self._write_state()

    # ------------------------------------------------------------------ BlockSink
    def resume_point(self):
        schemes = {n: Scheme.from_dict(e["scheme"]) for b in self.blocks for n, e in b["schemes"].items()}
        inputs = None
        if self.blocks and self.blocks[-1].get("carry"):
            from ..models.safetensors_read import read_tensors

            path = self.dir / self.blocks[-1]["carry"]
            x = dict(read_tensors(path, ["inputs"]))["inputs"]
            inputs = list(x.split(1))
        return len(self.blocks), schemes, inputs

    def finish_block(self, index: int, name: str, block: nn.Module, schemes: dict[str, Scheme], next_inputs) -> None:
        if index != len(self.blocks):
            raise RuntimeError(f"block {index} finished out of order ({len(self.blocks)} done)")
        prefix = name + "."
        tensors = {prefix + k: t.detach().to("cpu").contiguous() for k, t in block.state_dict().items()}
        fname = f"block-{index:05d}.safetensors"
        _durable_write(self.dir / fname, lambda p: write_safetensors(p, tensors, {"format": "pt"}))
        del tensors
        carry = None
        if next_inputs is not None:
            carry = f"carry-{index:05d}.safetensors"
            x = torch.cat([t.detach().to("cpu") for t in next_inputs]).contiguous()
            _durable_write(self.dir / carry, lambda p: write_safetensors(p, {"inputs": x}))
            del x
        layers = {}
        for n, sc in schemes.items():
            mod = block.get_submodule(n[len(prefix):])
            layers[n] = layer_entry(mod)
        rec = {"name": name, "file": fname, "sha256": _sha256(self.dir / fname), "carry": carry,
               "schemes": {n: {"scheme": sc.to_dict()} for n, sc in schemes.items()}, "layers": layers}
        self.blocks.append(rec)
        self._write_state()  # the commit point
        if index > 0 and self.blocks[index - 1].get("carry"):  # the previous calibration state is spent
            try:
                os.unlink(self.dir / self.blocks[index - 1]["carry"])
            except FileNotFoundError:
                pass
        self.prefixes.append(prefix)
        _free(block)

    def streamed(self) -> tuple[str, ...]:
        return tuple(self.prefixes)

    # ------------------------------------------------------------------ the rest
    def _write_state(self) -> None:
        body = json.dumps({"fingerprint": self.fingerprint, "blocks": self.blocks}, indent=1, sort_keys=True)
        _durable_write(self.dir / STATE, lambda p: p.write_text(body))

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def discard(self) -> None:
        """The run is complete: remove the work folder."""
        for p in self.dir.iterdir():
            p.unlink()
        self.close()
        self.dir.rmdir()


SINGLE_FILE_MAX = 1 << 30  # bytes: a checkpoint up to this size is one lowbit.safetensors, like save_checkpoint's


def save_streamed(model: nn.Module, tokenizer, out: str | os.PathLike, sink: StreamSink, overwrite: bool = False,
                  single_file_max: int = SINGLE_FILE_MAX) -> Path:
    """Write the checkpoint of a streamed quantization, atomically like save_checkpoint: the finished blocks'
    files (hard links, no copy) plus one shard of everything else, the index and config.json -- or, when it
    all fits in `single_file_max` bytes, one lowbit.safetensors (the blocks read back; small models keep the
    one-file layout)."""
    record = state_of(model).quant or QuantRecord(None, {})
    cfg: QuantConfig | None = record.config
    default = cfg.scheme if cfg is not None else None
    on_disk = {n: e for b in sink.blocks for n, e in b["layers"].items()}
    prefixes = sink.streamed()
    layers = {}
    for name, scheme in record.modules.items():
        entry = dict(on_disk[name]) if name in on_disk else layer_entry(model.get_submodule(name))
        if scheme != default:
            entry["scheme"] = scheme.to_dict()
        layers[name] = entry
    rest = {k: t for k, t in model.state_dict().items() if not k.startswith(prefixes)}
    meta = [k for k, t in rest.items() if t.is_meta]
    if meta:
        raise LowbitError(f"internal: {meta[0]} was never computed")
    state, aliases = _dedupe(rest)
    block_bytes = sum((sink.dir / b["file"]).stat().st_size for b in sink.blocks)
    single = block_bytes + sum(t.numel() * t.element_size() for t in state.values()) <= single_file_max
    # one metadata key: safetensors writes a map of several in no fixed order (bytes would differ run to run)
    md = {"format": "pt"}
    with atomic_path(out, overwrite=overwrite) as tmp:
        if single:
            from ..models.safetensors_read import read_tensors
            from ..models.validate import file_table

            for b in sink.blocks:
                path = sink.dir / b["file"]
                if _sha256(path) != b["sha256"]:
                    raise LowbitError(f"{path}: changed since it was written (delete {sink.dir} and start over)")
                state.update(read_tensors(path, list(file_table(path))))
            write_safetensors(tmp / WEIGHTS, state, md)
            shas = _sha256(tmp / WEIGHTS)
        else:
            n = len(sink.blocks) + 1
            names = [f"lowbit-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
            weight_map, shas = {}, {}
            for b, fname in zip(sink.blocks, names):
                os.link(sink.dir / b["file"], tmp / fname)
                if _sha256(tmp / fname) != b["sha256"]:
                    raise LowbitError(f"{sink.dir / b['file']}: changed since it was written (delete {sink.dir} "
                                      f"and start over)")
                shas[fname] = b["sha256"]
                from ..models.validate import file_table

                for k in file_table(tmp / fname):
                    weight_map[k] = fname
            write_safetensors(tmp / names[-1], state, md)
            shas[names[-1]] = _sha256(tmp / names[-1])
            for k in state:
                weight_map[k] = names[-1]
            (tmp / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))},
                                                indent=2, sort_keys=True) + "\n")
        qc = {
            "quant_method": "lowbit",
            "lowbit_version": __version__,
            **ZERO_LAYOUT,
            **(cfg.to_dict() if cfg is not None else {"method": "none"}),
            "layers": layers,
            "aliases": aliases,
            "weights_sha256": shas,
        }
        write_side_files(model, tokenizer, tmp, qc)
    return Path(out)


__all__ = ["StreamSink", "save_streamed", "work_folder", "check_output"]
