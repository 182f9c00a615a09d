"""core/state.py: what lowbit records about a model is held beside it (one typed state per model object),
never as attributes patched onto the model, and it goes away with the model."""
import gc
import weakref

import lowbit
from lowbit.core.config import QuantConfig
from lowbit.core.scheme import Scheme
from lowbit.core.state import ModelState, QuantRecord, _STATES, state_of


def test_load_and_quantize_record_state_without_patching_the_model(tiny_dir, tmp_path):
    model, tok = lowbit.load(tiny_dir, lazy=True)
    before = set(vars(model))
    st = state_of(model)
    assert isinstance(st, ModelState) and st is state_of(model)
    assert st.source == str(tiny_dir) and st.lazy is not None and st.quant is None
    lowbit.quantize(model, QuantConfig(scheme=Scheme(4, True, "group", 32)), tokenizer=tok)
    assert st.lazy is None and isinstance(st.quant, QuantRecord) and st.quant.config.method == "rtn"
    assert st.quant.modules and all(isinstance(s, Scheme) for s in st.quant.modules.values())
    # the one attribute set on a quantized model: its save_pretrained refuses (core/state.set_quant), so
    # transformers never writes a folder that would load with random weights
    assert set(vars(model)) - before == {"save_pretrained"} and not any(k.startswith("lowbit") for k in vars(model))
    lowbit.save(model, tok, tmp_path / "ckpt")
    loaded, _ = lowbit.load(tmp_path / "ckpt")
    assert state_of(loaded).quant.modules == st.quant.modules
    assert state_of(loaded).source == str(tmp_path / "ckpt")


def test_the_state_goes_with_the_model():
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama()
    state_of(model).source = "somewhere"
    ref = weakref.ref(model)
    gc.collect()  # states of models other tests left to the collector go first
    n = len(_STATES)
    del model
    gc.collect()
    assert ref() is None and len(_STATES) == n - 1
