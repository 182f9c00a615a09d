"""Method registry: QuantConfig.method -> handler(model, config) (torchao's config→handler style).

A handler `fn(model, config, ctx)` replaces the targeted modules of `model` in
place and returns {module name: Scheme} of what it quantized. `ctx` is a
`QuantContext`: the tokenizer and, lazily, the calibration token windows.
Importing this module imports its package, whose __init__ imports (and so registers) the built-in methods.
"""
from __future__ import annotations

from typing import Callable

from ..errors import LowbitError

Handler = Callable[..., dict]
_METHODS: dict[str, Handler] = {}


def register_method(name: str) -> Callable[[Handler], Handler]:
    def deco(fn: Handler) -> Handler:
        _METHODS[name] = fn
        return fn

    return deco


def get_method(name: str) -> Handler:
    if name not in _METHODS:
        raise LowbitError(f"unknown method {name!r} (choose from: {', '.join(sorted(_METHODS))})")
    return _METHODS[name]


def method_names() -> list[str]:
    return sorted(_METHODS)
