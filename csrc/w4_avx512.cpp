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

// RB activation rows against TB tiles of one unit (kernels.h: TB = kUnit, a whole unit, or 1).
//
// Each 64-byte record is unpacked once (low and high nibbles) and reused for every row and, with
// kWide, for both planes of the 15-bit activations (kernels.h); each row's 4-byte activation
// groups are broadcast once and reused for every tile. Why 4 tiles at once: at m = 1 a single
// tile leaves the core with a few vpdpbusd dependency chains that advance one instruction per
// record, so it waits on their latency; 4 tiles give it 4 times the independent work, and the
// broadcasts are paid once for 4 tiles. The unit-interleaved layout keeps the 4 tiles' records
// one contiguous stream for the prefetcher. Per row, tile and plane the two nibble halves
// accumulate into one register (4 tiles keep enough chains in flight).
template <int RB, int TB, bool kWide>
inline void tile_block(const W4Prepared& w, const XQuant& xq, int64_t t0, int64_t r0, float* y, int64_t ldy) {
  const int64_t chunks = w.kp / 8;
  const int64_t nblocks = w.kp / kBlock;
  const int64_t row_bytes = act_row_bytes(w.kp);
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  // Tiles t0.. are in one unit (TB = kUnit: a whole unit; TB = 1: any tile): a tile's record for
  // chunk cc is at its first record + cc * stride, stride = 64 * (tiles in the unit).
  const int64_t tiles = w.np / kTile;
  const int64_t stride = w4_record_offset(t0, 1, tiles, chunks) - w4_record_offset(t0, 0, tiles, chunks);
  const uint8_t* tile[TB];
  for (int tt = 0; tt < TB; ++tt) tile[tt] = w.qw + w4_record_offset(t0 + tt, 0, tiles, chunks);
  const int8_t* xr[RB];  // high plane (the whole value for int8); the low plane is at +Kp
  const float* dr[RB];
  const float* gr[RB];
  for (int rr = 0; rr < RB; ++rr) {
    xr[rr] = xq.q + (r0 + rr) * row_bytes;
    dr[rr] = xq.d + (r0 + rr) * nblocks;
    gr[rr] = xq.gsum + (r0 + rr) * w.groups;
  }
  __m512 out[RB][TB];
  for (int rr = 0; rr < RB; ++rr)
    for (int tt = 0; tt < TB; ++tt) out[rr][tt] = _mm512_setzero_ps();

  for (int64_t g = 0; g < w.groups; ++g) {
    __m512 accg[RB][TB];
    for (int rr = 0; rr < RB; ++rr)
      for (int tt = 0; tt < TB; ++tt) accg[rr][tt] = _mm512_setzero_ps();
    for (int64_t bi = 0; bi < w.blocks_per_group; ++bi) {
      const int64_t b = g * w.blocks_per_group + bi;
      __m512i ih[RB][TB], il[RB][TB];  // integer block sums: high plane (or int8), low plane
      for (int rr = 0; rr < RB; ++rr)
        for (int tt = 0; tt < TB; ++tt) ih[rr][tt] = il[rr][tt] = _mm512_setzero_si512();
#pragma GCC unroll 4
      for (int c = 0; c < kBlock / 8; ++c) {
        __m512i lo[TB], hi[TB];
        for (int tt = 0; tt < TB; ++tt) {
          const __m512i v = _mm512_loadu_si512(tile[tt] + (b * (kBlock / 8) + c) * stride);
          lo[tt] = _mm512_and_si512(v, low4);                        // rows 8c..8c+3
          hi[tt] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);  // rows 8c+4..8c+7
        }
        for (int rr = 0; rr < RB; ++rr) {
          const int8_t* xc = xr[rr] + b * kBlock + c * 8;
          const __m512i xa = _mm512_set1_epi32(load4(xc));
          const __m512i xb = _mm512_set1_epi32(load4(xc + 4));
          for (int tt = 0; tt < TB; ++tt) {
            ih[rr][tt] = _mm512_dpbusd_epi32(ih[rr][tt], lo[tt], xa);
            ih[rr][tt] = _mm512_dpbusd_epi32(ih[rr][tt], hi[tt], xb);
          }
          if (kWide) {
            const __m512i ya = _mm512_set1_epi32(load4(xc + w.kp));
            const __m512i yb = _mm512_set1_epi32(load4(xc + w.kp + 4));
            for (int tt = 0; tt < TB; ++tt) {
              il[rr][tt] = _mm512_dpbusd_epi32(il[rr][tt], lo[tt], ya);
              il[rr][tt] = _mm512_dpbusd_epi32(il[rr][tt], hi[tt], yb);
            }
          }
        }
      }
      for (int rr = 0; rr < RB; ++rr) {
        const __m512 db = _mm512_set1_ps(dr[rr][b]);
        for (int tt = 0; tt < TB; ++tt) {
          __m512i s = ih[rr][tt];
          if (kWide) s = _mm512_add_epi32(_mm512_slli_epi32(s, 8), il[rr][tt]);  // 256 sum(w hi) + sum(w lo)
          accg[rr][tt] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), db, accg[rr][tt]);
        }
      }
    }
    // Fold the group's zero point and scale: s * (sum q x - z * sum x).
    for (int tt = 0; tt < TB; ++tt) {
      const int64_t t = t0 + tt;
      const __m512 s = _mm512_cvtph_ps(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.scales + (t * w.groups + g) * kTile)));
      const __m512 z = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.zeros + (t * w.groups + g) * kTile))));
      for (int rr = 0; rr < RB; ++rr) {
        const __m512 corr = _mm512_fnmadd_ps(z, _mm512_set1_ps(gr[rr][g]), accg[rr][tt]);
        out[rr][tt] = _mm512_fmadd_ps(s, corr, out[rr][tt]);
      }
    }
  }
  for (int tt = 0; tt < TB; ++tt) {
    const int64_t n0 = (t0 + tt) * kTile;
    const int64_t valid = std::min<int64_t>(kTile, w.n - n0);
    const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1u);
    for (int rr = 0; rr < RB; ++rr) _mm512_mask_storeu_ps(y + (r0 + rr) * ldy + n0, mask, out[rr][tt]);
  }
}

// All rows against tiles t0 .. t0 + TB - 1: row pairs (two rows x four tiles keep 16 integer
// accumulators in registers; more rows per pass spill), then a last single row. For m > 2 the
// same tiles are re-read from L1/L2, not from memory.
template <int TB, bool kWide>
inline void tiles_all_rows(const W4Prepared& w, const XQuant& xq, int64_t t0, float* y, int64_t ldy) {
  int64_t r = 0;
  for (; r + 2 <= xq.m; r += 2) tile_block<2, TB, kWide>(w, xq, t0, r, y, ldy);
  if (r < xq.m) tile_block<1, TB, kWide>(w, xq, t0, r, y, ldy);
}

template <bool kWide>
void gemm(const W4Prepared& w, const XQuant& xq, float* y, int64_t ldy, int threads) {
  constexpr int kTB = kUnit;
  const int64_t tiles = w.np / kTile;
  const int64_t units = tiles / kTB;
  // Threads take units of 4 tiles (128 KiB of weights at k = 4096, one contiguous range in the
  // unit-interleaved layout) from a shared counter, as llama.cpp does: a thread that the OS
  // deschedules does not hold up the others (a static split waits for the slowest). The tiles of
  // a last, partial unit go one by one.
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t u = 0; u < units; ++u) tiles_all_rows<kTB, kWide>(w, xq, u * kTB, y, ldy);
#pragma omp for schedule(static) nowait
    for (int64_t t = units * kTB; t < tiles; ++t) tiles_all_rows<1, kWide>(w, xq, t, y, ldy);
  }
}

}  // namespace

XQuant quantize_activations_avx512(const float* x, int64_t ldx, const W4Prepared& w, int64_t m, ActFormat fmt,
                                   int8_t* q, float* d, float* gsum) {
  // The same arithmetic as the scalar quantize_activations (w4_scalar.cpp), 16 lanes at a time:
  // one float multiply, round to nearest even, clamp, exact integer splits and sums; the
  // per-block float bookkeeping (scale, group sums) stays scalar and in the same order, so
  // the result is identical to the last bit.
  const int64_t nblocks = w.kp / kBlock;
  const int64_t row_bytes = act_row_bytes(w.kp);
  const bool wide = fmt == ActFormat::kInt16;
  const float qmax = static_cast<float>(wide ? kInt16Max : kInt8Max);
  const __m512 vqmax = _mm512_set1_ps(qmax), vqmin = _mm512_set1_ps(-qmax);
  const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
#pragma omp parallel for schedule(static) if (m >= 4)
  for (int64_t r = 0; r < m; ++r) {
    const float* xr = x + r * ldx;
    int8_t* hr = q + r * row_bytes;
    int8_t* lr = hr + w.kp;
    float* dr = d + r * nblocks;
    float* gr = gsum + r * w.groups;
    for (int64_t g = 0; g < w.groups; ++g) gr[g] = 0.0f;
    for (int64_t b = 0; b < nblocks; ++b) {
      __m512 v[2];
      __m512 amax = _mm512_setzero_ps();
      for (int h = 0; h < 2; ++h) {
        const int64_t k0 = b * kBlock + h * 16;
        const int64_t left = w.k - k0;
        const __mmask16 valid = left >= 16 ? static_cast<__mmask16>(0xFFFF)
                                : left <= 0 ? static_cast<__mmask16>(0)
                                            : static_cast<__mmask16>((1u << left) - 1u);
        if (w.perm) {
          const __m512i idx = _mm512_maskz_loadu_epi32(valid, w.perm + k0);
          v[h] = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), valid, idx, xr, 4);
        } else {
          v[h] = _mm512_maskz_loadu_ps(valid, xr + k0);
        }
        amax = _mm512_max_ps(_mm512_and_ps(v[h], absmask), amax);  // a NaN input keeps amax, as std::max does
      }
      const float am = _mm512_reduce_max_ps(amax);
      const float dscale = am / qmax;
      const __m512 inv = _mm512_set1_ps(am > 0.0f ? qmax / am : 0.0f);
      __m512i bsum = _mm512_setzero_si512();
      for (int h = 0; h < 2; ++h) {
        __m512 t = _mm512_roundscale_ps(_mm512_mul_ps(v[h], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        t = _mm512_min_ps(vqmax, _mm512_max_ps(vqmin, t));
        const __m512i qi = _mm512_cvttps_epi32(t);
        bsum = _mm512_add_epi32(bsum, qi);
        int8_t* dst = hr + b * kBlock + h * 16;
        if (wide) {
          const __m512i hi = _mm512_sub_epi32(
              _mm512_srai_epi32(_mm512_add_epi32(qi, _mm512_set1_epi32(128 + 65536)), 8), _mm512_set1_epi32(256));
          const __m512i lo = _mm512_sub_epi32(qi, _mm512_slli_epi32(hi, 8));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_cvtepi32_epi8(hi));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(lr + b * kBlock + h * 16), _mm512_cvtepi32_epi8(lo));
        } else {
          _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_cvtepi32_epi8(qi));
        }
      }
      dr[b] = dscale;
      gr[b / w.blocks_per_group] += dscale * static_cast<float>(_mm512_reduce_add_epi32(bsum));
    }
  }
  return XQuant{q, d, gsum, m, fmt};
}

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
