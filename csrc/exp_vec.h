// exp for the softmax and SiLU, shared by the decode step (decode.cpp) and the attention builds
// (attention_impl.h).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace lavin {

// exp for the softmax and SiLU, written so `omp simd` loops vectorise it (libm's expf is a scalar call;
// ~100k calls per SmolLM2 token). Range reduction x = k ln2 + r with
// |r| <= ln2/2, then a degree-6 Taylor polynomial: relative error < 2.5e-7 (~2 ulp) over the clamped
// range (checked against exp in double over [-87, 88]), below the rounding of the fp32 sums it feeds.
#pragma omp declare simd
static inline float exp_vec(float x) {
  x = std::min(88.0f, std::max(-87.0f, x));
  const float kf = (x * 1.44269504f + 12582912.0f) - 12582912.0f;  // round to nearest without a libm call
  const float r = (x - kf * 0.693359375f) + kf * 2.12194440e-4f;    // ln2 split in two for exactness
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(kf) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

}  // namespace lavin
