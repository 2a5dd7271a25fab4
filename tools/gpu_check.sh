#!/usr/bin/env bash
# The one prepared check of a session on a GPU machine (`bash tools/gpu_check.sh [OUTDIR]`): builds
# the package for one CUDA architecture without build isolation (such machines have no network),
# then, each stage time-boxed against one budget for the whole script: the CUDA tests, the JAX
# tests on the GPU (the FFI handlers' CUDA side), the CUDA benchmark (fused ops included), and
# compute-sanitizer memcheck and racecheck over a subset. Into OUTDIR ($OUT by default), eight
# files, as many as come back from a lent machine: summary.txt, the build, tests, bench and
# sanitize logs, the benchmark's txt/json/png. Knobs: BATCHNORM_GPU_ARCH (90),
# BATCHNORM_GPU_BUDGET (seconds, 420), PYTHON (python3).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-gpu-check}}"
mkdir -p "$out"
arch="${BATCHNORM_GPU_ARCH:-90}"
budget="${BATCHNORM_GPU_BUDGET:-420}"
py="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false py arch
summary="$out/summary.txt"
t0=$SECONDS

# stage NAME MAX_SECONDS LOG CMD...: runs CMD into LOG under the smaller of MAX_SECONDS and what
# is left of the budget (skipped under 20 s), and notes its status, time and last lines.
stage() {
  local name=$1 max=$2 log=$3
  shift 3
  local left=$((budget - (SECONDS - t0)))
  if ((left < 20)); then
    echo "== $name: skipped ($left s of the budget left)" | tee -a "$summary"
    return 99
  fi
  ((max > left)) && max=$left
  local start=$SECONDS
  echo "== $name (limit $max s): $*" >>"$log"
  timeout -k 5 "$max" bash -c '"$@"' "$name" "$@" >>"$log" 2>&1  # bash: CMD may be a function below
  local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - start)) s (total $((SECONDS - t0)) s)" | tee -a "$summary"
  tail -n 4 "$log" | cut -c1-400 | sed 's/^/     /' >>"$summary"
  return $rc
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  nproc
  "$py" -c "import sys, torch, numpy, cupy, jax, jaxlib; print(sys.version.split()[0], 'torch', torch.__version__, \
'numpy', numpy.__version__, 'cupy', cupy.__version__, 'jax', jax.__version__, jaxlib.__version__)"
  nvcc --version | tail -n 2 | head -n 1
  g++ --version | head -n 1
} >"$summary" 2>&1

build() {  # build JAX_SETTING
  BATCHNORM_CUDA=ON BATCHNORM_JAX="$1" "$py" -m pip install --no-build-isolation --no-deps -v . -C build-dir=build/gpu \
    -C cmake.define.CMAKE_CUDA_ARCHITECTURES="$arch"
}
export -f build
# The JAX module builds against the machine's own jaxlib; if that fails, the rest goes on without it.
if ! stage build 300 "$out/build.log" build AUTO; then
  grep -m 20 -E "error|Error" "$out/build.log" | cut -c1-300 >>"$summary"
  stage build-without-jax 200 "$out/build.log" build OFF || {
    cat "$summary"
    exit 1
  }
fi
(cd /tmp && "$py" -c "import batchnorm as bn, json; print(json.dumps(bn.info()['cuda']))") >>"$summary" 2>&1

stage cuda-tests 200 "$out/tests.log" "$py" -m pytest -q -p no:cacheprovider -m cuda -n 12 -ra
grep -E "^(FAILED|ERROR)|passed|failed" "$out/tests.log" | head -n 40 | cut -c1-300 >>"$summary"

# The JAX tests' log follows the CUDA tests' (eight files come back from a lent machine).
stage jax-tests 150 "$out/tests.log" "$py" -m pytest -q -p no:cacheprovider -n 4 -ra tests/test_jax.py \
  tests/test_jax_fused.py tests/test_jax_variants.py
sed -n '/== jax-tests/,$p' "$out/tests.log" | grep -E "^(FAILED|ERROR)|passed|failed" | head -n 30 | cut -c1-300 >>"$summary"

stage bench 120 "$out/bench.log" "$py" bench/run.py --device cuda --out "$out"
grep -A 8 "^Targets" "$out/bench.log" | cut -c1-600 >>"$summary"

# Sanitizers: every CUDA error report is a line starting with "=========" followed by the error.
sanitize() {
  compute-sanitizer --tool "$1" --target-processes all --print-limit 20 --error-exitcode 7 \
    "$py" -m pytest -q -p no:cacheprovider -m cuda -n "$2" -x "${@:3}"
}
export -f sanitize
stage memcheck 110 "$out/sanitize.log" sanitize memcheck 6 tests/test_fused.py tests/test_variants.py \
  tests/test_reference.py -k "cupy and float32 and (fused or renorm or ghost or skip or running_var or large_shapes or _out or merge or fold)"
stage racecheck 60 "$out/sanitize.log" sanitize racecheck 4 tests/test_fused.py tests/test_reference.py \
  -k "cupy and float32 and (test_backward_fused or test_statistics)"
grep -E "^=========.*(Invalid|Error|error|hazard|ERROR SUMMARY|RACECHECK SUMMARY)" "$out/sanitize.log" | sort | uniq -c |
  head -n 30 >>"$summary"
echo "total $((SECONDS - t0)) s" >>"$summary"
cat "$summary"
