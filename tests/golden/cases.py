"""Golden checkpoints: every method on the tiny test model, driven only through the command line.

One module for the recorder (``python -m tests.golden.record``, which writes golden.json) and the test
(tests/golden/test_golden.py, which compares): the case list, the input models, how a case runs, how its
output is hashed and the environment the hashes were made on all live here, so the two cannot drift.

Stable surface only: every case is an argv for ``lowbit.cli.main`` (run in-process, as the ``cli``
fixture does); nothing here imports lowbit's internals, which a refactor may move.

What is hashed: every tensor of the output, never JSON configs (their layout may change).
  - checkpoint folders (quantize, qat): each tensor of every ``*.safetensors`` file in the folder, read
    with ``safetensors``; sha256 of (name, dtype, shape, raw bytes), keyed by tensor name;
  - GGUF files (export-gguf): each tensor as ``gguf.GGUFReader`` reads it; sha256 of (name, type,
    shape, raw bytes), stored as "TYPE sha256" so a change of type reads as such.

Inputs. The models are make_tiny_llama()'s architecture (tests/conftest.py) with weights that are the
same bits on every machine: torch's normal_() is not (its float path is Box-Muller with AVX2 intrinsics
on AVX2 builds and std::log/cos on AVX-512 ones: different roundings), so every parameter is rewritten
from a SHAKE-256 stream: integers (a sum of four uint16, close to normal) times a power of two, i.e. exact
floats; the norms are 1 + such a perturbation, and two embedding channels are scaled by 8 (outlier
channels, so that SmoothQuant, rotations and AWQ have something to do). A second, wider model
(hidden 256, ffn 512) exists for the GGUF K-quants: the tiny model's rows (72, 160 columns) do not split
into 256-weight super-blocks, so every K type falls back to Q5_0/Q8_0/F16 there. The tokenizer is
make_tokenizer(); its ids of TEXT are part of the recorded inputs.

Portability. ``portable`` cases compute their output elementwise from the (exact) input weights:
min/max or max|.| per group/row, IEEE division/multiplication, rounding, fp16 conversion, integer
packing (core/quant.py compute_qparams/quantize_codes, core/packing.py, nn/int8.pair_bounded_qtensor,
gguf blocks Q8_0/Q4_0/Q5_0 without an importance matrix, F16). Their bits do not depend on summation
order, so they are asserted on any machine. The others run matmuls, reductions, Cholesky factors or
training (calibration passes, GPTQ, AWQ's search, rotations, K-quant scale searches, QAT), whose float
rounding may differ with the CPU's vector width or torch's version: asserted only where torch's version
and the CPU flags equal the recorded ones. Every case runs with one torch thread (the thread count may
change how work is split, hence rounding) and torch's global RNG seeded. Checked when recording: with
torch's scalar kernels and MKL's SSE4.2 code (ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2)
the inputs and every portable case give the recorded hashes while 11 of the 23 others do not (and
make_tiny_llama()'s own normal_() weights differ).

Activation-only options (w8a8 --act-asym, llm-int8 --act-sym, --act dynamic/tensor) live in config.json,
which is not hashed: their tensors equal those of the matching weight settings; the cases still run them.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import platform
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

GOLDEN = Path(__file__).with_name("golden.json")
FORMAT = 1
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")
THREADS = 1
RNG_SEED = 0

CALIB = ("--calib", "{text}", "--nsamples", "8", "--calib-seqlen", "64")


@dataclass(frozen=True)
class Case:
    name: str
    argv: tuple[str, ...]  # lowbit argv; {tiny} {wide} {text} {out} are filled in by `run_case`
    portable: bool = False  # elementwise from the inputs: asserted on any machine (module docstring)
    slow: bool = False  # the slower cases (pytest -m "not slow" leaves them out)
    kind: str = "checkpoint"  # "checkpoint" (a folder of safetensors) or "gguf" (one .gguf file)

    def command(self) -> list[str]:
        return list(self.argv)


def _q(name: str, *opts: str, model: str = "{tiny}", **kw) -> Case:
    return Case(name, ("quantize", model, "{out}", *opts), **kw)


def _gguf(name: str, *opts: str, model: str = "{tiny}", **kw) -> Case:
    return Case(name, ("export-gguf", model, "{out}", *opts), kind="gguf", **kw)


def cases() -> list[Case]:
    """Every golden case, in recording order."""
    w4 = ("--bits", "4", "--group-size", "32")
    w3a = ("--bits", "3", "--group-size", "32", "--asym")
    out = [
        # RTN: elementwise everywhere (min/max per group, division, rounding, fp16 scales, packing)
        _q("rtn-w4g32-sym", "--method", "rtn", *w4, "--sym", portable=True),
        _q("rtn-w3g32-asym", "--method", "rtn", *w3a, portable=True),
        _q("rtn-w2-channel", "--method", "rtn", "--bits", "2", "--group-size", "-1", portable=True),
        _q("rtn-w8g32", "--method", "rtn", "--bits", "8", "--group-size", "32", portable=True),
        _q("rtn-w4g32-override-head-embed-8ch", "--method", "rtn", *w4,
           "--override", "lm_head|embed_tokens=8/-1", portable=True),
        _q("rtn-w4g32-include-exclude", "--method", "rtn", *w4, "--include", r"self_attn\.",
           "--include", "embed_tokens", "--exclude", r"layers\.1\.self_attn\.o_proj", portable=True),
        # GPTQ / AWQ / AWQ+GPTQ: calibration passes, Hessians, Cholesky, scale search
        _q("gptq-w4g32", "--method", "gptq", *w4, *CALIB),
        _q("gptq-w3g32-asym", "--method", "gptq", *w3a, *CALIB),
        _q("gptq-w4g32-no-act-order", "--method", "gptq", *w4, "--no-act-order", *CALIB),
        _q("gptq-w3g32-asym-no-act-order", "--method", "gptq", *w3a, "--no-act-order", *CALIB),
        _q("gptq-w4g32-no-true-sequential", "--method", "gptq", *w4, "--no-true-sequential", *CALIB),
        _q("awq-w4g32", "--method", "awq", *w4, *CALIB),
        _q("awq-w3g32-asym", "--method", "awq", *w3a, *CALIB),
        _q("awq+gptq-w4g32", "--method", "awq+gptq", *w4, *CALIB),
        _q("awq+gptq-w3g32-asym", "--method", "awq+gptq", *w3a, *CALIB),
        # W8A8: rotation (matmuls, QR) and calibration are float-order dependent; plain and pair-bounded
        # per-channel/per-tensor int8 weights are elementwise
        _q("w8a8-default", "--method", "w8a8"),
        _q("w8a8-no-rotate", "--method", "w8a8", "--no-rotate", portable=True),
        _q("w8a8-no-rotate-no-pair-bound", "--method", "w8a8", "--no-rotate", "--no-pair-bound", portable=True),
        _q("w8a8-static-smooth0.5", "--method", "w8a8", "--act", "static", "--smooth", "0.5", *CALIB),
        _q("w8a8-act-tensor-per-tensor", "--method", "w8a8", "--act", "tensor", "--per-tensor", portable=True),
        _q("w8a8-act-asym", "--method", "w8a8", "--act-asym"),
        # LLM.int8(): per-channel int8 weights, no calibration (outliers are found at run time)
        _q("llm-int8-default", "--method", "llm-int8", portable=True),
        _q("llm-int8-act-sym", "--method", "llm-int8", "--act-sym", portable=True),
        # QAT: a few optimizer steps (end to end; block-wise only)
        Case("qat-w4g32-steps2", ("qat", "{tiny}", "{out}", "--bits", "4", "--group-size", "32",
                                  "--train-text", "{text}", "--eval-text", "{text}", "--steps", "2",
                                  "--batch", "2", "--seqlen", "32", "--eval-tokens", "64", "--lr", "1e-3")),
        Case("qat-w3g32-asym-blockwise", ("qat", "{tiny}", "{out}", "--bits", "3", "--group-size", "32", "--asym",
                                          "--train-text", "{text}", "--eval-text", "{text}", "--steps", "0",
                                          "--block-epochs", "1", "--block-samples", "4", "--block-seqlen", "32",
                                          "--eval-tokens", "64", "--learn-scales", "--learn-zeros")),
        # GGUF, tiny model (72/160 columns: K types fall back to Q5_0/Q8_0/F16; elementwise without calibration)
        _gguf("gguf-tiny-F16", "--type", "F16", portable=True),
        _gguf("gguf-tiny-Q8_0", "--type", "Q8_0", portable=True),
        _gguf("gguf-tiny-Q4_0", "--type", "Q4_0", portable=True),
        _gguf("gguf-tiny-Q4_K_M", "--type", "Q4_K_M", portable=True),
        _gguf("gguf-tiny-Q4_0-calib-gptq", "--type", "Q4_0", "--calib", "{text}", "--gptq",
              "--nsamples", "8", "--calib-seqlen", "64"),
        # GGUF, wide model (256/512 columns): the K-quant scale searches run for real
        _gguf("gguf-wide-Q4_K_M", "--type", "Q4_K_M", model="{wide}"),
        _gguf("gguf-wide-Q2_K", "--type", "Q2_K", model="{wide}"),
        _gguf("gguf-wide-Q3_K_M", "--type", "Q3_K_M", model="{wide}"),
        _gguf("gguf-wide-Q5_K_M", "--type", "Q5_K_M", model="{wide}"),
        _gguf("gguf-wide-Q6_K", "--type", "Q6_K", model="{wide}"),
        _gguf("gguf-wide-Q4_K_M-calib", "--type", "Q4_K_M", "--calib", "{text}", "--nsamples", "8",
              "--calib-seqlen", "64", model="{wide}", slow=True),
        _gguf("gguf-wide-Q4_K_M-calib-gptq", "--type", "Q4_K_M", "--calib", "{text}", "--gptq", "--nsamples", "8",
              "--calib-seqlen", "64", model="{wide}", slow=True),
        _gguf("gguf-wide-Q4_0-tensor-type", "--type", "Q4_0", "--tensor-type", "attn_v=Q6_K",
              "--tensor-type", "ffn_down=Q5_1", model="{wide}", portable=False),
    ]
    names = [c.name for c in out]
    assert len(set(names)) == len(names), "duplicate case names"
    return out


# ----------------------------------------------------------------------------- inputs


def _exact_ints(tag: str, n: int) -> np.ndarray:
    """n integers in [-131070, 131070], close to normal (sum of four uint16), from SHAKE-256 of `tag`."""
    raw = np.frombuffer(hashlib.shake_256(tag.encode()).digest(8 * n), dtype="<u2").reshape(n, 4)
    return raw.astype(np.int64).sum(axis=1) - 2 * 65535


def portable_weights_(model: torch.nn.Module, tag: str) -> None:
    """Rewrite every parameter with exact, machine-independent values (module docstring)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            k = _exact_ints(f"lowbit-golden/{tag}/{name}", p.numel()).reshape(tuple(p.shape))
            if p.dim() == 1:  # RMSNorm weights around 1
                v = 1.0 + k * 2.0**-19
            else:  # std ~ 37837 * 2^-21 ~ 0.018 (LLaMA's initializer_range is 0.02)
                v = k * 2.0**-21
                if name.endswith("embed_tokens.weight"):
                    v[:, [5, 40]] *= 8  # two outlier channels
            p.copy_(torch.from_numpy(v.astype(np.float32)))  # exact: |k| < 2^18


def make_wide_llama():
    """make_tiny_llama() with rows long enough for GGUF's 256-weight super-blocks (hidden 256, ffn 512)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, eos_token_id=0, bos_token_id=0, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def build_inputs(root: Path) -> dict[str, Path]:
    """Write the input models (HF folders) and the text file under `root`: {"tiny", "wide", "text"}."""
    from tests.conftest import TEXT, make_tiny_llama, make_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer()
    paths = {}
    for tag, make in (("tiny", make_tiny_llama), ("wide", make_wide_llama)):
        model = make()
        portable_weights_(model, tag)
        d = root / f"{tag}-hf"
        model.save_pretrained(d)
        tok.save_pretrained(d)
        paths[tag] = d
    text = root / "text.txt"
    text.write_text(TEXT)
    paths["text"] = text
    return paths


def input_hashes(paths: dict[str, Path]) -> dict[str, dict[str, str]]:
    """The inputs' fingerprints: every tensor of both models, and the tokenizer's ids of the text."""
    from transformers import AutoTokenizer

    out = {tag: checkpoint_hashes(paths[tag]) for tag in ("tiny", "wide")}
    tok = AutoTokenizer.from_pretrained(str(paths["tiny"]))
    ids = tok(paths["text"].read_text(), add_special_tokens=False).input_ids
    out["tokenizer"] = {"ids_of_text": hashlib.sha256(np.asarray(ids, dtype="<i8").tobytes()).hexdigest(),
                        "n_ids": str(len(ids))}
    return out


# ----------------------------------------------------------------------------- hashing


def tensor_sha256(name: str, dtype: str, shape, data: bytes) -> str:
    h = hashlib.sha256()
    h.update(f"{name}\0{dtype}\0{list(int(s) for s in shape)}\0".encode())
    h.update(data)
    return h.hexdigest()


def checkpoint_hashes(folder: Path) -> dict[str, str]:
    """{tensor name: sha256} over every *.safetensors file in `folder` (not recursive)."""
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors file")
    out: dict[str, str] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                t = st.get_tensor(name)
                if name in out:
                    raise ValueError(f"{name} stored twice in {folder}")
                raw = t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
                out[name] = tensor_sha256(name, str(t.dtype).removeprefix("torch."), t.shape, raw)
    return dict(sorted(out.items()))


def gguf_hashes(path: Path) -> dict[str, str]:
    """{GGUF tensor name: "TYPE sha256"} of every tensor in the file."""
    import gguf

    r = gguf.GGUFReader(str(path))
    out: dict[str, str] = {}
    for t in r.tensors:
        ttype = gguf.GGMLQuantizationType(t.tensor_type).name
        raw = np.ascontiguousarray(t.data).tobytes()
        out[t.name] = f"{ttype} " + tensor_sha256(t.name, ttype, list(t.shape), raw)
    return dict(sorted(out.items()))


# ----------------------------------------------------------------------------- running


class CommandFailed(RuntimeError):
    pass


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """lowbit.cli.main in-process, as tests/conftest.py's `cli` fixture: (exit code, stdout, stderr)."""
    from lowbit.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved = sys.argv
    sys.argv = ["lowbit", *argv]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    return code, out.getvalue(), err.getvalue()


def run_case(case: Case, inputs: dict[str, Path], workdir: Path) -> dict[str, str]:
    """Run `case` through the CLI with outputs under `workdir`; returns its tensor hashes."""
    Path(workdir).mkdir(parents=True, exist_ok=True)
    out = Path(workdir) / (case.name + (".gguf" if case.kind == "gguf" else ""))
    subst = {"tiny": str(inputs["tiny"]), "wide": str(inputs["wide"]), "text": str(inputs["text"]), "out": str(out)}
    argv = [a.format(**subst) if a.startswith("{") else a for a in case.command()]
    threads = torch.get_num_threads()
    rng = torch.get_rng_state()
    torch.set_num_threads(THREADS)
    torch.manual_seed(RNG_SEED)
    random.seed(RNG_SEED)
    np.random.seed(RNG_SEED)
    try:
        code, stdout, stderr = run_cli(argv)
    finally:
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)
    if code != 0:
        tail = "\n".join((stdout + stderr).strip().splitlines()[-15:])
        raise CommandFailed(f"lowbit {' '.join(argv)} exited with {code}:\n{tail}")
    return gguf_hashes(out) if case.kind == "gguf" else checkpoint_hashes(out)


# ----------------------------------------------------------------------------- environment


def cpu_flags() -> dict[str, bool] | None:
    """The relevant flags of /proc/cpuinfo's first processor (None where there is no /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            have = set(line.split(":", 1)[1].split())
            return {f: f in have for f in CPU_FLAGS}
    return None


def key_environment() -> dict:
    """What float-order dependent hashes depend on: torch's version and the CPU's flags."""
    return {"torch": torch.__version__, "cpu_flags": cpu_flags()}


def environment() -> dict:
    """key_environment(), the torch thread count of the runs, and informative versions."""
    import safetensors
    import tokenizers
    import transformers
    from importlib.metadata import PackageNotFoundError, version

    def ver(pkg: str) -> str | None:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None

    return {**key_environment(), "threads": THREADS,
            "info": {"machine": platform.machine(), "python": platform.python_version(),
                     "numpy": np.__version__, "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__, "safetensors": safetensors.__version__,
                     "gguf": ver("gguf"), "lowbit": ver("lowbit"),
                     "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}}


def environment_mismatch(recorded: dict, here: dict | None = None) -> str | None:
    """None where torch's version and the CPU flags equal the recorded ones; else what differs."""
    here = here or key_environment()
    diffs = []
    if recorded.get("torch") != here["torch"]:
        diffs.append(f"torch {here['torch']} here, {recorded.get('torch')} recorded")
    rf, hf = recorded.get("cpu_flags"), here["cpu_flags"]
    if rf != hf:
        if rf is None or hf is None:
            diffs.append(f"CPU flags {hf} here, {rf} recorded")
        else:
            d = [f"{f}: {'yes' if hf.get(f) else 'no'} here, {'yes' if rf.get(f) else 'no'} recorded"
                 for f in CPU_FLAGS if bool(hf.get(f)) != bool(rf.get(f))]
            diffs.append("CPU flags differ (" + "; ".join(d) + ")")
    return "; ".join(diffs) or None


def diff(expected: dict[str, str], got: dict[str, str]) -> str:
    """Which tensors differ, for a failure message."""
    lines = []
    for n in sorted(set(expected) | set(got)):
        if n not in got:
            lines.append(f"  missing  {n}")
        elif n not in expected:
            lines.append(f"  new      {n}")
        elif expected[n] != got[n]:
            lines.append(f"  changed  {n}: {expected[n][:24]}... -> {got[n][:24]}...")
    return "\n".join(lines[:40]) + (f"\n  ... {len(lines) - 40} more" if len(lines) > 40 else "")


def golden_case_entry(case: Case, tensors: dict[str, str]) -> dict:
    return {"argv": list(case.argv), "portable": case.portable, "kind": case.kind, "tensors": tensors}


