#!/usr/bin/env bash
# Downloads, on a machine that reaches the package registry, the wheels that the lent GPU
# machines lack into .whl/ (git-ignored; Python 3.12 there): transformers 5.24 (their image has
# 5.17, older than moefuse needs), and mergekit, the parity peer, with its dependencies missing
# from the image. A device run then carries .whl and gpu_check.sh installs
# them with --no-index. Usage: bash scripts/gpu_wheels.sh
set -euo pipefail
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  transformers==5.24.0 mergekit==0.1.5 pydantic==2.13.4 pydantic_core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 \
  immutables==0.21 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
ls .whl
