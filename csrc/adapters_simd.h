// Vectorised adapter kernels, compiled once per ISA translation unit (w4_avx2.cpp, w4_avx512.cpp and
// w4_neon.cpp include this file with LAVIN_ADAPTER_SUFFIX set). The long loops over D are
// `omp simd` loops that the compiler vectorises for that unit's flags; the one shape it
// cannot vectorise well (rank-8 rows of the folded up-projection, U[j, 0:8] . z) is written
// with explicit AVX intrinsics on x86 and as 8-wide dot products elsewhere.
//
// Threads: one row (token) per iteration; a single decode row runs on one thread (D * r
// flops, a few microseconds: a thread team would cost more than it saves).
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>

#include "kernels.h"

#ifndef LAVIN_ADAPTER_SUFFIX
#error "define LAVIN_ADAPTER_SUFFIX before including adapters_simd.h"
#endif
#define LAVIN_CAT_(a, b) a##_##b
#define LAVIN_CAT(a, b) LAVIN_CAT_(a, b)

namespace lavin {
namespace {

inline float dot_simd(const float* a, const float* b, int64_t n) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < n; ++j) acc += a[j] * b[j];
  return acc;
}

#if defined(__AVX2__)
// y[j] += U[j, 0:8] . z + u[j] for j in [0, D): eight rows at a time, the eight 8-wide
// products reduced together by a hadd tree (7 shuffles per 8 outputs, no scalar sums).
inline void add_rank8_rows(const float* U, const float* z, const float* u, float* y, int64_t D) {
  const __m256 zv = _mm256_loadu_ps(z);
  int64_t j = 0;
  for (; j + 8 <= D; j += 8) {
    __m256 p[8];
    for (int q = 0; q < 8; ++q) p[q] = _mm256_mul_ps(_mm256_loadu_ps(U + (j + q) * 8), zv);
    const __m256 t0 = _mm256_hadd_ps(p[0], p[1]);
    const __m256 t1 = _mm256_hadd_ps(p[2], p[3]);
    const __m256 t2 = _mm256_hadd_ps(p[4], p[5]);
    const __m256 t3 = _mm256_hadd_ps(p[6], p[7]);
    const __m256 u0 = _mm256_hadd_ps(t0, t1);  // [p0..p3 lanes 0-3 | p0..p3 lanes 4-7]
    const __m256 u1 = _mm256_hadd_ps(t2, t3);
    const __m256 sums = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
    const __m256 yv = _mm256_add_ps(_mm256_loadu_ps(y + j), _mm256_add_ps(sums, _mm256_loadu_ps(u + j)));
    _mm256_storeu_ps(y + j, yv);
  }
  for (; j < D; ++j) y[j] += dot_simd(U + j * 8, z, 8) + u[j];
}
#else
inline void add_rank8_rows(const float* U, const float* z, const float* u, float* y, int64_t D) {
  for (int64_t j = 0; j < D; ++j) y[j] += dot_simd(U + j * 8, z, 8) + u[j];
}
#endif

}  // namespace

void LAVIN_CAT(llm_adapter, LAVIN_ADAPTER_SUFFIX)(const LlmAdapterArgs& p, int threads) {
  const int64_t D = p.dim, r = p.rank;
#pragma omp parallel for schedule(static) num_threads(threads) if (p.rows > 1)
  for (int64_t row = 0; row < p.rows; ++row) {
    const float* x = p.x + row * D;
    float* y = p.y + row * D;
    // RMSNorm in fp32; n is written to y and the adapter is added on top of it.
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t j = 0; j < D; ++j) ss += x[j] * x[j];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(D) + p.eps);
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) y[j] = x[j] * inv * p.g[j];
    // z = A n + a (rank r, at most kMaxAdapterRank: checked by the binding).
    float z[kMaxAdapterRank];
    for (int64_t i = 0; i < r; ++i) z[i] = dot_simd(p.A + i * D, y, D) + p.a[i];
    const int32_t mod = p.row_modality[row];
    const float* Um = p.U + mod * D * r;
    const float* um = p.u + mod * D;
    if (r == 8) {
      add_rank8_rows(Um, z, um, y, D);
    } else {
      for (int64_t j = 0; j < D; ++j) y[j] += dot_simd(Um + j * r, z, r) + um[j];
    }
  }
}

void LAVIN_CAT(vit_adapter, LAVIN_ADAPTER_SUFFIX)(const VitAdapterArgs& p, int threads) {
  const int64_t D = p.dim, r = p.rank, h = r / 2, half = D / 2;
#pragma omp parallel for schedule(static) num_threads(threads) if (p.rows > 1)
  for (int64_t row = 0; row < p.rows; ++row) {
    const float* x = p.x + row * D;
    float* y = p.y + row * D;
    float z[kMaxAdapterRank];
    for (int64_t i = 0; i < r; ++i) z[i] = dot_simd(p.A + i * D, x, D) + p.a[i];
    // Per-token routing: softmax over the two experts of (R x + rb) / t.
    const float l0 = (dot_simd(p.R, x, D) + p.rb[0]) / p.temperature;
    const float l1 = (dot_simd(p.R + D, x, D) + p.rb[1]) / p.temperature;
    const float mx = std::max(l0, l1);
    const float e0 = std::exp(l0 - mx), e1 = std::exp(l1 - mx);
    const float w0 = p.scale * e0 / (e0 + e1), w1 = p.scale * e1 / (e0 + e1);
    // Grouped experts: output half k reads hidden channels h*k .. h*k+h-1.
    for (int64_t k = 0; k < 2; ++k) {
      const float* zh = z + k * h;
      const int64_t j0 = k * half, j1 = (k + 1) * half;
      if (h == 4) {
        const float z0 = zh[0], z1 = zh[1], z2 = zh[2], z3 = zh[3];
#pragma omp simd
        for (int64_t j = j0; j < j1; ++j) {
          const float* Bj = p.B + j * 4;
          const float* Dj = p.Dw + j * 4;
          const float eb = Bj[0] * z0 + Bj[1] * z1 + Bj[2] * z2 + Bj[3] * z3 + p.b[j];
          const float ed = Dj[0] * z0 + Dj[1] * z1 + Dj[2] * z2 + Dj[3] * z3 + p.d[j];
          y[j] = x[j] + (w0 * eb + w1 * ed);
        }
      } else {
        for (int64_t j = j0; j < j1; ++j) {
          const float eb = dot_simd(p.B + j * h, zh, h) + p.b[j];
          const float ed = dot_simd(p.Dw + j * h, zh, h) + p.d[j];
          y[j] = x[j] + (w0 * eb + w1 * ed);
        }
      }
    }
  }
}

}  // namespace lavin

#undef LAVIN_CAT
#undef LAVIN_CAT_
