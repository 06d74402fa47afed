// AVX2 W4 kernel and the AVX2 build of the adapter kernels.
// Compiled with -mavx2 -mfma -mf16c; only called after cpu_features() confirmed those.
//
// Without VNNI the u8 x s8 dot product is maddubs (pairs -> int16) then madd with ones
// (pairs of int16 -> int32). A whole 32-row block is summed in int16 first: each maddubs
// lane is at most 2*15*128 = 3840 in magnitude and a block adds 8 of them (30720 < 32767),
// so there is one madd per block instead of one per record.
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

// RB rows against one 16-column tile; with kWide each row has the two int8 planes of the int16
// activations (kernels.h), dotted with the same unpacked weights into separate int16 sums
// (each plane's values are within [-128, 127], so the bound above holds per plane).
template <int RB, bool kWide>
inline void tile_rows(const W4Prepared& w, const XQuant& xq, int64_t t, int64_t r0, float* y, int64_t ldy) {
  const int64_t chunks = w.kp / 8;
  const int64_t nblocks = w.kp / kBlock;
  const int64_t row_bytes = act_row_bytes(w.kp);
  const uint8_t* tile = w.qw + t * chunks * 64;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i ones16 = _mm256_set1_epi16(1);
  const int8_t* xr[RB];
  const int8_t* xl[RB];
  const float* dr[RB];
  const float* gr[RB];
  for (int rr = 0; rr < RB; ++rr) {
    xr[rr] = xq.q + (r0 + rr) * row_bytes;
    xl[rr] = xr[rr] + w.kp;
    dr[rr] = xq.d + (r0 + rr) * nblocks;
    gr[rr] = xq.gsum + (r0 + rr) * w.groups;
  }
  // Output accumulators stay in L1 (touched once per group); registers go to the inner loop.
  alignas(32) float out[RB][kTile] = {};

  for (int64_t g = 0; g < w.groups; ++g) {
    __m256 acc0[RB], acc1[RB];  // columns 0..7 and 8..15 of the tile
    for (int rr = 0; rr < RB; ++rr) acc0[rr] = acc1[rr] = _mm256_setzero_ps();
    for (int64_t bi = 0; bi < w.blocks_per_group; ++bi) {
      const int64_t b = g * w.blocks_per_group + bi;
      const uint8_t* rec = tile + b * (kBlock / 8) * 64;
      __m256i s0[RB], s1[RB], l0[RB], l1[RB];
      for (int rr = 0; rr < RB; ++rr) s0[rr] = s1[rr] = l0[rr] = l1[rr] = _mm256_setzero_si256();
#pragma GCC unroll 4
      for (int c = 0; c < kBlock / 8; ++c) {
        const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec + c * 64));
        const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec + c * 64 + 32));
        const __m256i lo0 = _mm256_and_si256(v0, low4);
        const __m256i hi0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), low4);
        const __m256i lo1 = _mm256_and_si256(v1, low4);
        const __m256i hi1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), low4);
        for (int rr = 0; rr < RB; ++rr) {
          const int8_t* xc = xr[rr] + b * kBlock + c * 8;
          const __m256i xa = _mm256_set1_epi32(load4(xc));
          const __m256i xb = _mm256_set1_epi32(load4(xc + 4));
          s0[rr] = _mm256_add_epi16(s0[rr], _mm256_add_epi16(_mm256_maddubs_epi16(lo0, xa),
                                                             _mm256_maddubs_epi16(hi0, xb)));
          s1[rr] = _mm256_add_epi16(s1[rr], _mm256_add_epi16(_mm256_maddubs_epi16(lo1, xa),
                                                             _mm256_maddubs_epi16(hi1, xb)));
          if (kWide) {
            const int8_t* xd = xl[rr] + b * kBlock + c * 8;
            const __m256i ya = _mm256_set1_epi32(load4(xd));
            const __m256i yb = _mm256_set1_epi32(load4(xd + 4));
            l0[rr] = _mm256_add_epi16(l0[rr], _mm256_add_epi16(_mm256_maddubs_epi16(lo0, ya),
                                                               _mm256_maddubs_epi16(hi0, yb)));
            l1[rr] = _mm256_add_epi16(l1[rr], _mm256_add_epi16(_mm256_maddubs_epi16(lo1, ya),
                                                               _mm256_maddubs_epi16(hi1, yb)));
          }
        }
      }
      for (int rr = 0; rr < RB; ++rr) {
        const __m256 db = _mm256_set1_ps(dr[rr][b]);
        __m256i i0 = _mm256_madd_epi16(s0[rr], ones16);
        __m256i i1 = _mm256_madd_epi16(s1[rr], ones16);
        if (kWide) {
          i0 = _mm256_add_epi32(_mm256_slli_epi32(i0, 8), _mm256_madd_epi16(l0[rr], ones16));
          i1 = _mm256_add_epi32(_mm256_slli_epi32(i1, 8), _mm256_madd_epi16(l1[rr], ones16));
        }
        acc0[rr] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i0), db, acc0[rr]);
        acc1[rr] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i1), db, acc1[rr]);
      }
    }
    const uint16_t* sc = w.scales + (t * w.groups + g) * kTile;
    const uint8_t* zp = w.zeros + (t * w.groups + g) * kTile;
    const __m256 sa = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc)));
    const __m256 sb = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + 8)));
    const __m256 za = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(zp))));
    const __m256 zb =
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(zp + 8))));
    for (int rr = 0; rr < RB; ++rr) {
      const __m256 gs = _mm256_set1_ps(gr[rr][g]);
      _mm256_store_ps(out[rr], _mm256_fmadd_ps(sa, _mm256_fnmadd_ps(za, gs, acc0[rr]), _mm256_load_ps(out[rr])));
      _mm256_store_ps(out[rr] + 8,
                      _mm256_fmadd_ps(sb, _mm256_fnmadd_ps(zb, gs, acc1[rr]), _mm256_load_ps(out[rr] + 8)));
    }
  }
  const int64_t n0 = t * kTile;
  const int64_t valid = std::min<int64_t>(kTile, w.n - n0);
  for (int rr = 0; rr < RB; ++rr) std::memcpy(y + (r0 + rr) * ldy + n0, out[rr], sizeof(float) * valid);
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
    for (; r + 2 <= xq.m; r += 2) tile_rows<2, kWide>(w, xq, t, r, y, ldy);
    if (r < xq.m) tile_rows<1, kWide>(w, xq, t, r, y, ldy);
  }
}

}  // namespace

void w4_gemm_avx2(const W4Prepared& w, const XQuant& xq, float* y, int64_t ldy, int threads) {
  if (xq.fmt == ActFormat::kInt16) {
    gemm<true>(w, xq, y, ldy, threads);
  } else {
    gemm<false>(w, xq, y, ldy, threads);
  }
}

}  // namespace lavin

#define LAVIN_ADAPTER_SUFFIX avx2
#include "adapters_simd.h"
