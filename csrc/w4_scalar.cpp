// Scalar W4 kernels: activation quantization (shared by every ISA; formats in kernels.h), the
// generic integer kernel on the prepared layout (the reference the SIMD kernels are tested
// against, bit for bit in practice), and a double-accumulating oracle straight on the GPTQ
// checkpoint layout.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_features.h"
#include "kernels.h"

namespace lavin {

ActFormat act_format_from_env() {
  const char* v = std::getenv("LAVIN_EDGE_W4_ACT");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "int16") == 0) return ActFormat::kInt16;
  if (std::strcmp(v, "int8") == 0) return ActFormat::kInt8;
  throw std::invalid_argument(std::string("LAVIN_EDGE_W4_ACT=") + v + ": expected int16 (the default) or int8");
}

XQuant quantize_activations(const float* x, int64_t ldx, const W4Prepared& w, int64_t m, ActFormat fmt, int8_t* q,
                            float* d, float* gsum) {
#ifdef LAVIN_EDGE_BUILD_X86
  if (cpu_features().can_avx512()) return quantize_activations_avx512(x, ldx, w, m, fmt, q, d, gsum);
#endif
#ifdef LAVIN_EDGE_BUILD_NEON
  if (cpu_features().can_neon()) return quantize_activations_neon(x, ldx, w, m, fmt, q, d, gsum);
#endif
  return quantize_activations_scalar(x, ldx, w, m, fmt, q, d, gsum);
}

XQuant quantize_activations_scalar(const float* x, int64_t ldx, const W4Prepared& w, int64_t m, ActFormat fmt,
                                   int8_t* q, float* d, float* gsum) {
  const int64_t nblocks = w.kp / kBlock;
  const int64_t row_bytes = act_row_bytes(w.kp);
  const bool wide = fmt == ActFormat::kInt16;
  const float qmax = static_cast<float>(wide ? kInt16Max : kInt8Max);
#pragma omp parallel for schedule(static) if (m >= 4)
  for (int64_t r = 0; r < m; ++r) {
    const float* xr = x + r * ldx;
    int8_t* hr = q + r * row_bytes;  // high plane (the whole value for kInt8)
    int8_t* lr = hr + w.kp;          // low plane (kInt16)
    float* dr = d + r * nblocks;
    float* gr = gsum + r * w.groups;
    float buf[kBlock];
    for (int64_t g = 0; g < w.groups; ++g) gr[g] = 0.0f;
    for (int64_t b = 0; b < nblocks; ++b) {
      // Gather (act-order) and zero-pad: rows >= k contribute nothing.
      float amax = 0.0f;
      for (int i = 0; i < kBlock; ++i) {
        const int64_t kk = b * kBlock + i;
        float v = 0.0f;
        if (kk < w.k) v = xr[w.perm ? w.perm[kk] : kk];
        buf[i] = v;
        amax = std::max(amax, std::fabs(v));
      }
      // Symmetric in [-qmax, qmax]. int8: |q| <= 127 keeps the AVX2 int16 partial sums of a whole
      // block (8 products of <= 15*127, summed in pairs) below 32767; int16: so does each plane.
      const float dscale = amax / qmax;
      const float inv = amax > 0.0f ? qmax / amax : 0.0f;
      int32_t bsum = 0;
      for (int i = 0; i < kBlock; ++i) {
        float t = std::nearbyint(buf[i] * inv);
        t = std::min(qmax, std::max(-qmax, t));
        const int32_t qi = static_cast<int32_t>(t);
        if (wide) {
          // q = 256 hi + lo, hi = floor((q + 128) / 256) (the +65536 keeps the shift on a non-negative value).
          const int32_t hi = ((qi + 128 + 65536) >> 8) - 256;
          hr[b * kBlock + i] = static_cast<int8_t>(hi);
          lr[b * kBlock + i] = static_cast<int8_t>(qi - 256 * hi);
        } else {
          hr[b * kBlock + i] = static_cast<int8_t>(qi);
        }
        bsum += qi;
      }
      dr[b] = dscale;
      gr[b / w.blocks_per_group] += dscale * static_cast<float>(bsum);
    }
  }
  return XQuant{q, d, gsum, m, fmt};
}

// One 8-row chunk of one plane against one 64-byte record: the u8 x s8 products the SIMD kernels form.
static inline void dot_record(const uint8_t* rec, const int8_t* xc, int32_t* isum) {
  for (int i = 0; i < kTile; ++i) {
    for (int byte = 0; byte < 4; ++byte) {
      const uint8_t v = rec[i * 4 + byte];
      isum[i] += (v & 0xF) * xc[byte] + (v >> 4) * xc[byte + 4];
    }
  }
}

void w4_gemm_generic(const W4Prepared& w, const XQuant& xq, float* y, int64_t ldy, int threads) {
  const int64_t tiles = w.np / kTile;
  const int64_t chunks = w.kp / 8;  // 64-byte records per tile
  const int64_t nblocks = w.kp / kBlock;
  const int64_t row_bytes = act_row_bytes(w.kp);
  const bool wide = xq.fmt == ActFormat::kInt16;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t t = 0; t < tiles; ++t) {
    for (int64_t r = 0; r < xq.m; ++r) {
      const int8_t* xr = xq.q + r * row_bytes;
      const int8_t* xl = xr + w.kp;
      const float* dr = xq.d + r * nblocks;
      const float* gr = xq.gsum + r * w.groups;
      float out[kTile] = {0};
      for (int64_t g = 0; g < w.groups; ++g) {
        float accg[kTile] = {0};
        for (int64_t bi = 0; bi < w.blocks_per_group; ++bi) {
          const int64_t b = g * w.blocks_per_group + bi;
          int32_t isum[kTile] = {0}, lsum[kTile] = {0};
          for (int c = 0; c < kBlock / 8; ++c) {
            const uint8_t* rec = w.qw + w4_record_offset(t, b * (kBlock / 8) + c, tiles, chunks);
            dot_record(rec, xr + b * kBlock + c * 8, isum);
            if (wide) dot_record(rec, xl + b * kBlock + c * 8, lsum);
          }
          for (int i = 0; i < kTile; ++i) {
            const int32_t s = wide ? isum[i] * 256 + lsum[i] : isum[i];
            accg[i] = std::fma(static_cast<float>(s), dr[b], accg[i]);
          }
        }
        const uint16_t* sc = w.scales + (t * w.groups + g) * kTile;
        const uint8_t* zp = w.zeros + (t * w.groups + g) * kTile;
        for (int i = 0; i < kTile; ++i) {
          const float corr = std::fma(-static_cast<float>(zp[i]), gr[g], accg[i]);
          out[i] = std::fma(half_to_float(sc[i]), corr, out[i]);
        }
      }
      const int64_t n0 = t * kTile;
      for (int i = 0; i < kTile && n0 + i < w.n; ++i) y[r * ldy + n0 + i] = out[i];
    }
  }
}

void w4_repack_gptq(const int32_t* qweight, int64_t n, int64_t k, const int32_t* perm, int64_t np, int64_t kp,
                    uint8_t* out, int threads) {
  // record (t, c) [i][b] = q[row(8c+b), 16t+i] | q[row(8c+b+4), 16t+i] << 4, where row(j) = perm[j]
  // (act-order) or j, and q = 0 outside the true k x n (padding); records in kernels.h's unit order.
  const uint32_t* qw = reinterpret_cast<const uint32_t*>(qweight);
  const int64_t tiles = np / kTile, chunks = kp / 8;
  auto nibble = [&](int64_t j, int64_t col) -> uint8_t {
    if (j >= k || col >= n) return 0;
    const int64_t row = perm ? perm[j] : j;
    return static_cast<uint8_t>((qw[(row / 8) * n + col] >> ((row % 8) * 4)) & 0xFu);
  };
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t t = 0; t < tiles; ++t) {
    const bool full_tile = (t + 1) * kTile <= n;
    for (int64_t c = 0; c < chunks; ++c) {
      uint8_t* rec = out + w4_record_offset(t, c, tiles, chunks);
      if (full_tile && 8 * c + 8 <= k) {
        // Interior records (all but the padding edges): one 16-column row read per source row, in a
        // loop the compiler vectorises; this runs at every model load, so it must not be per nibble.
        uint8_t nib[8][kTile];
        for (int b = 0; b < 8; ++b) {
          const int64_t row = perm ? perm[8 * c + b] : 8 * c + b;
          const uint32_t* src = qw + (row / 8) * n + t * kTile;
          const unsigned shift = static_cast<unsigned>(row % 8) * 4;
          for (int i = 0; i < kTile; ++i) nib[b][i] = static_cast<uint8_t>((src[i] >> shift) & 0xFu);
        }
        for (int i = 0; i < kTile; ++i)
          for (int b = 0; b < 4; ++b) rec[i * 4 + b] = static_cast<uint8_t>(nib[b][i] | (nib[b + 4][i] << 4));
        continue;
      }
      for (int i = 0; i < kTile; ++i) {
        const int64_t col = t * kTile + i;
        for (int b = 0; b < 4; ++b)
          rec[i * 4 + b] = static_cast<uint8_t>(nibble(8 * c + b, col) | (nibble(8 * c + b + 4, col) << 4));
      }
    }
  }
}

void w4_gemm_gptq_reference(const float* x, int64_t m, const int32_t* qweight, const int32_t* qzeros,
                            const uint16_t* scales, const int32_t* g_idx, int64_t n, int64_t k,
                            int64_t groups, int64_t group_size, int zero_offset, float* y, int threads) {
  constexpr int64_t kCols = 64;
  const int64_t nz = (n + 7) / 8;
  const int64_t col_blocks = (n + kCols - 1) / kCols;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t cb = 0; cb < col_blocks; ++cb) {
    const int64_t n0 = cb * kCols;
    const int64_t n1 = std::min(n, n0 + kCols);
    std::vector<double> acc(static_cast<size_t>(m * kCols), 0.0);
    for (int64_t kk = 0; kk < k; ++kk) {
      int64_t g = g_idx ? g_idx[kk] : kk / group_size;
      if (g < 0 || g >= groups) continue;  // validated before; never read out of bounds
      const uint32_t* row = reinterpret_cast<const uint32_t*>(qweight) + (kk / 8) * n;
      const unsigned shift = static_cast<unsigned>(kk % 8) * 4;
      for (int64_t j = n0; j < n1; ++j) {
        const int q = static_cast<int>((row[j] >> shift) & 0xFu);
        const uint32_t zword = static_cast<uint32_t>(qzeros[g * nz + j / 8]);
        const int z = static_cast<int>((zword >> ((j % 8) * 4)) & 0xFu) + zero_offset;
        const float wv = half_to_float(scales[g * n + j]) * static_cast<float>(q - z);
        for (int64_t r = 0; r < m; ++r) acc[r * kCols + (j - n0)] += static_cast<double>(wv) * x[r * k + kk];
      }
    }
    for (int64_t r = 0; r < m; ++r)
      for (int64_t j = n0; j < n1; ++j) y[r * n + j] = static_cast<float>(acc[r * kCols + (j - n0)]);
  }
}

}  // namespace lavin
