#!/usr/bin/env bash
# The GPU checks in one go, on a machine with a CUDA GPU and the project installed with `pip install -e ".[test]"`:
# the CUDA acceptance tests (tests/test_cuda.py), then the benchmark on the GPU.
#
#   bash scripts/gpu_check.sh [OUTPUT_DIR]     # writes pytest.log, bench_cuda.md and bench_cuda.log there
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-.}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
timeout 150 python -m pytest -q -n 0 -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$out/pytest.log"
tests=${PIPESTATUS[0]}
timeout 390 python scripts/bench.py --device cuda --max-run-seconds 5 --output "$out/bench_cuda.md" 2> "$out/bench_cuda.log"
bench=$?
tail -5 "$out/bench_cuda.log"
[ -f "$out/bench_cuda.md" ] && cat "$out/bench_cuda.md"
echo "tests exit $tests, bench exit $bench"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
