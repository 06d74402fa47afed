// AVX-512 (VNNI) W4 kernel and the AVX-512 build of the adapter kernels.
// Compiled with -mavx512f -mavx512bw -mavx512vl -mavx512vnni; only called after
// cpu_features() confirmed those at run time.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "kernels.h"

namespace lavin {
namespace {

inline int32_t load4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// RB activation rows against one 16-column tile. The tile's weights are unpacked once per
// 64-byte record and reused for every row (and, with kWide, for both planes of the int16
// activations: kernels.h); for m > RB the caller walks row blocks over the same tile, which is
// then read from L1/L2, not from memory.
template <int RB, bool kWide>
inline void tile_rows(const W4Prepared& w, const XQuant& xq, int64_t t, int64_t r0, float* y, int64_t ldy) {
  const int64_t chunks = w.kp / 8;
  const int64_t nblocks = w.kp / kBlock;
  const int64_t row_bytes = act_row_bytes(w.kp);
  const uint8_t* tile = w.qw + t * chunks * 64;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const int8_t* xr[RB];  // high plane (the whole value for int8)
  const int8_t* xl[RB];  // low plane (int16 only)
  const float* dr[RB];
  const float* gr[RB];
  for (int rr = 0; rr < RB; ++rr) {
    xr[rr] = xq.q + (r0 + rr) * row_bytes;
    xl[rr] = xr[rr] + w.kp;
    dr[rr] = xq.d + (r0 + rr) * nblocks;
    gr[rr] = xq.gsum + (r0 + rr) * w.groups;
  }
  __m512 out[RB];
  for (int rr = 0; rr < RB; ++rr) out[rr] = _mm512_setzero_ps();

  for (int64_t g = 0; g < w.groups; ++g) {
    __m512 accg[RB];
    for (int rr = 0; rr < RB; ++rr) accg[rr] = _mm512_setzero_ps();
    for (int64_t bi = 0; bi < w.blocks_per_group; ++bi) {
      const int64_t b = g * w.blocks_per_group + bi;
      const uint8_t* rec = tile + b * (kBlock / 8) * 64;
      // Two independent integer chains per row and plane (low and high nibbles) halve the
      // vpdpbusd latency chain.
      __m512i ilo[RB], ihi[RB], jlo[RB], jhi[RB];
      for (int rr = 0; rr < RB; ++rr) ilo[rr] = ihi[rr] = jlo[rr] = jhi[rr] = _mm512_setzero_si512();
#pragma GCC unroll 4
      for (int c = 0; c < kBlock / 8; ++c) {
        const __m512i v = _mm512_loadu_si512(rec + c * 64);
        const __m512i lo = _mm512_and_si512(v, low4);                        // rows 8c..8c+3
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);  // rows 8c+4..8c+7
        for (int rr = 0; rr < RB; ++rr) {
          const int8_t* xc = xr[rr] + b * kBlock + c * 8;
          ilo[rr] = _mm512_dpbusd_epi32(ilo[rr], lo, _mm512_set1_epi32(load4(xc)));
          ihi[rr] = _mm512_dpbusd_epi32(ihi[rr], hi, _mm512_set1_epi32(load4(xc + 4)));
          if (kWide) {
            const int8_t* xd = xl[rr] + b * kBlock + c * 8;
            jlo[rr] = _mm512_dpbusd_epi32(jlo[rr], lo, _mm512_set1_epi32(load4(xd)));
            jhi[rr] = _mm512_dpbusd_epi32(jhi[rr], hi, _mm512_set1_epi32(load4(xd + 4)));
          }
        }
      }
      for (int rr = 0; rr < RB; ++rr) {
        __m512i s = _mm512_add_epi32(ilo[rr], ihi[rr]);
        if (kWide) s = _mm512_add_epi32(_mm512_slli_epi32(s, 8), _mm512_add_epi32(jlo[rr], jhi[rr]));
        accg[rr] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(dr[rr][b]), accg[rr]);
      }
    }
    // Fold the group's zero point and scale: s * (sum q x - z * sum x).
    const __m512 s = _mm512_cvtph_ps(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.scales + (t * w.groups + g) * kTile)));
    const __m512 z = _mm512_cvtepi32_ps(
        _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.zeros + (t * w.groups + g) * kTile))));
    for (int rr = 0; rr < RB; ++rr) {
      const __m512 corr = _mm512_fnmadd_ps(z, _mm512_set1_ps(gr[rr][g]), accg[rr]);
      out[rr] = _mm512_fmadd_ps(s, corr, out[rr]);
    }
  }
  const int64_t n0 = t * kTile;
  const int64_t valid = std::min<int64_t>(kTile, w.n - n0);
  const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1u);
  for (int rr = 0; rr < RB; ++rr) _mm512_mask_storeu_ps(y + (r0 + rr) * ldy + n0, mask, out[rr]);
}

template <bool kWide>
void gemm(const W4Prepared& w, const XQuant& xq, float* y, int64_t ldy, int threads) {
  const int64_t tiles = w.np / kTile;
  // Threads take chunks of 4 tiles (128 KiB of weights at k = 4096) from a shared counter,
  // as llama.cpp does: each chunk is one contiguous stream, and a thread that the OS
  // deschedules does not hold up the others (a static split waits for the slowest).
#pragma omp parallel for schedule(dynamic, 4) num_threads(threads)
  for (int64_t t = 0; t < tiles; ++t) {
    int64_t r = 0;
    for (; r + 4 <= xq.m; r += 4) tile_rows<4, kWide>(w, xq, t, r, y, ldy);
    switch (xq.m - r) {
      case 3: tile_rows<3, kWide>(w, xq, t, r, y, ldy); break;
      case 2: tile_rows<2, kWide>(w, xq, t, r, y, ldy); break;
      case 1: tile_rows<1, kWide>(w, xq, t, r, y, ldy); break;
      default: break;
    }
  }
}

}  // namespace

void w4_gemm_avx512(const W4Prepared& w, const XQuant& xq, float* y, int64_t ldy, int threads) {
  if (xq.fmt == ActFormat::kInt16) {
    gemm<true>(w, xq, y, ldy, threads);
  } else {
    gemm<false>(w, xq, y, ldy, threads);
  }
}

}  // namespace lavin

#define LAVIN_ADAPTER_SUFFIX avx512
#include "adapters_simd.h"
