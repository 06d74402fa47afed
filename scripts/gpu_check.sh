#!/usr/bin/env bash
# The GPU visit in one script (issue 27): at most ~8 minutes, highest priority first, every step capped by
# `timeout` and recorded as it ends (one JSON line per step in $OUT/steps.jsonl, its output beside it):
#   1. env          nvidia-smi, Python, torch
#   2. build        lavin_edge._C with its CUDA kernels for this GPU's arch (skipped when a prebuilt .so for
#                   this Python already has them)
#   3. pytest_cuda  pytest -m cuda: the GPU kernels equal the CPU lane emulation bit for bit, identity probe
#   4. bench_kernels  bench kernels --device cuda --json (HBM probe, 7B and demo shapes, m = 1..256)
#   5. bench_chat   bench chat --device cuda --json, when this checkout's bench chat has --device
#   6. memcheck     compute-sanitizer memcheck over the small-shape CUDA tests
# Run from the repository root on a machine whose python3 already has a CUDA build of torch: the project's
# CPU torch pin is never installed here. Pure-Python wheels that machine lacks (gguf, easy-vqa, starlette,
# uvicorn) can be laid in an ignored .whl/ beforehand; they are installed into /tmp/site, nothing else is.
# One command runs it (on the device machine: the run tool with timeout_s 540 and carry [".whl"] if any):
#   OUT=$OUT bash scripts/gpu_check.sh
# Environment: OUT (default /tmp/gpu-check), BUDGET_S (default 470: the whole script's time),
# BUILD_DIR (default /tmp/lavin-gpu-build).
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-check}
BUDGET_S=${BUDGET_S:-470}
BUILD_DIR=${BUILD_DIR:-/tmp/lavin-gpu-build}
mkdir -p "$OUT"
: > "$OUT/steps.jsonl"
START=$(date +%s)
PY=python3
export OUT BUILD_DIR PY
# nvcc for CMake's CUDA check where the toolkit is installed but not on PATH.
command -v nvcc >/dev/null || export PATH="$PATH:/usr/local/cuda/bin"

# step NAME CAP LOG CMD...: run CMD (output to $OUT/LOG) under min(CAP, what is left of the budget); append
# {"step", "status", "rc", "seconds", "log"} to steps.jsonl. Skipped when under 15 s are left.
step() {
  local name=$1 cap=$2 log=$3
  shift 3
  local left=$((BUDGET_S - ($(date +%s) - START)))
  local t=$((cap < left ? cap : left))
  if [ "$t" -lt 15 ]; then
    printf '{"step": "%s", "status": "skipped", "note": "out of time (%s s left)"}\n' "$name" "$left" \
      >> "$OUT/steps.jsonl"
    echo "== $name: skipped, out of time"
    return 124
  fi
  echo "== $name (cap ${t}s)"
  local t0 rc status
  t0=$(date +%s)
  # Through bash -c so that CMD may be one of this script's functions (exported below).
  timeout -k 5 "$t" bash -c '"$@"' _ "$@" >> "$OUT/$log" 2>&1
  rc=$?
  status=ok
  [ "$rc" -ne 0 ] && status=failed
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && status=timeout
  [ "$rc" -eq 3 ] && status=skipped  # a step that does not apply here (its log says why)
  printf '{"step": "%s", "status": "%s", "rc": %d, "seconds": %d, "log": "%s"}\n' "$name" "$status" "$rc" \
    "$(($(date +%s) - t0))" "$log" >> "$OUT/steps.jsonl"
  echo "   $status (rc $rc, $(($(date +%s) - t0)) s)"
  return "$rc"
}

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

env_info() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv || echo "no nvidia-smi"
  $PY -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda,
'available', torch.cuda.is_available())"
}
export -f env_info
step env 30 env.log env_info

# The arch of GPU 0 (e.g. 90); without a GPU the default archs (this is the CPU dry run).
ARCH=$($PY -c "import torch; c = torch.cuda.get_device_capability(0); print(f'{c[0]}{c[1]}')" 2>/dev/null \
  || echo "80;90")

have_cuda_ext() {
  $PY -c "import lavin_edge._C as c, sys; sys.exit(0 if c.cuda_compiled else 1)" 2>/dev/null
}

build() {
  if have_cuda_ext; then
    echo "prebuilt lavin_edge._C for this Python has the CUDA kernels: not rebuilt"
    return 0
  fi
  cmake -S . -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES="$ARCH" \
    -Dpybind11_DIR="$($PY -m pybind11 --cmakedir)" -DPython_EXECUTABLE="$(command -v $PY)" \
    && cmake --build "$BUILD_DIR" -j"$(nproc)" \
    && cp "$BUILD_DIR"/_C*.so lavin_edge/ \
    && have_cuda_ext
}
export ARCH
export -f have_cuda_ext build
step build 200 build.log build || { echo "build failed: nothing else can run"; tail -30 "$OUT/build.log"; exit 1; }

cuda_tests=$(grep -l "pytest.mark.cuda" tests/*.py)
# shellcheck disable=SC2086
step pytest_cuda 120 pytest_cuda.log $PY -m pytest -m cuda -q -ra -p no:cacheprovider $cuda_tests
tail -5 "$OUT/pytest_cuda.log"

bench_kernels() {
  $PY -m lavin_edge.cli bench kernels --device cuda --json > "$OUT/bench_kernels.json"
}
export -f bench_kernels
step bench_kernels 150 bench.err bench_kernels
$PY - "$OUT/bench_kernels.json" <<'PY' 2>/dev/null
import json, sys
r = json.load(open(sys.argv[1]))
print(f"HBM probe {r['hbm_read_gbs']:.0f} GB/s on {r['device']}")
for k, v in r["targets"].items():
    print(f"  {k}: {v:.2f}")
PY

bench_chat() {
  if ! $PY -m lavin_edge.cli bench chat --help | grep -q -- "--device"; then
    echo "bench chat has no --device in this checkout: skipped"
    return 3
  fi
  $PY -m lavin_edge.cli bench chat --device cuda --json --no-llamacpp > "$OUT/bench_chat.json"
}
export -f bench_chat
step bench_chat 100 bench.err bench_chat

memcheck() {
  compute-sanitizer --tool memcheck --error-exitcode 9 $PY -m pytest -m cuda -q -x -p no:cacheprovider \
    tests/test_cuda_kernels.py -k "gemv_equals_emulation or dequant_and_large_m or norm_adapter"
}
export -f memcheck
step memcheck 90 memcheck.log memcheck
tail -3 "$OUT/memcheck.log"
echo "gpu_check: $(( $(date +%s) - START )) s; steps:"
cat "$OUT/steps.jsonl"
