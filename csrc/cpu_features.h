#pragma once

namespace lavin {

struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false, avx512vnni = false;
  bool avx512bf16 = false;
  // The kernels' requirements, one per translation unit.
  bool can_avx2() const { return avx2 && fma && f16c; }
  bool can_avx512() const { return can_avx2() && avx512f && avx512bw && avx512vl && avx512dq && avx512vnni; }
};

const CpuFeatures& cpu_features();

}  // namespace lavin
