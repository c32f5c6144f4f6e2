#!/usr/bin/env bash
# Set up and run every test: the main suite in .venv, then the vLLM connector's tests in
# .venv-vllm (vLLM pins an older transformers, so it has its own venv). Exits non-zero if
# either fails. TENSORWIRE_SKIP_VLLM=1 runs the main suite only.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
status=0
.venv/bin/python -m pytest -q || status=$?
if [ "${TENSORWIRE_SKIP_VLLM:-0}" != "1" ]; then
    bash scripts/setup-vllm.sh
    .venv-vllm/bin/python -m pytest -q tests/integrations/vllm || status=$?
fi
exit "$status"
