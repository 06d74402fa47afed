// The AArch64 W4 kernels on the tiled layout of kernels.h, written once and built three times (the including
// unit defines LAVIN_NEON_LEVEL and its suffix; CMakeLists.txt gives each unit its -march):
//   0  w4_neon.cpp          Advanced SIMD only (Cortex-A72, Raspberry Pi 4): smlal (vmlal_s8) into int16 sums
//                           over a 32-row block, then pairwise adds (saddlp, addp) to int32;
//   1  w4_neon_dotprod.cpp  the int8 dot product (FEAT_DotProd: Cortex-A76 and later, Apple M1):
//                           sdot by lane (vdotq_lane_s32), the AVX-512 kernel's vpdpbusd;
//   2  w4_neon_i8mm.cpp     the int8 matrix multiply (FEAT_I8MM: Cortex-A710, Graviton 3, M2): smmla on row
//                           pairs for m >= 2 (prefill, batches), sdot for a last odd row.
// No repack: a 16-byte register holds 4 columns x 4 bytes of a record, and `v & 0xF`, `v >> 4` (values 0..15)
// are valid signed bytes, so the signed x signed instructions take the unpacked weights as they are. Every level
// forms the same exact integer block sums and then the scalar kernel's float steps in its order (explicit
// fused multiply-adds, units built with -ffp-contract=off), so the results are the scalar backend's bit for bit.
#include <arm_neon.h>

#include <algorithm>
#include <cstring>

#include "kernels.h"

#ifndef LAVIN_NEON_LEVEL
#error "define LAVIN_NEON_LEVEL before including w4_neon_impl.h"
#endif

namespace lavin {
namespace {

inline int8x8_t load8(const int8_t* p) { return vld1_s8(p); }

// The 4 registers of a 64-byte record as low and high nibbles (rows 8c..8c+3 and 8c+4..8c+7 of 4 columns each).
inline void unpack_record(const uint8_t* rec, int8x16_t lo[4], int8x16_t hi[4]) {
  const uint8x16_t low4 = vdupq_n_u8(0x0F);
  for (int j = 0; j < 4; ++j) {
    const uint8x16_t v = vld1q_u8(rec + 16 * j);
    lo[j] = vreinterpretq_s8_u8(vandq_u8(v, low4));
    hi[j] = vreinterpretq_s8_u8(vshrq_n_u8(v, 4));
  }
}

// A block's integer sums (4 columns) into the group accumulator, as w4_gemm_generic: fma(float(s), d, acc).
template <bool kWide>
inline float32x4_t fold_block(int32x4_t ih, int32x4_t il, float d, float32x4_t acc) {
  const int32x4_t s = kWide ? vaddq_s32(vshlq_n_s32(ih, 8), il) : ih;  // 256 sum(w hi) + sum(w lo)
  return vfmaq_f32(acc, vcvtq_f32_s32(s), vdupq_n_f32(d));
}

// The group's zero point and scale for the 16 columns of tile t: out += s * (acc - z * gsum).
inline void fold_group(const W4Prepared& w, int64_t t, int64_t g, float gsum, const float32x4_t acc[4],
                       float32x4_t out[4]) {
  const uint16_t* sc = w.scales + (t * w.groups + g) * kTile;
  const uint8x16_t z8 = vld1q_u8(w.zeros + (t * w.groups + g) * kTile);
  const uint16x8_t z16[2] = {vmovl_u8(vget_low_u8(z8)), vmovl_u8(vget_high_u8(z8))};
  const float32x4_t gs = vdupq_n_f32(gsum);
  for (int j = 0; j < 4; ++j) {
    const float32x4_t s = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(sc + 4 * j)));
    const uint16x8_t zz = z16[j / 2];
    const float32x4_t z = vcvtq_f32_u32(vmovl_u16(j % 2 ? vget_high_u16(zz) : vget_low_u16(zz)));
    out[j] = vfmaq_f32(out[j], s, vfmsq_f32(acc[j], z, gs));
  }
}

inline void store_tile(const W4Prepared& w, int64_t t, const float32x4_t out[4], float* yrow) {
  const int64_t n0 = t * kTile;
  if (n0 + kTile <= w.n) {
    for (int j = 0; j < 4; ++j) vst1q_f32(yrow + n0 + 4 * j, out[j]);
    return;
  }
  float buf[kTile];
  for (int j = 0; j < 4; ++j) vst1q_f32(buf + 4 * j, out[j]);
  for (int64_t i = 0; n0 + i < w.n; ++i) yrow[n0 + i] = buf[i];
}

struct TileRows {
  const uint8_t* rec0;  // the tile's record of chunk 0; chunk cc at rec0 + cc * stride
  int64_t stride;
};

inline TileRows tile_rows(const W4Prepared& w, int64_t t) {
  const int64_t tiles = w.np / kTile, chunks = w.kp / 8;
  return {w.qw + w4_record_offset(t, 0, tiles, chunks),
          w4_record_offset(t, 1, tiles, chunks) - w4_record_offset(t, 0, tiles, chunks)};
}

#if LAVIN_NEON_LEVEL == 0
// One row against one tile, widening multiply-accumulates: each int16 lane sums w x over a chunk's 2 nibble
// halves (<= 2 * 15 * 128) and a block's 4 chunks (<= 15360 < 32767), the AVX2 kernel's bound.
template <bool kWide>
inline void tile_row(const W4Prepared& w, const XQuant& xq, int64_t t, int64_t r, float* y, int64_t ldy) {
  const TileRows tr = tile_rows(w, t);
  const int8_t* xr = xq.q + r * act_row_bytes(w.kp);
  const float* dr = xq.d + r * (w.kp / kBlock);
  const float* gr = xq.gsum + r * w.groups;
  float32x4_t out[4];
  for (int j = 0; j < 4; ++j) out[j] = vdupq_n_f32(0.0f);
  for (int64_t g = 0; g < w.groups; ++g) {
    float32x4_t accg[4];
    for (int j = 0; j < 4; ++j) accg[j] = vdupq_n_f32(0.0f);
    for (int64_t bi = 0; bi < w.blocks_per_group; ++bi) {
      const int64_t b = g * w.blocks_per_group + bi;
      int16x8_t sh[4][2], sl[4][2];  // per register: columns 4j, 4j+1 (low half) and 4j+2, 4j+3 (high half)
      for (int j = 0; j < 4; ++j) sh[j][0] = sh[j][1] = sl[j][0] = sl[j][1] = vdupq_n_s16(0);
      for (int c = 0; c < kBlock / 8; ++c) {
        int8x16_t lo[4], hi[4];
        unpack_record(tr.rec0 + (b * (kBlock / 8) + c) * tr.stride, lo, hi);
        const int8_t* xc = xr + b * kBlock + c * 8;
        int32_t a4, b4;
        std::memcpy(&a4, xc, 4);
        std::memcpy(&b4, xc + 4, 4);
        const int8x16_t xa = vreinterpretq_s8_s32(vdupq_n_s32(a4)), xb = vreinterpretq_s8_s32(vdupq_n_s32(b4));
        for (int j = 0; j < 4; ++j) {
          sh[j][0] = vmlal_s8(vmlal_s8(sh[j][0], vget_low_s8(lo[j]), vget_low_s8(xa)), vget_low_s8(hi[j]),
                              vget_low_s8(xb));
          sh[j][1] = vmlal_high_s8(vmlal_high_s8(sh[j][1], lo[j], xa), hi[j], xb);
        }
        if (kWide) {
          std::memcpy(&a4, xc + w.kp, 4);
          std::memcpy(&b4, xc + w.kp + 4, 4);
          const int8x16_t ya = vreinterpretq_s8_s32(vdupq_n_s32(a4)), yb = vreinterpretq_s8_s32(vdupq_n_s32(b4));
          for (int j = 0; j < 4; ++j) {
            sl[j][0] = vmlal_s8(vmlal_s8(sl[j][0], vget_low_s8(lo[j]), vget_low_s8(ya)), vget_low_s8(hi[j]),
                                vget_low_s8(yb));
            sl[j][1] = vmlal_high_s8(vmlal_high_s8(sl[j][1], lo[j], ya), hi[j], yb);
          }
        }
      }
      for (int j = 0; j < 4; ++j) {
        // Pairwise: [c 4j: 2 sums, c 4j+1: 2 sums] -> one int32 per column.
        const int32x4_t ih = vpaddq_s32(vpaddlq_s16(sh[j][0]), vpaddlq_s16(sh[j][1]));
        const int32x4_t il = kWide ? vpaddq_s32(vpaddlq_s16(sl[j][0]), vpaddlq_s16(sl[j][1])) : vdupq_n_s32(0);
        accg[j] = fold_block<kWide>(ih, il, dr[b], accg[j]);
      }
    }
    fold_group(w, t, g, gr[g], accg, out);
  }
  store_tile(w, t, out, y + r * ldy);
}

template <bool kWide>
inline void tile_all_rows(const W4Prepared& w, const XQuant& xq, int64_t t, float* y, int64_t ldy) {
  for (int64_t r = 0; r < xq.m; ++r) tile_row<kWide>(w, xq, t, r, y, ldy);
}

#else
// RB rows (1 or 2) against one tile with sdot by lane: per row and plane 4 int32 accumulators (4 columns each),
// two sdot per register and chunk (low nibbles with activation bytes 0..3, high nibbles with 4..7).
template <int RB, bool kWide>
inline void tile_rows_sdot(const W4Prepared& w, const XQuant& xq, int64_t t, int64_t r0, float* y, int64_t ldy) {
  const TileRows tr = tile_rows(w, t);
  const int8_t* xr[RB];
  const float* dr[RB];
  const float* gr[RB];
  for (int rr = 0; rr < RB; ++rr) {
    xr[rr] = xq.q + (r0 + rr) * act_row_bytes(w.kp);
    dr[rr] = xq.d + (r0 + rr) * (w.kp / kBlock);
    gr[rr] = xq.gsum + (r0 + rr) * w.groups;
  }
  float32x4_t out[RB][4];
  for (int rr = 0; rr < RB; ++rr)
    for (int j = 0; j < 4; ++j) out[rr][j] = vdupq_n_f32(0.0f);
  for (int64_t g = 0; g < w.groups; ++g) {
    float32x4_t accg[RB][4];
    for (int rr = 0; rr < RB; ++rr)
      for (int j = 0; j < 4; ++j) accg[rr][j] = vdupq_n_f32(0.0f);
    for (int64_t bi = 0; bi < w.blocks_per_group; ++bi) {
      const int64_t b = g * w.blocks_per_group + bi;
      int32x4_t ih[RB][4], il[RB][4];
      for (int rr = 0; rr < RB; ++rr)
        for (int j = 0; j < 4; ++j) ih[rr][j] = il[rr][j] = vdupq_n_s32(0);
#pragma GCC unroll 4
      for (int c = 0; c < kBlock / 8; ++c) {
        int8x16_t lo[4], hi[4];
        unpack_record(tr.rec0 + (b * (kBlock / 8) + c) * tr.stride, lo, hi);
        for (int rr = 0; rr < RB; ++rr) {
          const int8_t* xc = xr[rr] + b * kBlock + c * 8;
          const int8x8_t xh = load8(xc);
          for (int j = 0; j < 4; ++j) {
            ih[rr][j] = vdotq_lane_s32(ih[rr][j], lo[j], xh, 0);
            ih[rr][j] = vdotq_lane_s32(ih[rr][j], hi[j], xh, 1);
          }
          if (kWide) {
            const int8x8_t xl = load8(xc + w.kp);
            for (int j = 0; j < 4; ++j) {
              il[rr][j] = vdotq_lane_s32(il[rr][j], lo[j], xl, 0);
              il[rr][j] = vdotq_lane_s32(il[rr][j], hi[j], xl, 1);
            }
          }
        }
      }
      for (int rr = 0; rr < RB; ++rr)
        for (int j = 0; j < 4; ++j) accg[rr][j] = fold_block<kWide>(ih[rr][j], il[rr][j], dr[rr][b], accg[rr][j]);
    }
    for (int rr = 0; rr < RB; ++rr) fold_group(w, t, g, gr[rr][g], accg[rr], out[rr]);
  }
  for (int rr = 0; rr < RB; ++rr) store_tile(w, t, out[rr], y + (r0 + rr) * ldy);
}

#if LAVIN_NEON_LEVEL >= 2
// Two rows against one tile with smmla: a 2x8 block of activations (the two rows' 8 bytes of a chunk) times
// 8 rows of 2 columns gives a 2x2 block of sums. A column's 8 rows are its low-nibble and high-nibble lanes side
// by side (zip of 32-bit lanes: rows 8c..8c+3, then 8c+4..8c+7, the order of the activation bytes). Half the
// multiply instructions of sdot for two rows; the zips are shared by both planes.
template <bool kWide>
inline void tile_pair_smmla(const W4Prepared& w, const XQuant& xq, int64_t t, int64_t r0, float* y, int64_t ldy) {
  const TileRows tr = tile_rows(w, t);
  const int64_t row_bytes = act_row_bytes(w.kp), nblocks = w.kp / kBlock;
  const int8_t* x0 = xq.q + r0 * row_bytes;
  const int8_t* x1 = x0 + row_bytes;
  const float* dr[2] = {xq.d + r0 * nblocks, xq.d + (r0 + 1) * nblocks};
  const float* gr[2] = {xq.gsum + r0 * w.groups, xq.gsum + (r0 + 1) * w.groups};
  float32x4_t out[2][4];
  for (int rr = 0; rr < 2; ++rr)
    for (int j = 0; j < 4; ++j) out[rr][j] = vdupq_n_f32(0.0f);
  for (int64_t g = 0; g < w.groups; ++g) {
    float32x4_t accg[2][4];
    for (int rr = 0; rr < 2; ++rr)
      for (int j = 0; j < 4; ++j) accg[rr][j] = vdupq_n_f32(0.0f);
    for (int64_t bi = 0; bi < w.blocks_per_group; ++bi) {
      const int64_t b = g * w.blocks_per_group + bi;
      int32x4_t mh[8], ml[8];  // column pairs (2q, 2q+1): [r0 c2q, r0 c2q+1, r1 c2q, r1 c2q+1]
      for (int q = 0; q < 8; ++q) mh[q] = ml[q] = vdupq_n_s32(0);
#pragma GCC unroll 4
      for (int c = 0; c < kBlock / 8; ++c) {
        int8x16_t lo[4], hi[4], cols[8];
        unpack_record(tr.rec0 + (b * (kBlock / 8) + c) * tr.stride, lo, hi);
        for (int j = 0; j < 4; ++j) {
          const int32x4_t l = vreinterpretq_s32_s8(lo[j]), h = vreinterpretq_s32_s8(hi[j]);
          cols[2 * j] = vreinterpretq_s8_s32(vzip1q_s32(l, h));
          cols[2 * j + 1] = vreinterpretq_s8_s32(vzip2q_s32(l, h));
        }
        const int64_t off = b * kBlock + c * 8;
        const int8x16_t a = vcombine_s8(load8(x0 + off), load8(x1 + off));
        for (int q = 0; q < 8; ++q) mh[q] = vmmlaq_s32(mh[q], a, cols[q]);
        if (kWide) {
          const int8x16_t al = vcombine_s8(load8(x0 + w.kp + off), load8(x1 + w.kp + off));
          for (int q = 0; q < 8; ++q) ml[q] = vmmlaq_s32(ml[q], al, cols[q]);
        }
      }
      for (int j = 0; j < 4; ++j) {
        // Columns 4j..4j+3 of each row from the pairs (2j: columns 4j, 4j+1) and (2j+1: 4j+2, 4j+3).
        const int64x2_t h0 = vreinterpretq_s64_s32(mh[2 * j]), h1 = vreinterpretq_s64_s32(mh[2 * j + 1]);
        const int64x2_t l0 = vreinterpretq_s64_s32(ml[2 * j]), l1 = vreinterpretq_s64_s32(ml[2 * j + 1]);
        accg[0][j] = fold_block<kWide>(vreinterpretq_s32_s64(vzip1q_s64(h0, h1)),
                                       vreinterpretq_s32_s64(vzip1q_s64(l0, l1)), dr[0][b], accg[0][j]);
        accg[1][j] = fold_block<kWide>(vreinterpretq_s32_s64(vzip2q_s64(h0, h1)),
                                       vreinterpretq_s32_s64(vzip2q_s64(l0, l1)), dr[1][b], accg[1][j]);
      }
    }
    for (int rr = 0; rr < 2; ++rr) fold_group(w, t, g, gr[rr][g], accg[rr], out[rr]);
  }
  for (int rr = 0; rr < 2; ++rr) store_tile(w, t, out[rr], y + (r0 + rr) * ldy);
}
#endif

template <bool kWide>
inline void tile_all_rows(const W4Prepared& w, const XQuant& xq, int64_t t, float* y, int64_t ldy) {
  int64_t r = 0;
#if LAVIN_NEON_LEVEL >= 2
  for (; r + 2 <= xq.m; r += 2) tile_pair_smmla<kWide>(w, xq, t, r, y, ldy);
#else
  for (; r + 2 <= xq.m; r += 2) tile_rows_sdot<2, kWide>(w, xq, t, r, y, ldy);
#endif
  if (r < xq.m) tile_rows_sdot<1, kWide>(w, xq, t, r, y, ldy);
}
#endif

// Threads take one tile each, in layout order: a unit's 4 tiles are neighbours, so a thread's consecutive tiles
// share the unit's stream (the records of a unit's tiles are interleaved chunk by chunk).
template <bool kWide>
void gemm(const W4Prepared& w, const XQuant& xq, float* y, int64_t ldy, int threads) {
  const int64_t tiles = w.np / kTile;
#pragma omp parallel for schedule(dynamic, kUnit) num_threads(threads)
  for (int64_t t = 0; t < tiles; ++t) tile_all_rows<kWide>(w, xq, t, y, ldy);
}

}  // namespace

void LAVIN_NEON_GEMM(const W4Prepared& w, const XQuant& xq, float* y, int64_t ldy, int threads) {
  if (xq.fmt == ActFormat::kInt16) {
    gemm<true>(w, xq, y, ldy, threads);
  } else {
    gemm<false>(w, xq, y, ldy, threads);
  }
}

}  // namespace lavin
