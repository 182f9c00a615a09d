"""lowbit: quantize LLMs, measure what it cost, save real formats, run on a CPU."""
__version__ = "0.1.0"

from .core.config import QuantConfig  # noqa: E402
from .core.scheme import Scheme  # noqa: E402
from .errors import LowbitError  # noqa: E402
from .api import evaluate, generate, load, quantize, save  # noqa: E402

__all__ = ["LowbitError", "QuantConfig", "Scheme", "__version__", "evaluate", "generate", "load", "quantize", "save"]
