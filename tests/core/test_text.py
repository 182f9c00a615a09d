"""Text inputs: only regular files of bounded size are read (FIFOs, devices, folders refused before any read),
and tokenization works in bounded pieces whatever the line lengths, with the ids of one call."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from lowbit.errors import LowbitError
from lowbit.core.tokens import SEARCH, _pieces, tokenize
from lowbit.core.text import CALIB_TEXT, TEST_TEXT, read_text

from tests.conftest import TEXT, make_tokenizer

SHARED = Path("/work/shared/data")


def one_line_error(code, err, contains):
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("lowbit: error:") and contains in lines[0], err


def test_fifo_is_refused_without_blocking(cli, tmp_path):
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    result = {}
    t = threading.Thread(target=lambda: result.update(r=cli("eval", tmp_path / "nomodel", "--text", fifo)),
                         daemon=True)
    t.start()
    t.join(20)
    if t.is_alive():  # unblock the hung open before failing
        with open(fifo, "w"):
            pass
        pytest.fail("eval --text FIFO blocked")
    code, _, err = result["r"]
    one_line_error(code, err, "named pipe")


@pytest.mark.parametrize("path,why", [("/dev/zero", "is a device"), ("/dev/null", "is a device")])
def test_devices_are_refused(cli, path, why):
    if not os.path.exists(path):
        pytest.skip(f"no {path}")
    code, _, err = cli("eval", "/no/model", "--text", path)
    one_line_error(code, err, why)
    with pytest.raises(LowbitError, match=why):
        read_text(path)


def test_folder_missing_and_non_utf8(tmp_path):
    with pytest.raises(LowbitError, match="is a folder"):
        read_text(tmp_path)
    with pytest.raises(LowbitError, match="no such text file"):
        read_text(tmp_path / "missing.txt")
    p = tmp_path / "latin1.txt"
    p.write_bytes(b"caf\xe9 au lait\n")
    with pytest.raises(LowbitError, match="not UTF-8 text .invalid byte at offset 3"):
        read_text(p)
    link = tmp_path / "link.txt"
    link.symlink_to("/dev/zero")
    with pytest.raises(LowbitError, match="is a device"):
        read_text(link)


def test_size_limit_is_checked_before_reading(tmp_path, monkeypatch):
    from lowbit.core import inputs

    p = tmp_path / "big.txt"
    p.write_text("word " * 1000)
    monkeypatch.setattr(inputs, "TEXT_LIMIT", 4096)
    with pytest.raises(LowbitError, match="5,000 bytes, more than 4 KiB .the limit."):
        read_text(p)
    monkeypatch.setattr(inputs, "TEXT_LIMIT", 5000)
    assert read_text(p)[0] == "word " * 1000


@pytest.mark.parametrize("path", [TEST_TEXT, CALIB_TEXT])
def test_wikitext_ids_equal_one_call(path):
    """The WikiText files as they are (lines), and as one line (cuts at spaces): the first 100k ids equal
    those of one tokenizer call."""
    tok = make_tokenizer()
    shared = SHARED / path.name
    text = read_text(shared if shared.is_file() else path)[0]
    for t in (text, text.replace("\n", " ")):
        head = t[:260_000]
        whole = tok(head, add_special_tokens=False).input_ids
        assert len(whole) > 100_000
        ids = tokenize(tok, head, chunk=4096)
        assert ids[:100_000].tolist() == whole[:100_000]
        assert ids.tolist() == whole
    assert tokenize(tok, text, max_tokens=1000).tolist() == tokenize(tok, text)[:1000].tolist()


def test_long_lines_are_cut_in_bounded_pieces():
    tok = make_tokenizer()
    line = TEXT.replace("\n", " ") * 20  # ~70k characters, no newline
    spans = list(_pieces(tok, line, 1000))
    assert len(spans) > 30 and max(b - a for a, b in spans) <= SEARCH * 1000
    assert tokenize(tok, line, chunk=1000).tolist() == tok(line, add_special_tokens=False).input_ids
    blob = "x" * 50_000  # no place to cut: forced cuts keep the pieces bounded
    assert max(b - a for a, b in _pieces(tok, blob, 1000)) <= SEARCH * 1000
    assert tokenize(tok, blob, chunk=1000).numel() > 0


def test_sentencepiece_style_prefix_cuts_at_spaces():
    """A tokenizer that marks the start of every call (SentencePiece's dummy prefix): a one-line text is cut
    at spaces, the space left to the tokenizer's own prefix; the ids equal one call's."""
    inner = make_tokenizer()

    class Prefixing:
        def __call__(self, text, add_special_tokens=False, **kw):
            return inner(" " + text, add_special_tokens=add_special_tokens, **kw)

    line = TEXT.replace("\n", " ") * 5
    spans = list(_pieces(Prefixing(), line, 500))
    assert len(spans) > 10
    assert tokenize(Prefixing(), line, chunk=500).tolist() == inner(" " + line, add_special_tokens=False).input_ids


RSS_SCRIPT = r"""
import resource, sys
from tests.conftest import TEXT, make_tokenizer
from lowbit.core.tokens import tokenize
tok = make_tokenizer()
line = (TEXT.replace("\n", " ") * 1000)[:8_000_000]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
n = tokenize(tok, line).numel()
print(n, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_8mb_line_tokenizes_in_bounded_memory():
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root)])}
    r = subprocess.run([sys.executable, "-c", RSS_SCRIPT], capture_output=True, text=True, env=env, cwd=root,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    n, grown_mb = map(int, r.stdout.split())
    assert n > 1_000_000
    assert grown_mb < 200, f"tokenizing an 8 MB line grew the peak RSS by {grown_mb} MB"  # one call: > 1 GB
