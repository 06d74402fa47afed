#!/usr/bin/env bash
# The GPU visit in one script (issue 12): build lavin_edge._C in place with its CUDA kernels, run the CUDA
# tests, the same under compute-sanitizer, then the whole suite, on a machine whose Python already has a CUDA
# build of torch (do not install the project's CPU pin there). Run from the repository root; pure-Python
# wheels that machine lacks (gguf, easy-vqa, ...) can be laid in an ignored .whl/ beforehand. Logs go to $OUT.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/cuda-check}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
t0=$(date +%s)
cmake -S . -B /tmp/lavin-build -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 \
  -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" -DPython_EXECUTABLE="$(command -v python3)" \
  > "$OUT/build.log" 2>&1 && cmake --build /tmp/lavin-build -j"$(nproc)" >> "$OUT/build.log" 2>&1 \
  || { echo "build failed"; tail -30 "$OUT/build.log"; exit 1; }
echo "build took $(( $(date +%s) - t0 )) s"
cp /tmp/lavin-build/_C*.so lavin_edge/ && export PYTHONPATH="$PWD:${PYTHONPATH:-}"
python3 -c "import lavin_edge.kernels as K; f = K.cpu_features(); print('cuda_compiled', f['cuda_compiled'], 'devices', f['cuda_devices'])"
timeout 300 python3 -m pytest -m cuda -q -ra -p no:cacheprovider 2>&1 | tee "$OUT/pytest_cuda.log" | tail -20
timeout 300 compute-sanitizer --tool memcheck --error-exitcode 9 \
  python3 -m pytest -m cuda -q -x -p no:cacheprovider > "$OUT/memcheck.log" 2>&1
echo "memcheck rc=$? (0 = clean)"; tail -5 "$OUT/memcheck.log"
# The whole suite must pass where a GPU is present too (training picks the GPU there).
timeout "${SUITE_TIMEOUT:-240}" python3 -m pytest -q -x -p no:cacheprovider -m "not slow" 2>&1 | tail -15 > "$OUT/pytest_all.log"
tail -3 "$OUT/pytest_all.log"
