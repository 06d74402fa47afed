// The CUDA W4 kernels run on the CPU, warp by warp and lane by lane, with the per-lane code of
// csrc/cuda/w4_lane.h and its exact fp16 emulation: the oracle the GPU kernel must equal bit for bit.
// Compiled with -ffp-contract=off (the fp32 adds and the double-precision rounding must stay separate).
#include <vector>

#include "gemv_api.h"
#include "w4_lane.h"

namespace lavin {
namespace lane {
namespace {

template <int M>
void emulate(const uint16_t* x, const uint32_t* qw, const uint32_t* sz, void* out, int64_t ldo, int kind, int64_t n,
             int64_t k, int64_t gs) {
  using Acc = float[kRowsPerWarp][M];
  std::vector<float> lanes(static_cast<size_t>(kWarp) * kRowsPerWarp * M), next(lanes.size());
  auto at = [](std::vector<float>& v, int l, int r, int i) -> float& { return v[(l * kRowsPerWarp + r) * M + i]; };
  for (int64_t row0 = 0; row0 < n; row0 += kRowsPerWarp) {
    for (int l = 0; l < kWarp; ++l) {
      Acc acc;
      lane_partials<M>(l, row0, x, k, qw, sz, n, k, gs, acc);
      for (int r = 0; r < kRowsPerWarp; ++r)
        for (int i = 0; i < M; ++i) at(lanes, l, r, i) = acc[r][i];
    }
    // __shfl_xor_sync butterfly: lane l adds lane l ^ o's value, o = 16, 8, 4, 2, 1.
    for (int o = kWarp / 2; o > 0; o >>= 1) {
      for (int l = 0; l < kWarp; ++l)
        for (int r = 0; r < kRowsPerWarp; ++r)
          for (int i = 0; i < M; ++i) at(next, l, r, i) = at(lanes, l, r, i) + at(lanes, l ^ o, r, i);
      lanes.swap(next);
    }
    for (int r = 0; r < kRowsPerWarp; ++r)
      for (int i = 0; i < M; ++i)
        if (row0 + r < n) store_out(out, ldo, kind, i, row0 + r, at(lanes, (r * M + i) % kWarp, r, i));
  }
}

}  // namespace

void w4_gemv_emulate(const void* x, int64_t m, const void* qw, const void* sz, void* out, int64_t ldo, int kind,
                     int64_t n, int64_t k, int64_t gs) {
  auto xs = static_cast<const uint16_t*>(x);
  auto q = static_cast<const uint32_t*>(qw);
  auto s = static_cast<const uint32_t*>(sz);
  switch (m) {
    case 1: emulate<1>(xs, q, s, out, ldo, kind, n, k, gs); break;
    case 2: emulate<2>(xs, q, s, out, ldo, kind, n, k, gs); break;
    case 3: emulate<3>(xs, q, s, out, ldo, kind, n, k, gs); break;
    case 4: emulate<4>(xs, q, s, out, ldo, kind, n, k, gs); break;
    case 5: emulate<5>(xs, q, s, out, ldo, kind, n, k, gs); break;
    case 6: emulate<6>(xs, q, s, out, ldo, kind, n, k, gs); break;
    case 7: emulate<7>(xs, q, s, out, ldo, kind, n, k, gs); break;
    case 8: emulate<8>(xs, q, s, out, ldo, kind, n, k, gs); break;
    default: break;
  }
}

void w4_dequant_emulate(const void* qw, const void* sz, void* w, int64_t n, int64_t k, int64_t gs) {
  auto dst = static_cast<uint16_t*>(w);
  for (int64_t row = 0; row < n; ++row)
    for (int64_t c = 0; c < k / kChunk; ++c) {
      HalfPair d[16];
      dequant_chunk(static_cast<const uint32_t*>(qw), static_cast<const uint32_t*>(sz), row, c, k, gs, d);
      for (int t = 0; t < 16; ++t) {
        dst[row * k + c * kChunk + 2 * t] = float_to_half_bits(d[t].x);
        dst[row * k + c * kChunk + 2 * t + 1] = float_to_half_bits(d[t].y);
      }
    }
}

}  // namespace lane
}  // namespace lavin
