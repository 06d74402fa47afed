#!/usr/bin/env bash
# Static checks of the CUDA kernels, no GPU needed (issue 27): every .cu under csrc/cuda compiles for each
# arch in $ARCHS (default sm_80, 86, 87 Jetson Orin, 89, 90); `ptxas -v` reports 0 spill bytes and a 0-byte
# stack frame (no local memory) for every kernel; in the SASS of the W4 kernels every weight load (the
# L1-no-allocate loads of csrc/cuda/w4_lane.h, LDG...NA) is 128 bits wide. cuobjdump comes from PATH, else
# from the PyPI package nvidia-cuda-cuobjdump installed into build/cuda-tools. Results: build/cuda-static/
# (ptxas logs, cubins, static_check.json). Exit 0 all good, 1 a check failed, 2 no nvcc / no cuobjdump.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
ARCHS=${ARCHS:-"80 86 87 89 90"}
NVCC=${NVCC:-nvcc}
out=${STATIC_OUT:-build/cuda-static}
command -v "$NVCC" >/dev/null || { echo "error: nvcc not found (set NVCC)" >&2; exit 2; }
mkdir -p "$out"

cuobjdump=$(command -v cuobjdump || true)
if [ -z "$cuobjdump" ]; then
  cuobjdump=$(ls build/cuda-tools/nvidia/*/bin/cuobjdump 2>/dev/null | head -1)
fi
if [ -z "$cuobjdump" ] || { ! command -v nvdisasm >/dev/null && [ ! -x "$(dirname "$cuobjdump")/nvdisasm" ]; }; then
  # cuobjdump -sass runs nvdisasm: both come from PyPI.
  echo "cuda_static_check: installing nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm into build/cuda-tools" >&2
  python3 -m pip install -q --upgrade --disable-pip-version-check --target build/cuda-tools nvidia-cuda-cuobjdump \
    nvidia-cuda-nvdisasm >&2 \
    || { echo "error: cuobjdump not on PATH and pip could not install nvidia-cuda-cuobjdump" >&2; exit 2; }
  cuobjdump=$(ls build/cuda-tools/nvidia/*/bin/cuobjdump 2>/dev/null | head -1)
  [ -n "$cuobjdump" ] || { echo "error: nvidia-cuda-cuobjdump has no cuobjdump binary" >&2; exit 2; }
fi
if ! command -v nvdisasm >/dev/null && [ -x "$(dirname "$cuobjdump")/nvdisasm" ]; then
  export PATH="$(dirname "$cuobjdump"):$PATH"  # cuobjdump finds nvdisasm on PATH
fi

# Compile every (source, arch) to a cubin with ptxas' report, as many at once as there are cores.
jobs=$(nproc 2>/dev/null || echo 2)
pids=()
for src in csrc/cuda/*.cu; do
  base=$(basename "$src" .cu)
  for arch in $ARCHS; do
    "$NVCC" -std=c++17 -O3 -cubin -arch="sm_$arch" -Xptxas -v -Icsrc -o "$out/$base.sm_$arch.cubin" "$src" \
      > "$out/$base.sm_$arch.ptxas" 2>&1 &
    pids+=($!)
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do sleep 0.2; done
  done
done
fail=0
for p in "${pids[@]}"; do wait "$p" || fail=1; done
if [ "$fail" -ne 0 ]; then
  echo "FAIL: a compile failed:" >&2
  grep -l "error" "$out"/*.ptxas | while read -r f; do echo "== $f" >&2; grep -m5 error "$f" >&2; done
  exit 1
fi
for arch in $ARCHS; do  # the W4 kernels' SASS (gemv.cu) is what the load-width check reads
  "$cuobjdump" -sass "$out/gemv.sm_$arch.cubin" > "$out/gemv.sm_$arch.sass" || { echo "FAIL: cuobjdump" >&2; exit 1; }
done

python3 - "$out" $ARCHS <<'PY'
import json, pathlib, re, sys
out, archs = pathlib.Path(sys.argv[1]), sys.argv[2:]
rows, problems = [], []
for log in sorted(out.glob("*.ptxas")):
    src, arch = log.stem.split(".")
    name = None
    for line in log.read_text().splitlines():
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            name = m.group(1)
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and name:
            stack, st, ld = map(int, m.groups())
            rows.append({"arch": arch, "source": src, "kernel": name, "stack": stack, "spill_stores": st,
                         "spill_loads": ld})
            if stack or st or ld:
                problems.append(f"{arch} {name}: stack {stack} B, spills {st}/{ld} B")
        m = re.search(r"Used (\d+) registers", line)
        if m and rows and rows[-1]["kernel"] == name:
            rows[-1]["registers"] = int(m.group(1))
        if re.search(r"[1-9]\d* bytes lmem", line):
            problems.append(f"{arch} {name}: local memory ({line.strip()})")
sass = []
for f in sorted(out.glob("gemv.*.sass")):
    arch = f.stem.split(".")[1]
    for block in re.split(r"\n\s*Function : ", f.read_text())[1:]:
        name = block.split()[0]
        if "w4_gemv" not in name and "w4_dequant" not in name:
            continue
        loads = re.findall(r"\bLDG\.[A-Z0-9.]*NA[A-Z0-9.]*", block)
        wide = [x for x in loads if ".128" in x]
        sass.append({"arch": arch, "kernel": name, "weight_loads": len(loads), "weight_loads_128": len(wide)})
        if not loads or len(wide) != len(loads):
            problems.append(f"{arch} {name}: weight loads {loads or 'none found'} are not all 128-bit")
kernels = {r["kernel"] for r in rows}
for arch in archs:
    if not any(r["arch"] == f"sm_{arch}" for r in rows):
        problems.append(f"sm_{arch}: no ptxas report")
summary = {"archs": archs, "kernels": len(kernels), "ptxas": rows, "sass_weight_loads": sass, "problems": problems}
(out / "static_check.json").write_text(json.dumps(summary, indent=1))
worst = max((r.get("registers", 0) for r in rows), default=0)
print(f"cuda_static_check: {len(kernels)} kernels x {len(archs)} archs, max {worst} registers, "
      f"{sum(s['weight_loads'] for s in sass)} weight loads in the W4 SASS, all 128-bit: {not any('128' in p for p in problems)}")
for p in problems:
    print("FAIL:", p)
sys.exit(1 if problems else 0)
PY
