"""lowbit: quantize LLMs, measure what it cost, save real formats, run on a CPU."""
from .core.version import __version__
from .core.config import QuantConfig
from .core.scheme import Scheme
from .errors import LowbitError
from .api import evaluate, generate, load, quantize, save

__all__ = ["LowbitError", "QuantConfig", "Scheme", "__version__", "evaluate", "generate", "load", "quantize", "save"]
