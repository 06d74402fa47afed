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

// RB rows against TB tiles of one unit (kernels.h: TB = kUnit, a whole unit, or 1); with kWide
// each row has the two int8 planes of the int16 activations (kernels.h), dotted with the same
// unpacked weights into separate int16 sums (each plane's values are within [-128, 127], so the
// bound above holds per plane). Each row's activation broadcasts are paid once for the TB tiles
// (as in the AVX-512 kernel: see there).
template <int RB, int TB, bool kWide>
inline void tile_block(const W4Prepared& w, const XQuant& xq, int64_t t0, int64_t r0, float* y, int64_t ldy) {
  const int64_t chunks = w.kp / 8;
  const int64_t nblocks = w.kp / kBlock;
  const int64_t row_bytes = act_row_bytes(w.kp);
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i ones16 = _mm256_set1_epi16(1);
  // Tiles t0.. are in one unit (TB = kUnit: a whole unit; TB = 1: any tile): a tile's record for
  // chunk cc is at its first record + cc * stride, stride = 64 * (tiles in the unit).
  const int64_t tiles = w.np / kTile;
  const int64_t stride = w4_record_offset(t0, 1, tiles, chunks) - w4_record_offset(t0, 0, tiles, chunks);
  const uint8_t* tile[TB];
  for (int tt = 0; tt < TB; ++tt) tile[tt] = w.qw + w4_record_offset(t0 + tt, 0, tiles, chunks);
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
  alignas(32) float out[RB][TB][kTile] = {};

  for (int64_t g = 0; g < w.groups; ++g) {
    __m256 acc0[RB][TB], acc1[RB][TB];  // columns 0..7 and 8..15 of each tile
    for (int rr = 0; rr < RB; ++rr)
      for (int tt = 0; tt < TB; ++tt) acc0[rr][tt] = acc1[rr][tt] = _mm256_setzero_ps();
    for (int64_t bi = 0; bi < w.blocks_per_group; ++bi) {
      const int64_t b = g * w.blocks_per_group + bi;
      __m256i s0[RB][TB], s1[RB][TB], l0[RB][TB], l1[RB][TB];
      for (int rr = 0; rr < RB; ++rr)
        for (int tt = 0; tt < TB; ++tt) s0[rr][tt] = s1[rr][tt] = l0[rr][tt] = l1[rr][tt] = _mm256_setzero_si256();
#pragma GCC unroll 4
      for (int c = 0; c < kBlock / 8; ++c) {
        __m256i xa[RB], xb[RB], ya[RB], yb[RB];
        for (int rr = 0; rr < RB; ++rr) {
          const int8_t* xc = xr[rr] + b * kBlock + c * 8;
          xa[rr] = _mm256_set1_epi32(load4(xc));
          xb[rr] = _mm256_set1_epi32(load4(xc + 4));
          if (kWide) {
            const int8_t* xd = xl[rr] + b * kBlock + c * 8;
            ya[rr] = _mm256_set1_epi32(load4(xd));
            yb[rr] = _mm256_set1_epi32(load4(xd + 4));
          }
        }
        for (int tt = 0; tt < TB; ++tt) {
          const uint8_t* rec = tile[tt] + (b * (kBlock / 8) + c) * stride;
          const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec));
          const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec + 32));
          const __m256i lo0 = _mm256_and_si256(v0, low4);
          const __m256i hi0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), low4);
          const __m256i lo1 = _mm256_and_si256(v1, low4);
          const __m256i hi1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), low4);
          for (int rr = 0; rr < RB; ++rr) {
            s0[rr][tt] = _mm256_add_epi16(s0[rr][tt], _mm256_add_epi16(_mm256_maddubs_epi16(lo0, xa[rr]),
                                                                       _mm256_maddubs_epi16(hi0, xb[rr])));
            s1[rr][tt] = _mm256_add_epi16(s1[rr][tt], _mm256_add_epi16(_mm256_maddubs_epi16(lo1, xa[rr]),
                                                                       _mm256_maddubs_epi16(hi1, xb[rr])));
            if (kWide) {
              l0[rr][tt] = _mm256_add_epi16(l0[rr][tt], _mm256_add_epi16(_mm256_maddubs_epi16(lo0, ya[rr]),
                                                                         _mm256_maddubs_epi16(hi0, yb[rr])));
              l1[rr][tt] = _mm256_add_epi16(l1[rr][tt], _mm256_add_epi16(_mm256_maddubs_epi16(lo1, ya[rr]),
                                                                         _mm256_maddubs_epi16(hi1, yb[rr])));
            }
          }
        }
      }
      for (int rr = 0; rr < RB; ++rr) {
        const __m256 db = _mm256_set1_ps(dr[rr][b]);
        for (int tt = 0; tt < TB; ++tt) {
          __m256i i0 = _mm256_madd_epi16(s0[rr][tt], ones16);
          __m256i i1 = _mm256_madd_epi16(s1[rr][tt], ones16);
          if (kWide) {
            i0 = _mm256_add_epi32(_mm256_slli_epi32(i0, 8), _mm256_madd_epi16(l0[rr][tt], ones16));
            i1 = _mm256_add_epi32(_mm256_slli_epi32(i1, 8), _mm256_madd_epi16(l1[rr][tt], ones16));
          }
          acc0[rr][tt] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i0), db, acc0[rr][tt]);
          acc1[rr][tt] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i1), db, acc1[rr][tt]);
        }
      }
    }
    for (int tt = 0; tt < TB; ++tt) {
      const int64_t t = t0 + tt;
      const uint16_t* sc = w.scales + (t * w.groups + g) * kTile;
      const uint8_t* zp = w.zeros + (t * w.groups + g) * kTile;
      const __m256 sa = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc)));
      const __m256 sb = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + 8)));
      const __m256 za =
          _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(zp))));
      const __m256 zb =
          _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(zp + 8))));
      for (int rr = 0; rr < RB; ++rr) {
        const __m256 gs = _mm256_set1_ps(gr[rr][g]);
        float* o = out[rr][tt];
        _mm256_store_ps(o, _mm256_fmadd_ps(sa, _mm256_fnmadd_ps(za, gs, acc0[rr][tt]), _mm256_load_ps(o)));
        _mm256_store_ps(o + 8, _mm256_fmadd_ps(sb, _mm256_fnmadd_ps(zb, gs, acc1[rr][tt]), _mm256_load_ps(o + 8)));
      }
    }
  }
  for (int tt = 0; tt < TB; ++tt) {
    const int64_t n0 = (t0 + tt) * kTile;
    const int64_t valid = std::min<int64_t>(kTile, w.n - n0);
    for (int rr = 0; rr < RB; ++rr) std::memcpy(y + (r0 + rr) * ldy + n0, out[rr][tt], sizeof(float) * valid);
  }
}

// All rows against tiles t0 .. t0 + TB - 1: row pairs, then a last single row.
template <int TB, bool kWide>
inline void tiles_all_rows(const W4Prepared& w, const XQuant& xq, int64_t t0, float* y, int64_t ldy) {
  int64_t r = 0;
  for (; r + 2 <= xq.m; r += 2) tile_block<2, TB, kWide>(w, xq, t0, r, y, ldy);
  if (r < xq.m) tile_block<1, TB, kWide>(w, xq, t0, r, y, ldy);
}

template <int TB, bool kWide>
void gemm_tiles(const W4Prepared& w, const XQuant& xq, float* y, int64_t ldy, int threads) {
  const int64_t tiles = w.np / kTile;
  const int64_t units = tiles / TB;
  // Threads take 4 tiles at a time (128 KiB of weights at k = 4096, one unit of the layout) from a
  // shared counter, as llama.cpp does: a thread that the OS deschedules does not hold up the others
  // (a static split waits for the slowest). With TB = kUnit the tiles of a last, partial unit go one
  // by one.
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(dynamic, TB >= 4 ? 1 : 4 / TB) nowait
    for (int64_t u = 0; u < units; ++u) tiles_all_rows<TB, kWide>(w, xq, u * TB, y, ldy);
#pragma omp for schedule(static) nowait
    for (int64_t t = units * TB; t < tiles; ++t) tiles_all_rows<1, kWide>(w, xq, t, y, ldy);
  }
}

template <bool kWide>
void gemm(const W4Prepared& w, const XQuant& xq, float* y, int64_t ldy, int threads) {
  // m = 1: four tiles per pass. m > 1: one tile and two rows per pass; with 16 ymm registers more
  // tiles per pass spill the int16 sums of the two rows.
  if (xq.m == 1) {
    gemm_tiles<kUnit, kWide>(w, xq, y, ldy, threads);
  } else {
    gemm_tiles<1, kWide>(w, xq, y, ldy, threads);
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
