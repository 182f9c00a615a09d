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
    code, _, err = cli("quantize", tiny_dir, out, *args, "--calib", text_file)
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
    "llm-int8 rotated": (["{tiny}", "--method", "llm-int8", "--rotate"], "w8a8 options"),
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
    assert_clean_error(code, stdout, err, contains="cannot load GGUF")
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
