// The AArch64 baseline unit (Advanced SIMD only, every AArch64 CPU): the W4 kernel without the dot product
// (w4_neon_impl.h), the activation quantizer every NEON backend runs, and the NEON build of the adapters.
#define LAVIN_NEON_LEVEL 0
#define LAVIN_NEON_GEMM w4_gemm_neon
#include "w4_neon_impl.h"

namespace lavin {

XQuant quantize_activations_neon(const float* x, int64_t ldx, const W4Prepared& w, int64_t m, ActFormat fmt,
                                 int8_t* q, float* d, float* gsum) {
  // The scalar quantize_activations_scalar (w4_scalar.cpp), 4 lanes at a time: the same float multiply, round to
  // nearest even (frintn, as nearbyint in the default mode), clamp, and exact integer splits and sums; the
  // per-block float bookkeeping stays scalar and in the same order, so the bytes and floats are the same.
  const int64_t nblocks = w.kp / kBlock;
  const int64_t row_bytes = act_row_bytes(w.kp);
  const bool wide = fmt == ActFormat::kInt16;
  const float qmax = static_cast<float>(wide ? kInt16Max : kInt8Max);
  const float32x4_t vqmax = vdupq_n_f32(qmax), vqmin = vdupq_n_f32(-qmax);
#pragma omp parallel for schedule(static) if (m >= 4)
  for (int64_t r = 0; r < m; ++r) {
    const float* xr = x + r * ldx;
    int8_t* hr = q + r * row_bytes;
    int8_t* lr = hr + w.kp;
    float* dr = d + r * nblocks;
    float* gr = gsum + r * w.groups;
    for (int64_t g = 0; g < w.groups; ++g) gr[g] = 0.0f;
    for (int64_t b = 0; b < nblocks; ++b) {
      float buf[kBlock];
      const int64_t k0 = b * kBlock;
      if (!w.perm && k0 + kBlock <= w.k) {
        std::memcpy(buf, xr + k0, sizeof buf);
      } else {  // gather (act-order) and zero-pad
        for (int i = 0; i < kBlock; ++i) buf[i] = k0 + i < w.k ? xr[w.perm ? w.perm[k0 + i] : k0 + i] : 0.0f;
      }
      float32x4_t v[kBlock / 4];
      float32x4_t amax = vdupq_n_f32(0.0f);
      for (int i = 0; i < kBlock / 4; ++i) {
        v[i] = vld1q_f32(buf + 4 * i);
        amax = vmaxnmq_f32(amax, vabsq_f32(v[i]));  // a NaN input keeps amax, as std::max does
      }
      const float am = vmaxnmvq_f32(amax);
      const float dscale = am / qmax;
      const float32x4_t inv = vdupq_n_f32(am > 0.0f ? qmax / am : 0.0f);
      int32x4_t bsum = vdupq_n_s32(0);
      int32x4_t qi[kBlock / 4];
      for (int i = 0; i < kBlock / 4; ++i) {
        // maxnm/minnm: a NaN product clamps to -qmax, as std::max(-qmax, nan) does.
        const float32x4_t t = vminnmq_f32(vqmax, vmaxnmq_f32(vqmin, vrndnq_f32(vmulq_f32(v[i], inv))));
        qi[i] = vcvtq_s32_f32(t);
        bsum = vaddq_s32(bsum, qi[i]);
      }
      for (int i = 0; i < kBlock / 8; ++i) {
        int32x4_t a = qi[2 * i], c = qi[2 * i + 1];
        if (wide) {
          const int32x4_t off = vdupq_n_s32(128 + 65536), base = vdupq_n_s32(256);
          const int32x4_t ha = vsubq_s32(vshrq_n_s32(vaddq_s32(a, off), 8), base);
          const int32x4_t hc = vsubq_s32(vshrq_n_s32(vaddq_s32(c, off), 8), base);
          const int32x4_t la = vsubq_s32(a, vshlq_n_s32(ha, 8)), lc = vsubq_s32(c, vshlq_n_s32(hc, 8));
          vst1_s8(lr + b * kBlock + 8 * i, vmovn_s16(vcombine_s16(vmovn_s32(la), vmovn_s32(lc))));
          a = ha;
          c = hc;
        }
        vst1_s8(hr + b * kBlock + 8 * i, vmovn_s16(vcombine_s16(vmovn_s32(a), vmovn_s32(c))));
      }
      dr[b] = dscale;
      gr[b / w.blocks_per_group] += dscale * static_cast<float>(vaddvq_s32(bsum));
    }
  }
  return XQuant{q, d, gsum, m, fmt};
}

}  // namespace lavin

#define LAVIN_ADAPTER_SUFFIX neon
#include "adapters_simd.h"
