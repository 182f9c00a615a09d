"""Method specs: typed options (unknown keys and bad values refused), schemes, calibration, checkpoints."""
from __future__ import annotations

import copy
import json

import pytest

import lowbit
from lowbit.algorithms.registry import CalibOptions, get_spec, resolve, specs
from lowbit.core.config import Options, QuantConfig
from lowbit.core.scheme import Scheme
from lowbit.core.state import state_of
from lowbit.errors import LowbitError

BUILT_IN = ["rtn", "gptq", "awq", "awq+gptq", "signround", "w8a8", "llm-int8", "qat"]


def test_every_built_in_method_is_registered_in_order():
    assert [s.name for s in specs()] == BUILT_IN


@pytest.mark.parametrize("method", BUILT_IN)
def test_default_options_are_valid_and_round_trip_through_json(method):
    spec = get_spec(method)
    o = spec.options()
    assert isinstance(o, Options) and spec.parse_options(None) == o
    assert spec.parse_options(json.loads(json.dumps(o.to_dict()))) == o
    spec.check_scheme(spec.default_scheme)


@pytest.mark.parametrize("method,options,msg", [
    ("gptq", {"blocksze": 64}, "unknown option 'blocksze' for method gptq (options: act_order, blocksize,"),
    ("rtn", {"nsamples": 4}, "unknown option 'nsamples' for method rtn"),
    ("llm-int8", {"calib": "x.txt"}, "unknown option 'calib' for method llm-int8"),
    ("awq+gptq", {"true_sequential": False}, "unknown option 'true_sequential' for method awq+gptq"),
    ("qat", {"train": {"stepz": 1}}, "unknown option 'stepz'"),
    ("gptq", {"percdamp": -1}, "--percdamp must be >= 0"),
    ("gptq", {"blocksize": 0}, "--blocksize must be >= 1"),
    ("gptq", {"nsamples": 0}, "--nsamples >= 1"),
    ("gptq", {"nsamples": "12"}, "option 'nsamples' of method gptq must be an integer, got '12'"),
    ("gptq", {"act_order": 1}, "must be true or false"),
    ("awq", {"awq_grid": 0}, "--awq-grid must be >= 1"),
    ("w8a8", {"act": "foo"}, "--act must be one of dynamic, static, tensor, got 'foo'"),
    ("w8a8", {"act_bits": 6}, "--act-bits must be 7 or 8"),
    ("w8a8", {"smooth": 2}, "--smooth must be in [0, 1]"),
    ("w8a8", {"act": "static", "rotate": True}, "--rotate needs activation scales computed at run time"),
    ("w8a8", {"act": "static", "act_symmetric": False}, "--act-asym needs dynamic activations"),
    ("llm-int8", {"threshold": 0}, "--threshold must be > 0, got 0.0"),
    ("qat", {"train": {"lr": 0}}, "--lr > 0"),
    ("qat", {"train": {"steps": 0}}, "--steps >= 0 (>= 1 without --block-epochs)"),
    ("qat", {"block": {"epochs": 1, "batch": 0}}, "--block-batch >= 1"),
])
def test_bad_options_are_refused_with_one_line(method, options, msg):
    with pytest.raises(LowbitError) as e:
        get_spec(method).parse_options(options)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_typed_options_validate_on_construction():
    from lowbit.algorithms.gptq import GptqOptions
    from lowbit.algorithms.w8a8 import W8A8Options

    with pytest.raises(LowbitError, match="--percdamp"):
        GptqOptions(percdamp=-0.5)
    with pytest.raises(LowbitError, match="--act must be one of"):
        W8A8Options(act="foo")
    assert GptqOptions(percdamp=1).percdamp == 1.0 and isinstance(GptqOptions(percdamp=1).percdamp, float)


def test_options_of_another_method_are_refused():
    from lowbit.algorithms.gptq import GptqOptions

    with pytest.raises(LowbitError, match="method awq takes AwqOptions, not GptqOptions"):
        get_spec("awq").parse_options(GptqOptions())


def test_shared_option_groups_compose():
    """awq+gptq takes AWQ's options (calibration included) and GPTQ's sweep settings; the int8 methods share
    the activation options with a default of their own."""
    from lowbit.algorithms.awq import AwqOptions
    from lowbit.algorithms.awq_gptq import AwqGptqOptions
    from lowbit.algorithms.gptq import GptqOptions, GptqSweepOptions

    assert issubclass(AwqGptqOptions, AwqOptions) and issubclass(AwqGptqOptions, GptqSweepOptions)
    assert issubclass(GptqOptions, CalibOptions) and issubclass(GptqOptions, GptqSweepOptions)
    assert get_spec("w8a8").options().act_symmetric and not get_spec("llm-int8").options().act_symmetric


@pytest.mark.parametrize("method", ["w8a8", "llm-int8"])
def test_int8_methods_take_8_bit_symmetric_channel_or_tensor_weights(method):
    spec = get_spec(method)
    assert spec.default_scheme == Scheme(8, True, "channel", None)
    spec.check_scheme(Scheme(8, True, "tensor", None))
    for bad in (Scheme(4, True, "channel", None), Scheme(8, False, "channel", None), Scheme(8, True, "group", 32)):
        with pytest.raises(LowbitError, match=f"{method} takes 8-bit symmetric weights per channel or per tensor"):
            spec.check_scheme(bad)


def test_resolve_fills_in_the_methods_default_scheme_and_types_the_options():
    config = QuantConfig(method="w8a8", options={"act": "tensor"})
    spec = resolve(config)
    assert spec.name == "w8a8" and config.scheme == Scheme(8, True, "channel", None)
    assert type(config.options) is spec.options and config.options.act == "tensor"
    assert QuantConfig(method="w8a8", scheme=Scheme(4)).to_dict()["scheme"]["bits"] == 4
    with pytest.raises(LowbitError, match="w8a8 takes 8-bit"):
        resolve(QuantConfig(method="w8a8", scheme=Scheme(4)))
    with pytest.raises(LowbitError, match="unknown method 'magic'"):
        resolve(QuantConfig(method="magic"))


@pytest.mark.parametrize("method,options,calibrates", [
    ("rtn", {}, False), ("gptq", {}, True), ("awq", {}, True), ("awq+gptq", {}, True), ("llm-int8", {}, False),
    ("w8a8", {}, False), ("w8a8", {"act": "static"}, True), ("w8a8", {"smooth": 0.5}, True), ("qat", {}, True),
])
def test_calibration_need(method, options, calibrates):
    spec = get_spec(method)
    assert spec.needs_calibration(spec.parse_options(options)) is calibrates


def test_calibrating_without_tokenizer_is_refused_before_any_work(tiny):
    model, _ = tiny
    with pytest.raises(LowbitError, match="'gptq' needs calibration text"):
        lowbit.quantize(model, QuantConfig(method="gptq", scheme=Scheme(4, True, "group", 32)))
    assert state_of(model).quant is None


def test_unknown_option_key_refused_by_quantize(tiny):
    model, _ = tiny
    with pytest.raises(LowbitError, match="unknown option 'act_order' for method rtn"):
        lowbit.quantize(model, QuantConfig(method="rtn", options={"act_order": False}))


# method: (options of a quick run, the options a checkpoint of today's CLI recorded for the method)
QUICK = {
    "rtn": ({}, {}),
    "gptq": ({"nsamples": 2, "calib_seqlen": 16, "act_order": False},
             {"calib": None, "nsamples": 128, "calib_seqlen": 512, "act_order": True, "percdamp": 0.01,
              "true_sequential": True, "calibration": {"text": "wikitext-2-raw-valid.txt", "windows": 128}}),
    "awq": ({"nsamples": 2, "calib_seqlen": 16, "awq_grid": 2},
            {"calib": "/data/c.txt", "nsamples": 64, "calib_seqlen": 256, "calibration": {"windows": 64}}),
    "awq+gptq": ({"nsamples": 2, "calib_seqlen": 16, "awq_grid": 2, "percdamp": 0.05},
                 {"calib": None, "nsamples": 128, "calib_seqlen": 512, "act_order": True, "percdamp": 0.01}),
    "signround": ({"nsamples": 2, "calib_seqlen": 16, "iters": 2, "batch": 1},
                  {"calib": None, "nsamples": 32, "calib_seqlen": 512, "iters": 50, "lr": 0.005, "batch": 8}),
    "w8a8": ({"act": "static", "smooth": 0.5, "nsamples": 2, "calib_seqlen": 16},
             {"act_bits": 8, "act": "dynamic", "smooth": None, "rotate": False}),
    "llm-int8": ({"threshold": 4.0, "act_bits": 7}, {"act_bits": 8, "threshold": 6.0, "act_symmetric": True}),
    "qat": ({"nsamples": 2, "calib_seqlen": 32, "train": {"steps": 1, "batch": 1, "seqlen": 16}},
            {"init": None, "train_text": "wikitext-2-raw-valid.txt", "learn_scale": False, "learn_zero": False,
             "tokens_seen": 2048, "block": None,
             "train": {"steps": 2, "lr": 0.001, "scale_lr": None, "batch": 2, "seqlen": 32, "warmup": None,
                       "clip": 1.0, "weight_decay": 0.0, "distill": False, "seed": 0, "save_every": 50}}),
}


@pytest.mark.parametrize("method", BUILT_IN)
def test_options_round_trip_through_the_checkpoint(tiny, text_file, tmp_path, method):
    """Quantize, save, load: the checkpoint's options are the typed options' JSON, and the method's spec reads
    them back to the same object; options recorded by today's CLI (calibration info included) still read."""
    assert set(QUICK) == set(BUILT_IN)
    model, tok = tiny
    quick, old = QUICK[method]
    spec = get_spec(method)
    scheme = Scheme(8, True, "channel", None) if method in ("w8a8", "llm-int8") else Scheme(4, True, "group", 32)
    options = dict(quick, calib=str(text_file)) if issubclass(spec.options, CalibOptions) else quick
    config = QuantConfig(method=method, scheme=scheme, options=options)
    q = lowbit.quantize(copy.deepcopy(model), config, tokenizer=tok)
    recorded = state_of(q).quant.config.options
    assert type(recorded) is spec.options
    if spec.needs_calibration(recorded):
        assert recorded.calibration is not None  # what was drawn
    lowbit.save(q, tok, tmp_path / "q")
    on_disk = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["options"]
    assert on_disk == json.loads(json.dumps(recorded.to_dict()))
    loaded, _ = lowbit.load(tmp_path / "q")
    back = state_of(loaded).quant.config
    assert back.options == on_disk  # formats keep the mapping; the spec types it
    assert spec.parse_options(back.options) == recorded
    assert spec.parse_options(old).to_dict().items() >= old.items()
