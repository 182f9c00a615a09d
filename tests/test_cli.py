import json
import os
import subprocess
import sys

import pytest


def assert_clean_error(code, out, err, *, contains=None):
    assert code != 0
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert lines and lines[-1].startswith("lowbit: error:"), err
    assert "Traceback" not in err
    if contains:
        assert contains in lines[-1], lines[-1]


def test_quantize_eval_inspect_generate(cli, tiny_dir, tmp_path, text_file):
    out = tmp_path / "q4"
    code, _, err = cli("quantize", tiny_dir, out, "--method", "rtn", "--bits", "4", "--group-size", "32", "--asym")
    assert code == 0, err
    code, stdout, err = cli("eval", out, "--text", text_file, "--seqlen", "64", "--limit-tokens", "256",
                            "--base", tiny_dir, "--json")
    assert code == 0, err
    res = json.loads(stdout.strip().splitlines()[-1])
    for key in ("ppl", "tokens", "seqlen", "bpw", "quantized_bytes", "kl", "top1"):
        assert key in res
    assert res["tokens"] == 256 and res["seqlen"] == 64 and 4 < res["bpw"] < 5.5  # tiny rows: scale/zero overhead is large
    code, stdout, err = cli("inspect", out)
    assert code == 0, err
    down = [l for l in stdout.splitlines() if l.startswith("model.layers.1.mlp.down_proj")]
    assert len(down) == 1 and "72x160" in down[0] and "  4 " in down[0]
    code, stdout, err = cli("generate", out, "--prompt", "The quick", "--max-new-tokens", "5")
    assert code == 0, err
    assert stdout.strip()


def test_per_channel_flag(cli, tiny_dir, tmp_path):
    out = tmp_path / "q8"
    code, _, err = cli("quantize", tiny_dir, out, "--bits", "8", "--group-size", "-1", "--sym")
    assert code == 0, err
    conf = json.loads((out / "config.json").read_text())["quantization_config"]
    assert conf["scheme"]["granularity"] == "channel" and conf["scheme"]["bits"] == 8


@pytest.mark.parametrize("args", [
    ["--method", "w8a8"],
    ["--method", "w8a8", "--act", "static", "--smooth", "0.5", "--nsamples", "4", "--calib-seqlen", "32"],
    ["--method", "w8a8", "--act", "tensor", "--per-tensor"],
    ["--method", "llm-int8", "--threshold", "4"],
    ["--method", "w8a8", "--act-asym"],
    ["--method", "llm-int8", "--act-asym"],
    ["--method", "llm-int8", "--act-sym"],
    ["--method", "w8a8", "--act-sym"],
    ["--method", "w8a8", "--no-rotate", "--no-pair-bound"],
    ["--method", "w8a8", "--act", "tensor", "--rotate"],
])
def test_int8_methods(cli, tiny_dir, tmp_path, text_file, args):
    out = tmp_path / "q"
    calib = ["--calib", text_file] if args[1] == "w8a8" else []  # llm-int8 takes no calibration options
    code, _, err = cli("quantize", tiny_dir, out, *args, *calib)
    assert code == 0, err
    conf = json.loads((out / "config.json").read_text())["quantization_config"]
    assert conf["method"] == args[1] and conf["scheme"]["bits"] == 8
    assert {e["kind"] for e in conf["layers"].values()} == {args[1]}
    # symmetric activations by default for w8a8, zeropoint ones for llm-int8 (the paper's best variant)
    symmetric = "--act-sym" in args or ("--act-asym" not in args and args[1] == "w8a8")
    assert {e["act"]["symmetric"] for e in conf["layers"].values()} == {symmetric}
    # w8a8 rotates where activation scales are computed at run time, unless --no-rotate; the default for
    # --act tensor is the naive scheme, unrotated
    rotated = args[1] == "w8a8" and ("--rotate" in args or ("--no-rotate" not in args and "--act" not in args))
    assert {e.get("rotated", False) for e in conf["layers"].values()} == {rotated}
    code, stdout, err = cli("eval", out, "--text", text_file, "--seqlen", "64", "--limit-tokens", "256", "--json")
    assert code == 0, err
    assert json.loads(stdout.splitlines()[-1])["bpw"] > 8.0


BAD_QUANTIZE = {
    "missing model": (["/no/such/model"], "no such file"),
    "bits 1": (["{tiny}", "--bits", "1"], "bits"),
    "bits 9": (["{tiny}", "--bits", "9"], "bits"),
    "group 0": (["{tiny}", "--group-size", "0"], "group size"),
    "group -2": (["{tiny}", "--group-size", "-2"], "group size"),
    "unknown method": (["{tiny}", "--method", "magic"], "unknown method"),
    "not a model": (["{textfile}"], "not a model"),
    "folder without config": (["{emptydir}"], "no config.json"),
    "bad pattern": (["{tiny}", "--include", "("], "pattern"),
    "w8a8 with 4 bits": (["{tiny}", "--method", "w8a8", "--bits", "4"], "8-bit symmetric"),
    "w8a8 grouped": (["{tiny}", "--method", "w8a8", "--group-size", "32"], "8-bit symmetric"),
    "w8a8 bad act": (["{tiny}", "--method", "w8a8", "--act", "magic"], "--act must be one of"),
    "w8a8 act bits 6": (["{tiny}", "--method", "w8a8", "--act-bits", "6"], "--act-bits"),
    "w8a8 smooth 2": (["{tiny}", "--method", "w8a8", "--smooth", "2"], "--smooth"),
    "rotated static act": (["{tiny}", "--method", "w8a8", "--act", "static", "--rotate"], "--rotate"),
    "llm-int8 rotated": (["{tiny}", "--method", "llm-int8", "--rotate"],
                         "--rotate is not an option of --method llm-int8 (w8a8 takes it)"),
    "asym static act": (["{tiny}", "--method", "w8a8", "--act", "static", "--act-asym"], "--act-asym"),
    "llm-int8 threshold 0": (["{tiny}", "--method", "llm-int8", "--threshold", "0"], "--threshold"),
}


@pytest.mark.parametrize("case", sorted(BAD_QUANTIZE))
def test_bad_quantize_inputs(cli, tiny_dir, tmp_path, text_file, case):
    args, msg = BAD_QUANTIZE[case]
    empty = tmp_path / "empty"
    empty.mkdir()
    args = [a.format(tiny=tiny_dir, textfile=text_file, emptydir=empty) for a in args]
    out = tmp_path / "out"
    code, stdout, err = cli("quantize", args[0], out, *args[1:])
    assert_clean_error(code, stdout, err, contains=msg)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_output_that_cannot_be_created(cli, tiny_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, stdout, err = cli("quantize", tiny_dir, blocker / "out")
    assert_clean_error(code, stdout, err, contains="cannot create")
    assert blocker.read_text() == "x"


def test_existing_output_refused_then_forced(cli, tiny_dir, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    code, stdout, err = cli("quantize", tiny_dir, out)
    assert_clean_error(code, stdout, err, contains="already exists")
    code, _, err = cli("quantize", tiny_dir, out, "--force")
    assert code == 0, err
    assert (out / "config.json").is_file()


def test_corrupt_checkpoint_refused(cli, tiny_dir, tmp_path):
    out = tmp_path / "q"
    assert cli("quantize", tiny_dir, out)[0] == 0
    w = out / "lowbit.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    for cmd in (["eval", out], ["inspect", out], ["generate", out, "--prompt", "x"]):
        code, stdout, err = cli(*cmd)
        assert_clean_error(code, stdout, err, contains="corrupt")


@pytest.mark.parametrize("case", ["missing", "empty", "folder"])
def test_bad_text(cli, tiny_dir, tmp_path, case):
    p = tmp_path / "t.txt"
    if case == "empty":
        p.write_text("  \n")
    elif case == "folder":
        p.mkdir()
    code, stdout, err = cli("eval", tiny_dir, "--text", p)
    assert_clean_error(code, stdout, err)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can read any file")
def test_unreadable_model(cli, tmp_path):
    p = tmp_path / "m.gguf"
    p.write_bytes(b"GGUF" + b"\0" * 64)
    p.chmod(0)
    code, stdout, err = cli("quantize", p, tmp_path / "o")
    assert_clean_error(code, stdout, err, contains="cannot read")


def test_truncated_gguf_refused(cli, tmp_path):
    p = tmp_path / "m.gguf"
    p.write_bytes(b"GGUF" + b"\x03\0\0\0" + b"\xff" * 20)
    code, stdout, err = cli("quantize", p, tmp_path / "o")
    assert_clean_error(code, stdout, err, contains="not a valid GGUF file")
    assert not (tmp_path / "o").exists()


def test_real_entry_point_exit_code(tmp_path):
    """The installed console entry point: exit code 2 and one line on stderr."""
    r = subprocess.run([sys.executable, "-m", "lowbit", "quantize", "/no/such/model", str(tmp_path / "o"), "--bits", "4"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("lowbit: error:") and "Traceback" not in r.stderr


def test_bench_compare(cli, tiny_dir, tmp_path):
    out = tmp_path / "w4"
    assert cli("quantize", tiny_dir, out, "--bits", "4", "--group-size", "32")[0] == 0
    code, stdout, err = cli("bench", tiny_dir, "--compare", out, "--prompt-tokens", "16", "--new-tokens", "4",
                            "--runs", "1", "--json")
    assert code == 0, err
    res = json.loads(stdout.splitlines()[-1])
    a, b = res["rows"]
    assert a["prefill_tok_s"] > 0 and b["decode_tok_s"] > 0 and b["prefill_vs_first"] > 0
    assert b["model_bytes"] < a["model_bytes"] and res["peak_rss_bytes"] > 0
    code, stdout, err = cli("bench", tiny_dir, "--prompt-tokens", "0")
    assert code == 2 and "--prompt-tokens" in err


def test_override_quantizes_the_head_too(cli, tiny_dir, tmp_path):
    from lowbit import api
    from lowbit.runtime.decoder import LeanDecoder
    from lowbit.nn.qlinear import QuantEmbedding, QuantLinear

    out = tmp_path / "g4"
    code, _, err = cli("quantize", tiny_dir, out, "--method", "gptq", "--bits", "4", "--group-size", "32",
                       "--nsamples", "4", "--calib-seqlen", "32", "--override", "lm_head|embed_tokens=8/-1",
                       "--override", r"layers\.1\.mlp\.down_proj=3/32/asym")
    assert code == 0, err
    assert "lm_head" in err and "rounded to nearest" in err
    m, _ = api.load(out)
    assert isinstance(m.lm_head, QuantLinear) and m.lm_head.scheme.bits == 8 and m.lm_head.scheme.granularity == "channel"
    assert isinstance(m.model.embed_tokens, QuantEmbedding)
    down = m.model.layers[1].mlp.down_proj
    assert down.scheme.bits == 3 and not down.scheme.symmetric
    assert m.model.layers[0].mlp.down_proj.scheme.bits == 4
    assert LeanDecoder(m, max_len=8).head.kind == "w8"
    code, _, err = cli("quantize", tiny_dir, tmp_path / "bad", "--override", "lm_head=8/x")
    assert code == 2 and "BITS[/GROUP]" in err


def _commands() -> list[str]:
    import typer

    from lowbit.cli import app

    return sorted(typer.main.get_command(app).commands)


def test_every_help_works(cli):
    """Help texts are plain text: '[/GROUP]' in --override's help once crashed `quantize --help` (rich markup)."""
    names = _commands()
    assert {"quantize", "eval", "generate", "inspect", "qat", "bench", "export-gguf"} <= set(names)
    for args in ([], *([c] for c in names)):
        code, stdout, err = cli(*args, "--help")
        assert code == 0, (args, err)
        assert stdout.startswith("Usage: ") and not err, (args, err)
    assert "PATTERN=BITS[/GROUP][/sym|asym]" in " ".join(cli("quantize", "--help")[1].split())


@pytest.mark.parametrize("args,msg", [
    (["eval"], "Missing argument"),
    (["eval", "m", "--seqlen", "abc"], "Invalid value for '--seqlen'"),
    (["eval", "m", "--no-such-option"], "No such option: --no-such-option"),
    (["--no-such-option"], "No such option: --no-such-option"),
    (["no-such-command"], "No such command 'no-such-command'"),
])
def test_usage_errors_print_usage_and_exit_2(cli, args, msg):
    code, stdout, err = cli(*args)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert lines[0].startswith("Usage: ") and lines[-1].startswith("Error:") and msg in lines[-1], err
    assert "LOWBIT_DEBUG" not in err and "Traceback" not in err


def test_usage_error_from_the_real_entry_point():
    r = subprocess.run([sys.executable, "-m", "lowbit", "eval", "--seqlen", "abc"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.startswith("Usage: ") and "Error: " in r.stderr and "Traceback" not in r.stderr


def test_version(cli):
    from importlib.metadata import version

    code, stdout, err = cli("--version")
    assert code == 0, err
    assert stdout.strip() == f"lowbit {version('lowbit')}"


def test_interrupt_exits_130(cli, tiny_dir, monkeypatch):
    """Ctrl-C inside a command: typer turns it into an exit code of 130, which must not become 0."""
    from lowbit import api

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "load", interrupted)
    code, stdout, err = cli("eval", tiny_dir)
    assert code == 130
    assert err.strip().splitlines()[-1] == "lowbit: error: interrupted (nothing was written)"


# ---- hostile files (issue 24): one line, exit 2, in a separate process (a regression would crash it) ----------

def run_lowbit(*args, stdin=subprocess.DEVNULL, timeout=120):
    return subprocess.run([sys.executable, "-m", "lowbit", *map(str, args)], capture_output=True, text=True,
                          stdin=stdin, timeout=timeout)


def one_line_error(r, contains, only=True):
    """Exit 2 and one `lowbit: error:` line naming the cause (with only: nothing else on stderr, not even
    progress bars: the file is refused before any work)."""
    lines = [l for l in r.stderr.replace("\r", "\n").strip().splitlines() if l.strip()]
    assert r.returncode == 2, r.stderr[-2000:]
    assert lines[-1].startswith("lowbit: error:") and contains in lines[-1], r.stderr[-2000:]
    assert "Traceback" not in r.stderr and sum("error" in l for l in lines) == 1, r.stderr[-2000:]
    if only:
        assert len(lines) == 1, r.stderr[-2000:]


def wide_checkpoint(tmp_path):
    """A 128-wide LLaMA (4-bit g64: every linear runs in kernels/decode.c) with biases of 64 floats on k/v."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import lowbit
    from lowbit import QuantConfig, Scheme
    from tests.conftest import make_tokenizer

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, attention_bias=True, eos_token_id=0,
                               bos_token_id=0, pad_token_id=0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    lowbit.quantize(model, QuantConfig(scheme=Scheme(4, True, "group", 64)))
    return lowbit.save(model, make_tokenizer(), tmp_path / "ckpt")


@pytest.mark.parametrize("name,target", [
    ("model.norm.weight", "model.layers.0.self_attn.k_proj.bias"),  # was: free(): invalid next size / SIGSEGV
    ("model.layers.0.mlp.down_proj.qweight", "model.layers.0.self_attn.k_proj.bias"),  # was: out-of-bounds reads
])
def test_generate_refuses_an_alias_that_would_overflow_the_native_kernels(tmp_path, name, target):
    from tests.models.test_validate import rewrite

    ckpt = wide_checkpoint(tmp_path)
    assert run_lowbit("generate", ckpt, "--prompt", "a", "--max-new-tokens", "4").returncode == 0
    rewrite(ckpt, edit_tensors=lambda t: t.pop(name), edit_qc=lambda qc: qc["aliases"].update({name: target}))
    one_line_error(run_lowbit("generate", ckpt, "--prompt", "a", "--max-new-tokens", "4"), f"alias {name} -> {target}")


@pytest.mark.parametrize("stdin", ["closed", "pipe"])
@pytest.mark.parametrize("where", ["config.json", "tokenizer_config.json"])
def test_custom_code_is_refused_without_a_prompt(tiny_dir, tmp_path, stdin, where):
    """transformers asked "run the custom code? [y/N]" on stdin; lowbit refuses the folder, reading nothing."""
    f = tiny_dir / where
    c = json.loads(f.read_text())
    c["auto_map"] = {"AutoModelForCausalLM": "evil.Model", "AutoConfig": "evil.Config", "AutoTokenizer": ["evil.Tok", None]}
    if where == "config.json":
        c["model_type"] = "evilllama"
    else:
        c["tokenizer_class"] = "EvilTok"
    f.write_text(json.dumps(c))
    (tiny_dir / "evil.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').write('custom code ran')\n")
    if stdin == "closed":
        r = run_lowbit("generate", tiny_dir, "--prompt", "a", stdin=subprocess.DEVNULL, timeout=60)
    else:  # a pipe nobody writes to (and nobody closes): a prompt would wait here
        p = subprocess.Popen([sys.executable, "-m", "lowbit", "generate", str(tiny_dir), "--prompt", "a"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = p.communicate(timeout=60)
        finally:
            p.kill()
        r = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    one_line_error(r, "custom code")
    assert "[y/N]" not in r.stdout + r.stderr and not (tmp_path / "ran").exists()


def test_non_finite_logits_are_an_error(tiny_dir, tmp_path, text_file):
    """Inf in a weight: `ppl nan` with exit 0 before; generation chose tokens from NaN logits."""
    from safetensors.torch import save_file

    from tests.models.test_validate import tensors

    t = tensors(tiny_dir / "model.safetensors")
    t["model.norm.weight"][5] = float("inf")
    save_file(t, str(tiny_dir / "model.safetensors"), metadata={"format": "pt"})
    one_line_error(run_lowbit("eval", tiny_dir, "--text", text_file, "--seqlen", "64", "--limit-tokens", "128"),
                   "perplexity is nan: the model's logits are not finite", only=False)  # (progress bars)
    for runtime in ("lean", "transformers"):
        one_line_error(run_lowbit("generate", tiny_dir, "--prompt", "a", "--runtime", runtime),
                       "the model's logits are not finite", only=False)


# ----------------------------------------------------------------------------- flags generated from the method specs

QUANTIZE_FLAGS = [  # every option flag `lowbit quantize` had before the specs generated them, and the new ones
    "--method", "--bits", "--group-size", "--per-tensor", "--sym", "--asym", "--include", "--exclude", "--override",
    "--seed", "--force", "--calib", "--nsamples", "--calib-seqlen", "--act-order", "--no-act-order",
    "--true-sequential", "--no-true-sequential", "--percdamp", "--act", "--act-bits", "--act-asym", "--act-sym",
    "--smooth", "--rotate", "--no-rotate", "--pair-bound", "--no-pair-bound", "--threshold",
    "--blocksize", "--awq-grid", "--awq-clip", "--no-awq-clip", "--steps", "--lr", "--block-epochs", "--learn-scales",
]
QAT_FLAGS = [  # `lowbit qat`'s flags, as before
    "--bits", "--group-size", "--sym", "--asym", "--init", "--train-text", "--eval-text", "--steps", "--lr",
    "--scale-lr", "--learn-scales", "--learn-zeros", "--seqlen", "--batch", "--distill", "--clip", "--save-every",
    "--resume", "--block-epochs", "--block-lr", "--block-scale-lr", "--block-samples", "--block-seqlen",
    "--block-batch", "--eval-tokens", "--include", "--exclude", "--seed", "--force",
]


def _help_words(cli, *cmd):
    """(help text on one line, as click wraps it undone, its words)."""
    import re

    code, stdout, err = cli(*cmd, "--help")
    assert code == 0, err
    flat = " ".join(re.sub(r"(?<=\w)-\n\s*", "-", stdout).split())  # click wraps after hyphens too
    return flat, set(flat.replace("/", " ").replace(",", " ").split())


def test_quantize_help_lists_every_method_and_flag(cli):
    from lowbit.algorithms.registry import specs
    from lowbit.cli import _flags

    flat, words = _help_words(cli, "quantize")
    for s in specs():
        assert f"{s.name} ({s.help})" in flat
    assert "|".join(s.name for s in specs()) in flat  # --method's choices
    generated = [d for fl in _flags([(s.name, s.options) for s in specs()], set()) for d in fl.decls.split("/")]
    missing = [f for f in QUANTIZE_FLAGS + generated if f not in words]
    assert not missing, missing
    assert "(gptq, awq+gptq) GPTQ dampening" in flat and "[default: 0.01]" in flat
    assert "(w8a8, llm-int8) Symmetric activations" in flat and "[default: --act-sym; --act-asym for llm-int8]" in flat
    assert "[default: 4; 8 for w8a8, llm-int8]" in flat


def test_qat_help_keeps_its_flags(cli):
    _, words = _help_words(cli, "qat")
    assert not [f for f in QAT_FLAGS if f not in words]
    assert "--calib" not in words and "--method" not in words


@pytest.mark.parametrize("method,flag,takers", [
    ("gptq", ["--threshold", "4"], "llm-int8 takes it"),
    ("rtn", ["--nsamples", "4"], "gptq, awq, awq+gptq, signround, w8a8, qat take it"),
    ("awq+gptq", ["--no-true-sequential"], "gptq takes it"),
    ("llm-int8", ["--calib", "x.txt"], "gptq, awq, awq+gptq, signround, w8a8, qat take it"),
    ("w8a8", ["--steps", "3"], "qat takes it"),
])
def test_a_flag_of_another_method_is_refused(cli, tiny_dir, tmp_path, method, flag, takers):
    out = tmp_path / "o"
    code, stdout, err = cli("quantize", tiny_dir, out, "--method", method, *flag)
    assert code == 2
    assert_clean_error(code, stdout, err, contains=f"{flag[0]} is not an option of --method {method} ({takers})")
    assert len(err.strip().splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize("args,msg", [
    (["--method", "gptq", "--percdamp", "-1"], "--percdamp must be >= 0"),
    (["--method", "gptq", "--blocksize", "0"], "--blocksize must be >= 1"),
    (["--method", "awq", "--nsamples", "0"], "--nsamples >= 1"),
    (["--method", "qat", "--steps", "0"], "--steps >= 0 (>= 1 without --block-epochs)"),
    (["--method", "w8a8", "--per-tensor", "--asym"], "w8a8 takes 8-bit symmetric weights per channel or per tensor"),
    (["--method", "awq", "--calib", "/no/such/text.txt"], "no such text file"),
])
def test_bad_option_values_exit_2_with_one_line(cli, tiny_dir, tmp_path, args, msg):
    code, stdout, err = cli("quantize", tiny_dir, tmp_path / "o", *args)
    assert code == 2
    assert_clean_error(code, stdout, err, contains=msg)
    assert len(err.strip().splitlines()) == 1


def test_cli_has_no_condition_on_a_method_name():
    """cli.py takes every per-method decision from the specs: no comparison (==, in, match), string test
    (startswith, ...) or table key with a registered method's name in it: no `method == "w8a8"`, `"gptq" in method`,
    `method in ("w8a8", "llm-int8")`, `{"w8a8": ...}[method]`. (The `qat` command's name and export-gguf's
    `res["gptq"]` flag are not conditions on a method.)"""
    import ast
    from pathlib import Path

    import lowbit.cli
    from lowbit.algorithms.registry import method_names

    names = set(method_names())
    tree = ast.parse(Path(lowbit.cli.__file__).read_text())

    def named(node):
        return [n for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)
                and (n.value in names or any(m in n.value.split() for m in names))]

    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Compare, ast.match_case)):
            found += named(node)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in (
                "startswith", "endswith", "find", "index", "count", "__contains__"):
            found += [c for a in node.args for c in named(a)]
        elif isinstance(node, ast.Dict):
            found += [c for k in node.keys if k is not None for c in named(k)]
    assert not found, f"conditions on a method name in cli.py: {[(n.lineno, n.value) for n in found]}"
    # and the few literals of method names left are the qat command's name and a result key, as said above
    left = sorted({n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in names})
    assert left == ["gptq", "qat"], left


def test_a_new_method_is_one_spec(cli, tiny_dir, tmp_path, monkeypatch):
    """A method registered from anywhere gets its --method choice, its flags, their checks and its help, with no
    edit of the CLI: here a toy option on top of RTN."""
    from dataclasses import dataclass

    from lowbit.algorithms import registry
    from lowbit.algorithms.rtn import rtn
    from lowbit.core.config import Options, option
    from lowbit.errors import LowbitError

    @dataclass(frozen=True)
    class ToyOptions(Options):
        toy_flag: int = option(3, "How toy it is.")

        def check(self) -> None:
            if self.toy_flag < 0:
                raise LowbitError(f"--toy-flag must be >= 0, got {self.toy_flag}")

    seen = []

    def toy(model, config, ctx):
        seen.append(config.options)
        return rtn(model, config, ctx)

    monkeypatch.setattr(registry, "_SPECS", dict(registry._SPECS))  # unregistered again after the test
    registry.register(registry.MethodSpec(name="toy", run=toy, options=ToyOptions, help="RTN under another name"))

    flat, words = _help_words(cli, "quantize")
    assert "toy (RTN under another name)" in flat and "(toy) How toy it is. [default: 3]" in flat
    assert "--toy-flag" in words

    out = tmp_path / "toy"
    code, _, err = cli("quantize", tiny_dir, out, "--method", "toy", "--toy-flag", "5", "--group-size", "32")
    assert code == 0, err
    assert seen == [ToyOptions(toy_flag=5)]
    conf = json.loads((out / "config.json").read_text())["quantization_config"]
    assert conf["method"] == "toy" and conf["options"] == {"toy_flag": 5} and conf["scheme"]["group_size"] == 32
    code, stdout, err = cli("eval", out, "--limit-tokens", "64", "--seqlen", "32", "--json")
    assert code == 0, err

    code, stdout, err = cli("quantize", tiny_dir, tmp_path / "o2", "--method", "toy", "--toy-flag", "-1")
    assert_clean_error(code, stdout, err, contains="--toy-flag must be >= 0, got -1")
    code, stdout, err = cli("quantize", tiny_dir, tmp_path / "o3", "--method", "rtn", "--toy-flag", "1")
    assert code == 2
    assert_clean_error(code, stdout, err, contains="--toy-flag is not an option of --method rtn (toy takes it)")


def test_quantize_method_qat_trains_on_the_calibration_windows(cli, tiny_dir, tmp_path, text_file):
    """QAT through the generic path: fake-quant training in place (here with distillation and a block-wise phase,
    from a float copy), then packed like every method."""
    out = tmp_path / "qat"
    code, _, err = cli("quantize", tiny_dir, out, "--method", "qat", "--bits", "4", "--group-size", "32",
                       "--calib", text_file, "--nsamples", "4", "--calib-seqlen", "32", "--steps", "2", "--batch", "2",
                       "--seqlen", "16", "--lr", "1e-3", "--distill", "--block-epochs", "1", "--block-samples", "2",
                       "--block-seqlen", "16", "--learn-scales")
    assert code == 0, err
    conf = json.loads((out / "config.json").read_text())["quantization_config"]
    o = conf["options"]
    assert conf["method"] == "qat" and len(conf["layers"]) == 14
    assert o["train"]["steps"] == 2 and o["train"]["distill"] and o["tokens_seen"] == 2 * 2 * 16
    assert o["block"]["epochs"] == 1 and o["learn_scale"] and o["calibration"] is not None
    code, stdout, err = cli("eval", out, "--text", text_file, "--seqlen", "32", "--limit-tokens", "64", "--json")
    assert code == 0, err
