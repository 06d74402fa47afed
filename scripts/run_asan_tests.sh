#!/usr/bin/env bash
# Run the kernel tests and the one-call decode step's tests against an AddressSanitizer build of lavin_edge._C.
# Python itself is not instrumented, so libasan (and libstdc++, for ASan's __cxa_throw
# interceptor) are preloaded; leak detection is off (CPython's own allocations).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="$root/build/asan"
stage="$(mktemp -d)"
cmake -S "$root" -B "$build" -G Ninja -DLAVIN_EDGE_CUDA=OFF -DLAVIN_EDGE_ASAN=ON \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo -Dpybind11_DIR="$(python -c 'import pybind11; print(pybind11.get_cmake_dir())')" \
  -DPython_EXECUTABLE="$(command -v python)" >/dev/null
cmake --build "$build" -j "${CMAKE_BUILD_PARALLEL_LEVEL:-2}"
cp -r "$root/lavin_edge" "$root/examples" "$stage/" && rm -f "$stage"/lavin_edge/_C*.so && cp "$build"/_C*.so "$stage/lavin_edge/"
mkdir -p "$stage/tests" && cp "$root"/tests/conftest.py "$root"/tests/test_engine.py "$root"/tests/test_kernels*.py \
  "$root"/tests/test_fused_decode.py "$root"/tests/test_serve_batch.py "$root"/tests/test_numpy_engine.py "$stage/tests/"
cd "$stage"
# test_engine.py is there for its helpers (test_fused_decode imports them); its own tests are not run.
# test_numpy_engine.py hands the kernels NumPy arrays (some over a read-only memory map) instead of tensors.
ASAN_OPTIONS=detect_leaks=0 LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)" \
  PYTHONPATH="$stage" python -m pytest -q -p no:cacheprovider tests/test_kernels*.py tests/test_fused_decode.py \
  tests/test_serve_batch.py tests/test_numpy_engine.py
