#pragma once

#include <string>
#include <vector>

namespace lavin {

// What the CPU offers, as far as the kernels care. Each architecture fills its own fields; the rest stay false.
struct CpuFeatures {
  // x86-64
  bool avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false, avx512vnni = false;
  bool avx512bf16 = false;
  // AArch64: Advanced SIMD (baseline), the int8 dot product (sdot, FEAT_DotProd), the int8 matrix multiply
  // (smmla, FEAT_I8MM), half-precision arithmetic (FEAT_FP16; fp16 <-> fp32 conversion itself is baseline).
  bool neon = false, dotprod = false, i8mm = false, fphp = false;
  // The kernels' requirements, one per translation unit.
  bool can_avx2() const { return avx2 && fma && f16c; }
  bool can_avx512() const { return can_avx2() && avx512f && avx512bw && avx512vl && avx512dq && avx512vnni; }
  bool can_neon() const { return neon; }
  bool can_neon_dotprod() const { return neon && dotprod; }
  bool can_neon_i8mm() const { return neon && dotprod && i8mm; }
};

const CpuFeatures& cpu_features();

// The CPU kernel backends compiled into this build, fastest first ("scalar" last, always there), and those of
// them this CPU can run.
std::vector<std::string> built_backends();
std::vector<std::string> usable_backends();

}  // namespace lavin
