#!/usr/bin/env bash
# The GPU half of the Triton kernels' checks, as one run on a lent machine (at most BUDGET seconds):
#   1. the kernel and op tests, compiled on the GPU (the same tests CI runs in Triton's interpreter), and the
#      CUDA-graph replay test that only a GPU can run; then a tiny model compiled and run with --device cuda;
#   2. bench.kernels: W4A16 and W8A8 against cuBLAS FP16 and torch's int4/int8 kernels.
# Everything lands in $OUT (default out/gpu): env.txt, pytest.txt, kernels.txt, kernels.json. The benchmark
# rewrites kernels.json after every shape, so a run cut short still returns what it measured.
#
#   OUT=out/gpu bash bench/gpu_check.sh            # QUICK=1: the --quick benchmark (2 W4A16 shapes, 1 W8A8)
#
# BUDGET (seconds, default 540) bounds the whole run so it fits one device command (600 s at most): the tests
# get at most 200 + 90 s, the benchmark what is left, and what it measured by then is in kernels.json.
#
# It needs the machine's python3 to hold torch (CUDA), triton and pytest; lowbit is imported from this checkout.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TRITON_DEFAULT_FP_FUSION=1 PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
BUDGET=${BUDGET:-540}
SECONDS=0

{
  date -u
  nvidia-smi -L 2>&1 | head -2
  $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.txt"

# -n 8: the tests compile a few hundred kernel variants; xdist spreads the compilation over the CPU cores.
xdist=$($PY -c "import xdist" 2>/dev/null && echo "-n 8")
# The dry-run test is a CPU check (it runs the interpreter, whose behaviour differs between Triton releases).
timeout 200 $PY -m pytest -q -x $xdist -p no:cacheprovider -k "not dry_run" tests/kernels/test_triton_kernels.py tests/test_ops.py \
  2>&1 | tee "$OUT/pytest.txt" | tail -15
tests=${PIPESTATUS[0]}
# End to end on the GPU: a tiny random Llama compiled (W4 g64, W8A8), loaded with --device cuda, against CPU.
timeout 90 $PY -m pytest -q -p no:cacheprovider -k "runtime_device" tests/test_cli.py 2>&1 | tee -a "$OUT/pytest.txt" | tail -5
e2e=${PIPESTATUS[0]}

left=$((BUDGET - SECONDS - 5))
echo "benchmark: ${left}s left of the ${BUDGET}s budget" | tee -a "$OUT/env.txt"
timeout "$((left > 30 ? left : 30))" $PY -m bench.kernels ${QUICK:+--quick} --markdown --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.txt"
bench=${PIPESTATUS[0]}
echo "kernel tests exit $tests, end-to-end test exit $e2e, bench exit $bench" | tee -a "$OUT/env.txt"
[ "$tests" = 0 ] && [ "$e2e" = 0 ] && [ "$bench" = 0 ]
