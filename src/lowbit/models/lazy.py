"""Float models whose weights stay on disk until the part of the model that needs them is reached.

    model, tok = lowbit.load(source, lazy=True)   # every parameter on the meta device
    lazy = state_of(model).lazy                   # this module's LazyWeights (core/state.py)
    lazy.materialize(model, block_name + ".")     # that block's tensors read from the safetensors
    lazy.materialize(model)                       # everything still missing

Calibrated methods that go one decoder block at a time (calibration/sequential.py) materialize the parts
outside the blocks first, then each block just before they quantize it; the float block is dropped when
its linears are replaced. Peak memory: the embeddings/head plus one block and the calibration activations,
not the whole float model (SmolLM2 in float32 is 540 MB). Sources: a folder of safetensors (one file or
a sharded index) — what the GGUF conversion cache and a local Hugging Face folder hold.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..core.state import state_of
from ..errors import LowbitError
from .safetensors_read import read_tensors


class LazyWeights:
    def __init__(self, folder: Path, dtype: torch.dtype | None, table: dict | None = None) -> None:
        """dtype: the float dtype tensors are read into (None: each as stored). table: the folder's tensor table (models/validate.tensor_table: every file inside the folder, every
        header entry checked against its file), read here when not given."""
        self.folder, self.dtype = folder, dtype
        if table is None:
            from .validate import tensor_table

            table = tensor_table(folder)
        self.files = {k: info.file for k, info in table.items()}

    def materialize(self, model: nn.Module, prefix: str = "", skip: tuple[str, ...] = ()) -> None:
        """Read every meta parameter/buffer whose name starts with `prefix` (and not with any of `skip`);
        tensors shared between modules (tied embeddings) are read once and shared again."""
        groups: dict[int, list[tuple[str, nn.Module, str, bool]]] = {}
        for mname, mod in model.named_modules(remove_duplicate=False):
            for kind, table in (("p", mod._parameters), ("b", mod._buffers)):
                for attr, t in table.items():
                    full = f"{mname}.{attr}" if mname else attr
                    if t is None or not t.is_meta:
                        continue
                    groups.setdefault(id(t), []).append((full, mod, attr, kind == "p"))
        todo = []
        for entries in groups.values():
            if not any(n.startswith(prefix) and not n.startswith(skip) for n, *_ in entries):
                continue
            key = next((n for n, *_ in entries if n in self.files), None)
            if key is None:
                raise LowbitError(f"{self.folder}: no tensor stored for {entries[0][0]}")
            todo.append((key, entries))
        by_file: dict[Path, list] = {}
        for key, entries in todo:
            by_file.setdefault(self.files[key], []).append((key, entries))
        for path, items in by_file.items():
            # plain reads into fresh tensors: a mapping of the file would keep every page a copy touched
            # resident while it lasts (an embedding would cost twice its size), and a tensor viewing it would
            # keep every page any block ever touched for as long as that tensor (the embeddings) lives
            entries_of = dict(items)
            for key, t in read_tensors(path, entries_of):
                if self.dtype is not None and t.is_floating_point() and t.dtype != self.dtype:
                    t = t.to(self.dtype)
                p = nn.Parameter(t, requires_grad=False)  # one object for every module sharing it
                for _, mod, attr, is_param in entries_of[key]:
                    if is_param:
                        mod._parameters[attr] = p
                    else:
                        mod._buffers[attr] = t

    def release(self, model: nn.Module, skip: tuple[str, ...] = ()) -> None:
        """Put the float tensors stored in the file back on the meta device (all but names starting with `skip`),
        to be read again by the next materialize: the embeddings while the blocks are quantized."""
        for mname, mod in model.named_modules(remove_duplicate=False):
            for attr, t in list(mod._parameters.items()):
                full = f"{mname}.{attr}" if mname else attr
                if t is not None and not t.is_meta and full in self.files and not full.startswith(skip):
                    mod._parameters[attr] = nn.Parameter(torch.empty(t.shape, dtype=t.dtype, device="meta"),
                                                         requires_grad=False)
        if hasattr(model, "tie_weights"):
            model.tie_weights()  # a tied head follows its embedding onto meta


def stored_float_dtype(table: dict) -> torch.dtype:
    """The dtype most of a tensor table's floating-point elements are stored in (float32 when none)."""
    from math import prod

    from .safetensors_read import DTYPES

    count: dict[torch.dtype, int] = {}
    for info in table.values():
        dt = DTYPES.get(info.dtype)
        if dt is not None and dt.is_floating_point:
            count[dt] = count.get(dt, 0) + prod(info.shape)
    return max(count, key=count.get) if count else torch.float32


def load_lazy(folder: Path, dtype: torch.dtype | None, label: str):
    """(model with meta weights, tokenizer) of a folder of safetensors; the model's state_of(model).lazy reads
    them. The folder is checked first (models/validate.py: no custom code, config sizes against the tensor
    table), then every tensor the files hold against the skeleton: a wrong shape or a missing weight fails
    here, not in the middle of a run."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .validate import check_skeleton, preflight, without_ignored

    table = preflight(folder, label)
    skeleton_dtype = dtype or stored_float_dtype(table)  # dtype None ("auto"): as stored
    try:
        config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=skeleton_dtype, trust_remote_code=False)
        model.tie_weights()  # from_config leaves tied parameters separate on meta; the file stores one of them
    except Exception as e:  # transformers raises many types; the user gets one line
        raise LowbitError(f"{label}: cannot load model lazily ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    table = without_ignored(model, table)
    check_skeleton(model, table, None, str(folder), implied_ties=True, uniform_floats=False)
    state_of(model).lazy = LazyWeights(folder, dtype, table)
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except Exception:
        tok = None
    return model, tok


def can_load_lazily(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (
        (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file())
