#!/usr/bin/env bash
# GPU check for a lent CUDA machine, in parts that each fit one 10-minute call: native Triton
# merge tests, the CUDA checkpoint path and the tensor-level benchmark (merge); the grouped MoE
# kernels, patched models and the MoE layer benchmark (moe); the CUDA assignment solver and its
# n = 14336 timing (lap). Results land in ${OUT:-gpu-results}/ (copy them into benches/results/
# and the README, naming the GPU).
# Usage on the GPU machine, from the repository root: bash scripts/gpu_check.sh [merge|moe|lap|all]
# (through the device tool: run bash scripts/gpu_wheels.sh here first, then carry .whl).
set -uo pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MOEFUSE_ALLOW_MISSING_PEERS=1

setup() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
  # Nothing can be fetched there: the image has torch, triton, pytest, hypothesis, pytest-benchmark
  # and matplotlib; transformers 5.24 and mergekit come as wheels (bash scripts/gpu_wheels.sh
  # here, then carry .whl).
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  python3 -m pip install -q --no-index --no-build-isolation --no-deps -e . 2>&1 | tail -1
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
}

merge() {
  python3 -m pytest -q -x tests/ops/test_merge_triton.py tests/ops/test_merge_backends.py \
    tests/ops/test_merge_random.py tests/merge/test_merge_cuda.py 2>&1 | tee "$OUT/tests.log"
  python3 -m pytest -q -p no:cacheprovider benches/bench_merge.py 2>&1 | tail -5 | tee "$OUT/bench.log"
  cp benches/results/merge_cuda.json benches/results/merge_cuda.png "$OUT/" 2>/dev/null
  python3 benches/plots.py "$OUT/merge_cuda.json" | tee "$OUT/merge_cuda.md"
}

moe() {
  python3 -m pytest -q -x tests/ops/test_grouped_moe.py tests/ops/test_grouped_moe_cuda.py \
    tests/integrations/test_transformers_patch.py 2>&1 | tee "$OUT/tests_moe.log"
  python3 -m pytest -q -p no:cacheprovider benches/bench_moe_layer.py 2>&1 | tail -5 | tee "$OUT/bench_moe.log"
  cp benches/results/moe_layer_cuda.json benches/results/moe_layer_cuda.png "$OUT/" 2>/dev/null
  python3 -m benches.bench_moe_layer "$OUT/moe_layer_cuda.json" | tee "$OUT/moe_layer_cuda.md"
}

lap() {  # rebuilds the extension with the CUDA sources
  MOEFUSE_BUILD_CUDA=1 python3 -m pip install -q --no-index --no-build-isolation --no-deps -e . 2>&1 | tail -1
  python3 -c "import torch, moefuse._C as c; print('CUDA LAP solver built:', hasattr(c, 'linear_assignment_cuda'))" \
    | tee "$OUT/lap_build.log"
  python3 -m pytest -q tests/ops/test_assignment_cuda.py 2>&1 | tail -15 | tee "$OUT/lap_tests.log"
  python3 -m pytest -q -p no:cacheprovider benches/bench_lap.py -k cuda 2>&1 | tail -5 | tee "$OUT/bench_lap.log"
  cp benches/results/lap_cuda.json benches/results/lap_cuda.png "$OUT/" 2>/dev/null
}

part=${1:-all}
case "$part" in
  merge|moe|lap) setup; "$part" ;;
  all) setup; merge; moe; lap ;;
  *) echo "usage: bash scripts/gpu_check.sh [merge|moe|lap|all]" >&2; exit 2 ;;
esac
