// The attention kernel (AttendFn, kernels.h), written once on GCC vector types and built three times: by decode.cpp
// for the scalar backend and any CPU (ISA clones; fp16 keys and values converted with integer vector ops), by
// attention_avx2.cpp and attention_avx512.cpp for those backends (converted with F16C). The including file
// defines LAVIN_ATTEND_SUFFIX (the function's suffix), LAVIN_ATTEND_ATTRS (its attributes) and
// LAVIN_LOAD16H_INTEGER (1: no F16C).
//
// Unlike the W4 units these builds let the compiler contract a * b + c into FMAs (decode.cpp's flags): the
// attention has no bitwise reference to follow, only the tolerance of the tests against PyTorch's SDPA, and each
// build is used alone by the stack that chose it.
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#elif defined(__ARM_NEON)
#include <arm_neon.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "exp_vec.h"
#include "kernels.h"

#ifndef LAVIN_ATTEND_SUFFIX
#error "define LAVIN_ATTEND_SUFFIX before including attention_impl.h"
#endif
#define LAVIN_ATTEND_CAT_(a, b) a##_##b
#define LAVIN_ATTEND_CAT(a, b) LAVIN_ATTEND_CAT_(a, b)

namespace lavin {
namespace {

// Sixteen floats as one value: GCC lowers it to one zmm, two ymm or four xmm for the unit's (or the clone's)
// instruction set, so the attention is written once for every ISA. The helpers are always inlined, so no vector
// crosses a call (which is what -Wpsabi warns about).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float f32x16 __attribute__((vector_size(64)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));

__attribute__((always_inline)) static inline f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

__attribute__((always_inline)) static inline void store16(float* p, f32x16 v) { std::memcpy(p, &v, sizeof v); }

#if LAVIN_LOAD16H_INTEGER
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));

// Sixteen cached fp16 values as floats, exactly, in integer vector ops every clone has (F16C's vcvtph2ps is not
// in the default clone): the magnitude bits shifted into a float and scaled by 2^112 rebias the exponent and
// renormalise subnormals in one multiply; inf and nan (exponent 31) get the all-ones float exponent back.
__attribute__((always_inline)) static inline f32x16 load16h(const uint16_t* p) {
  u16x16 h;
  std::memcpy(&h, p, sizeof h);
  const u32x16 w = __builtin_convertvector(h, u32x16);
  const u32x16 mag = (w & 0x7FFFu) << 13;
  f32x16 f;
  std::memcpy(&f, &mag, sizeof f);
  f *= 0x1p112f;
  u32x16 bits;
  std::memcpy(&bits, &f, sizeof bits);
  const i32x16 special = (w & 0x7C00u) == 0x7C00u;  // -1 where inf or nan
  bits |= (u32x16)special & 0x7F800000u;
  bits |= (w & 0x8000u) << 16;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
#elif defined(__ARM_NEON)
// Sixteen cached fp16 values as floats: four fcvtl (vcvt_f32_f16, exact; fp16 conversion is AArch64 baseline).
__attribute__((always_inline)) static inline f32x16 load16h(const uint16_t* p) {
  f32x16 f;
  for (int i = 0; i < 4; ++i) {
    const float32x4_t v = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p + 4 * i)));
    std::memcpy(reinterpret_cast<char*>(&f) + 16 * i, &v, sizeof v);
  }
  return f;
}
#elif defined(__AVX512F__)
// Sixteen cached fp16 values as floats: one vcvtph2ps (F16C, exact).
__attribute__((always_inline)) static inline f32x16 load16h(const uint16_t* p) {
  return (f32x16)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
#else
// Sixteen cached fp16 values as floats: two vcvtph2ps (F16C, exact).
__attribute__((always_inline)) static inline f32x16 load16h(const uint16_t* p) {
  const __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
  f32x16 f;
  std::memcpy(&f, &lo, sizeof lo);
  std::memcpy(reinterpret_cast<char*>(&f) + sizeof lo, &hi, sizeof hi);
  return f;
}
#endif

// Sum of the 16 lanes as a fixed halving tree: four dependent adds where an in-order sum is sixteen.
__attribute__((always_inline)) static inline float sum16(f32x16 v) {
  const f32x8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                  __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const f32x4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// The scores of the `group` query heads against the `end` cached keys for hd = 16 NC: each (key, head) dot
// product is NC multiply-adds on two alternating accumulators and one tree sum, so successive scores are
// independent work (the in-order sum of an `omp simd` reduction made each one a 16-add chain).
template <int NC>
__attribute__((always_inline)) static inline void scores16(const float* q, const uint16_t* K, int64_t end,
                                                           int64_t group, float scale, int64_t ld, float* sc) {
  constexpr int64_t hd = 16 * NC;
  for (int64_t j = 0; j < end; ++j) {
    f32x16 kj[NC];  // the key converted once for the whole group
#pragma GCC unroll 16
    for (int c = 0; c < NC; ++c) kj[c] = load16h(K + j * hd + 16 * c);
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = q + g * hd;
      f32x16 a[2] = {load16(qg) * kj[0], f32x16{}};
#pragma GCC unroll 16
      for (int c = 1; c < NC; ++c) a[c & 1] += load16(qg + 16 * c) * kj[c];
      sc[g * ld + j] = sum16(a[0] + a[1]) * scale;
    }
  }
}

// out[g] = sum_j p[g][j] V[j] for hd = 16 NC with the output in registers: GB heads at a time (GB NC <= 8
// accumulators of 16 floats), each sum taken over j in order, as the plain loops below sum it.
template <int NC>
__attribute__((always_inline)) static inline void weighted_values16(const uint16_t* V, int64_t end, int64_t group,
                                                                    int64_t ld, const float* sc, float* out) {
  constexpr int64_t hd = 16 * NC;
  constexpr int GB = NC >= 8 ? 1 : 8 / NC;
  int64_t g0 = 0;
  for (; g0 + GB <= group; g0 += GB) {
    f32x16 acc[GB][NC] = {};
    for (int64_t j = 0; j < end; ++j) {
      f32x16 vj[NC];
#pragma GCC unroll 16
      for (int c = 0; c < NC; ++c) vj[c] = load16h(V + j * hd + 16 * c);
#pragma GCC unroll 8
      for (int g = 0; g < GB; ++g) {
        const float p = sc[(g0 + g) * ld + j];
#pragma GCC unroll 16
        for (int c = 0; c < NC; ++c) acc[g][c] += p * vj[c];
      }
    }
    for (int g = 0; g < GB; ++g)
      for (int c = 0; c < NC; ++c) store16(out + (g0 + g) * hd + 16 * c, acc[g][c]);
  }
  for (; g0 < group; ++g0) {  // the heads left over: one at a time
    f32x16 acc[NC] = {};
    for (int64_t j = 0; j < end; ++j) {
      const float p = sc[g0 * ld + j];
#pragma GCC unroll 16
      for (int c = 0; c < NC; ++c) acc[c] += p * load16h(V + j * hd + 16 * c);
    }
    for (int c = 0; c < NC; ++c) store16(out + g0 * hd + 16 * c, acc[c]);
  }
}

}  // namespace

// One kv head and the `group` query heads that share it (GQA): scores over the `end` cached positions,
// softmax, weighted sum of V. Each cached k/v row is read (and converted from fp16) once for the whole group.
LAVIN_ATTEND_ATTRS
void LAVIN_ATTEND_CAT(attend_group, LAVIN_ATTEND_SUFFIX)(const float* q, const uint16_t* K, const uint16_t* V,
                                                         int64_t end, int64_t hd, int64_t group, float scale,
                                                         int64_t ld, float* sc, float* out) {
  // Head sizes that are a multiple of 16 up to 128 (SmolLM2's 64, LLaMA's 128) run on the register-blocked
  // paths; any other size on plain loops.
  const int nc = hd % 16 == 0 && hd <= 128 ? static_cast<int>(hd / 16) : 0;
  switch (nc) {
    case 1: scores16<1>(q, K, end, group, scale, ld, sc); break;
    case 2: scores16<2>(q, K, end, group, scale, ld, sc); break;
    case 3: scores16<3>(q, K, end, group, scale, ld, sc); break;
    case 4: scores16<4>(q, K, end, group, scale, ld, sc); break;
    case 5: scores16<5>(q, K, end, group, scale, ld, sc); break;
    case 6: scores16<6>(q, K, end, group, scale, ld, sc); break;
    case 7: scores16<7>(q, K, end, group, scale, ld, sc); break;
    case 8: scores16<8>(q, K, end, group, scale, ld, sc); break;
    default:
      for (int64_t j = 0; j < end; ++j) {
        const uint16_t* kj = K + j * hd;
        for (int64_t g = 0; g < group; ++g) {
          const float* qg = q + g * hd;
          float dot = 0.0f;
          for (int64_t i = 0; i < hd; ++i) dot += qg[i] * half_to_float(kj[i]);
          sc[g * ld + j] = dot * scale;
        }
      }
  }
  for (int64_t g = 0; g < group; ++g) {
    float* s = sc + g * ld;
    float mx = -3.0e38f;
#pragma omp simd reduction(max : mx)
    for (int64_t j = 0; j < end; ++j) mx = std::max(mx, s[j]);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < end; ++j) {
      s[j] = exp_vec(s[j] - mx);
      sum += s[j];
    }
    const float inv = 1.0f / sum;
#pragma omp simd
    for (int64_t j = 0; j < end; ++j) s[j] *= inv;
  }
  switch (nc) {
    case 1: weighted_values16<1>(V, end, group, ld, sc, out); return;
    case 2: weighted_values16<2>(V, end, group, ld, sc, out); return;
    case 3: weighted_values16<3>(V, end, group, ld, sc, out); return;
    case 4: weighted_values16<4>(V, end, group, ld, sc, out); return;
    case 5: weighted_values16<5>(V, end, group, ld, sc, out); return;
    case 6: weighted_values16<6>(V, end, group, ld, sc, out); return;
    case 7: weighted_values16<7>(V, end, group, ld, sc, out); return;
    case 8: weighted_values16<8>(V, end, group, ld, sc, out); return;
    default: break;
  }
  for (int64_t i = 0; i < group * hd; ++i) out[i] = 0.0f;
  for (int64_t j = 0; j < end; ++j) {
    const uint16_t* vj = V + j * hd;
    for (int64_t g = 0; g < group; ++g) {
      const float p = sc[g * ld + j];
      float* og = out + g * hd;
      for (int64_t i = 0; i < hd; ++i) og[i] += p * half_to_float(vj[i]);
    }
  }
}
#pragma GCC diagnostic pop

#undef LAVIN_ATTEND_CAT
#undef LAVIN_ATTEND_CAT_

}  // namespace lavin
