#!/usr/bin/env bash
# The edge builds, proven on x86-64 (issue 28; docs/platforms.md says what this does and does not prove):
#   1. cross-build the real extension for AArch64 Linux with Debian's g++-aarch64-linux-gnu and CMake
#      (cmake/aarch64-linux-gnu.cmake), against an arm64 sysroot of Debian's Python 3.11, NumPy and libgomp;
#   2. under qemu-aarch64 as a Cortex-A72 (no dot product), a Cortex-A76 (dot product) and `max` (i8mm): every
#      backend the CPU offers held to the scalar one, the scalar one to x86-64's results
#      (scripts/native_kernel_check.py), exactly the expected backends offered (a kernel the CPU lacks raises
#      SIGILL under qemu's CPU models), and the PyTorch-free one-shot engine's greedy tokens equal to x86-64's on
#      a small quantized model made here (scripts/oneshot_tokens.py), each CPU model on its best backend;
#   3. a clang build without OpenMP (what Apple clang gives) configures, builds and passes the kernel checks.
# Needs a Debian host (the arm64 packages come from its Debian mirrors) and root or sudo for apt-get the first
# time. Downloads are kept in $LAVIN_EDGE_ARM_CACHE (default ~/.cache/lavin-edge-arm); builds go to build/. Run
# from anywhere; the x86-64 side imports the lavin_edge that `python` imports (the installed package in CI, or
# PYTHONPATH).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
start=$(date +%s)
cache=${LAVIN_EDGE_ARM_CACHE:-$HOME/.cache/lavin-edge-arm}
work=$root/build/arm-check
step() { echo "== arm_check: $* ($(( $(date +%s) - start )) s)"; }

# ---- tools ---------------------------------------------------------------------------------------------------
need=()
command -v aarch64-linux-gnu-g++ >/dev/null || need+=(g++-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null || need+=(qemu-user)
command -v clang++ >/dev/null || need+=(clang)
if [ ${#need[@]} -gt 0 ]; then
    step "apt-get install ${need[*]}"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

# pybind11's CMake files for the builds here (pip install . builds in an isolated environment without them).
python -m pybind11 --cmakedir >/dev/null 2>&1 || python -m pip install -q "pybind11>=2.12"

# ---- arm64 sysroot: Debian's own packages, resolved by apt in a private state (the host's dpkg is untouched) ----
pkgs="python3.11 python3-numpy libpython3.11-dev libgomp1 libstdc++6"
sysroot=$cache/sysroot
if [ "$(cat "$sysroot/.packages" 2>/dev/null)" != "$pkgs" ]; then
    step "arm64 sysroot: $pkgs"
    a=$cache/apt
    mkdir -p "$a/lists/partial" "$a/archives/partial" "$a/etc/sources.list.d" "$a/etc/preferences.d"
    cp /etc/apt/sources.list.d/debian.sources "$a/etc/sources.list.d/" 2>/dev/null \
        || cp /etc/apt/sources.list "$a/etc/sources.list.d/debian.list"
    : > "$a/status"
    apt_opts=(-o "Dir::Etc=$a/etc" -o Dir::Etc::SourceList=/dev/null -o "Dir::Etc::SourceParts=$a/etc/sources.list.d"
              -o Dir::Etc::Preferences=/dev/null -o "Dir::Etc::PreferencesParts=$a/etc/preferences.d"
              -o "Dir::State::Lists=$a/lists" -o "Dir::State::Status=$a/status" -o "Dir::Cache=$a"
              -o "Dir::Cache::Archives=$a/archives" -o APT::Architecture=arm64 -o APT::Architectures::=arm64
              -o Debug::NoLocking=1 -o APT::Sandbox::User=root -o Acquire::Languages=none)
    apt-get "${apt_opts[@]}" -qq update
    # shellcheck disable=SC2086
    apt-get "${apt_opts[@]}" -qq -y install -d --no-install-recommends $pkgs >/dev/null
    rm -rf "$sysroot" && mkdir -p "$sysroot"
    for deb in "$a"/archives/*.deb; do dpkg -x "$deb" "$sysroot"; done
    # What the packages' maintainer scripts would do: BLAS/LAPACK alternatives for NumPy.
    ln -sf blas/libblas.so.3 "$sysroot/usr/lib/aarch64-linux-gnu/libblas.so.3"
    ln -sf lapack/liblapack.so.3 "$sysroot/usr/lib/aarch64-linux-gnu/liblapack.so.3"
    echo "$pkgs" > "$sysroot/.packages"
fi
py_arm=(qemu-aarch64 -L "$sysroot" "$sysroot/usr/bin/python3.11")
"${py_arm[@]}" -c "import numpy" || { echo "arm_check: the arm64 Python does not run" >&2; exit 1; }

# ---- cross build ---------------------------------------------------------------------------------------------
step "cross-build lavin_edge._C for aarch64"
mkdir -p "$work"
logged() {  # a build step's output to a log, shown only when it fails
    local log=$1; shift
    "$@" > "$log" 2>&1 || { cat "$log" >&2; echo "arm_check: failed: $*" >&2; exit 1; }
}
LAVIN_EDGE_SYSROOT=$sysroot logged "$work/aarch64-configure.log" cmake -S . -B build/aarch64 -DCMAKE_TOOLCHAIN_FILE=cmake/aarch64-linux-gnu.cmake \
    -DCMAKE_BUILD_TYPE=Release -DLAVIN_EDGE_CUDA=OFF -Dpybind11_DIR="$(python -m pybind11 --cmakedir)" \
    -DPython_INCLUDE_DIR="$sysroot/usr/include/python3.11" -DPython_SOABI=cpython-311-aarch64-linux-gnu \
    -DPYTHON_MODULE_EXTENSION=.cpython-311-aarch64-linux-gnu.so \
    -DCMAKE_CXX_FLAGS="-idirafter $sysroot/usr/include"
logged "$work/aarch64-build.log" cmake --build build/aarch64 -j"$(nproc)"
# The package as an arm64 install would hold it: the sources and the cross-built module.
pkg=$work/pkg
rm -rf "$pkg" && mkdir -p "$pkg"
cp -r lavin_edge "$pkg/" && rm -f "$pkg"/lavin_edge/_C*.so && cp build/aarch64/_C*.so "$pkg/lavin_edge/"
find "$pkg" -name __pycache__ -prune -exec rm -rf {} +

# ---- x86-64 reference results --------------------------------------------------------------------------------
step "x86-64 reference: kernels, a small quantized model and its greedy tokens"
python scripts/native_kernel_check.py --save "$work/x86.npz"
rm -rf "$work/model"
python scripts/oneshot_tokens.py "$work/model" --make --image > "$work/x86_tokens.json"
model=$(python -c "import json, sys; print(json.load(open(sys.argv[1]))['model'])" "$work/x86_tokens.json")

# ---- under qemu-aarch64 ----------------------------------------------------------------------------------------
fail=0
run_arm() {  # cpu, then the command after python
    local cpu=$1; shift
    (cd "$work" && PYTHONPATH=$pkg qemu-aarch64 -cpu "$cpu" -L "$sysroot" "$sysroot/usr/bin/python3.11" "$@") || fail=1
}
for spec in cortex-a72:neon,scalar cortex-a76:neon-dotprod,neon,scalar max:neon-i8mm,neon-dotprod,neon,scalar; do
    cpu=${spec%%:*} expect=${spec#*:}
    step "qemu-aarch64 -cpu $cpu: kernels (expect $expect)"
    run_arm "$cpu" "$root/scripts/native_kernel_check.py" --against "$work/x86.npz" --expect "$expect"
    best=${expect%%,*}
    step "qemu-aarch64 -cpu $cpu: one-shot engine on $best"
    extra=(); [ "$cpu" = max ] && extra=(--image)
    LAVIN_EDGE_KERNELS=$best run_arm "$cpu" "$root/scripts/oneshot_tokens.py" "$model" "${extra[@]}" \
        --expect "$work/x86_tokens.json" >/dev/null
done

# ---- clang without OpenMP (the macOS configure path) ----------------------------------------------------------
step "clang build without OpenMP"
CC=clang CXX=clang++ logged "$work/clang-configure.log" cmake -S . -B build/clang-noomp -DCMAKE_BUILD_TYPE=Release \
    -DLAVIN_EDGE_CUDA=OFF -DCMAKE_DISABLE_FIND_PACKAGE_OpenMP=ON -Dpybind11_DIR="$(python -m pybind11 --cmakedir)" \
    -DPython_EXECUTABLE="$(command -v python)"
grep -q "OpenMP not found" "$work/clang-configure.log" || { echo "arm_check: no OpenMP message" >&2; fail=1; }
logged "$work/clang-build.log" cmake --build build/clang-noomp -j"$(nproc)"
cpkg=$work/clang-pkg
rm -rf "$cpkg" && mkdir -p "$cpkg"
cp -r lavin_edge "$cpkg/" && rm -f "$cpkg"/lavin_edge/_C*.so && cp build/clang-noomp/_C*.so "$cpkg/lavin_edge/"
# (From $work: python -c puts the working directory first, and the checkout's lavin_edge is not this build.)
(cd "$work" && PYTHONPATH=$cpkg python -c "import lavin_edge._C as c, sys; sys.exit(c.cpu_features()['openmp'])") \
    || { echo "arm_check: the clang build claims OpenMP (or does not import)" >&2; fail=1; }
PYTHONPATH=$cpkg python scripts/native_kernel_check.py --against "$work/x86.npz" || fail=1

step "done, status $fail"
exit "$fail"
