"""Quantization methods, one file each. Each file declares its MethodSpec and registers it (registry.py);
the lines below import them, one per method, in `--method` order: a new method is a new file and one line."""
from . import rtn  # noqa: F401
from . import gptq  # noqa: F401
from . import awq  # noqa: F401
from . import awq_gptq  # noqa: F401
from . import signround  # noqa: F401
from . import w8a8  # noqa: F401
from . import llm_int8  # noqa: F401
from . import qat  # noqa: F401
