#!/usr/bin/env bash
# Issue 25's check: the full demo built under ATEN_CPU_CAPABILITY=default, avx2, avx512 with 1 and 2 threads
# (six builds, one at a time, minutes each) must give the same merged/ and quantized/ model.safetensors and the
# same answer. Usage: scripts/check_reproducible.sh [DIR] (default build/reproducible-<date>; must be new).
# The quick version on the tiny model is tests/test_reproducible.py (`lavin-edge bench reproducible`).
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-build/reproducible-$(date +%Y%m%d-%H%M%S)}"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec python -m lavin_edge.cli bench reproducible --demo-dir "$dir"
