// Per-lane code of the W4 decode GEMV (csrc/cuda/gemv.cu), written once for the GPU and for the CPU
// emulation (csrc/cuda/lane_emulate.cpp, which runs a warp lane by lane). See csrc/cuda/README.md for the
// layout and where each choice comes from.
//
// On the device the fp16 type is __half2 and every operation an explicit round-to-nearest PTX instruction
// (lop3, sub.rn/mul.rn/fma.rn.f16x2): nothing is left for ptxas to contract. On the host (no __CUDACC__)
// HalfPair holds the two fp16 values as floats and each operation computes the exact result in double and
// rounds it once to fp16 (an fma's residual breaks a tie exactly), so the emulation equals the GPU bit for bit.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#define LV_HD __host__ __device__ __forceinline__
#define LV_UNROLL _Pragma("unroll")
// Two chunks in flight for M <= 2; from M = 3 on, a chunk's activation loads keep the lane busy.
#define LV_UNROLL_CHUNKS _Pragma("unroll (M <= 2 ? 2 : 1)")
#else
#define LV_HD inline
#define LV_UNROLL
#define LV_UNROLL_CHUNKS
#endif

namespace lavin {
namespace lane {

constexpr int kWarp = 32;
constexpr int kChunk = 32;       // inputs per 128-bit weight load (4 words of 8 nibbles)
constexpr int kRowsPerWarp = 4;  // weight rows a warp computes: each activation load serves all four
constexpr int kMaxM = 8;         // activation rows of the GEMV
constexpr uint32_t kNibbleMask = 0x000f000fu;
constexpr uint32_t kHalf1024x2 = 0x64006400u;  // fp16 1024.0 twice: OR-ing a nibble in gives 1024 + q

// Output modes of the epilogue.
enum OutKind : int { kStoreF16 = 0, kAddF16 = 1, kAddF32 = 2 };

struct Words4 {
  uint32_t w[4];
};

#if !defined(__CUDA_ARCH__)
// ---- host fp16 emulation -------------------------------------------------------------------------------
// The fp16 value nearest to v (ties to even), where the exact value is v + err (err: the exact rounding
// residual of v, so a double-rounded tie is resolved the way a single rounding would).
inline float round_half(double v, double err = 0.0) {
  if (v == 0.0 || !std::isfinite(v)) return static_cast<float>(v);  // zeros, infinities and NaN pass through
  const double a = std::fabs(v);
  int e = 0;
  std::frexp(a, &e);                                  // a in [2^(e-1), 2^e)
  const int ulp_exp = (e - 1 < -14 ? -14 : e - 1) - 10;  // subnormals share 2^-24
  const double q = std::ldexp(a, -ulp_exp);           // exact
  const double fl = std::floor(q), frac = q - fl;
  double r = fl;
  if (frac > 0.5) {
    r = fl + 1;
  } else if (frac == 0.5) {
    const double toward = v < 0 ? -err : err;  // residual in the direction of |v|
    if (toward > 0 || (toward == 0 && std::fmod(fl, 2.0) != 0)) r = fl + 1;
  }
  const double out = std::ldexp(r, ulp_exp);
  if (out >= 65520.0) return std::copysign(INFINITY, static_cast<float>(v));
  return std::copysign(static_cast<float>(out), static_cast<float>(v));
}

inline float half_bits_to_float(uint16_t h) {
  const int sign = h >> 15, exp = (h >> 10) & 31, man = h & 1023;
  float v;
  if (exp == 0) v = std::ldexp(static_cast<float>(man), -24);
  else if (exp == 31) v = man ? NAN : INFINITY;
  else v = std::ldexp(static_cast<float>(1024 + man), exp - 25);
  return sign ? -v : v;
}

inline uint16_t float_to_half_bits(float f) {  // f must already be an fp16 value (or inf/nan)
  const uint16_t sign = std::signbit(f) ? 0x8000 : 0;
  const float a = std::fabs(f);
  if (std::isnan(a)) return 0x7e00;
  if (std::isinf(a)) return sign | 0x7c00;
  if (a == 0.0f) return sign;
  int e = 0;
  std::frexp(a, &e);
  if (e - 1 < -14) return sign | static_cast<uint16_t>(std::ldexp(a, 24));  // subnormal
  const uint16_t man = static_cast<uint16_t>(std::ldexp(a, 11 - e)) - 1024;
  return sign | static_cast<uint16_t>((e - 1 + 15) << 10) | man;
}

struct HalfPair {
  float x, y;  // low and high fp16 values
};
inline HalfPair pair_from_bits(uint32_t b) {
  return {half_bits_to_float(static_cast<uint16_t>(b & 0xffff)), half_bits_to_float(static_cast<uint16_t>(b >> 16))};
}
inline HalfPair lo_hi_broadcast(uint32_t b, bool high) {
  const float v = half_bits_to_float(static_cast<uint16_t>(high ? b >> 16 : b & 0xffff));
  return {v, v};
}
inline HalfPair sub_rn(HalfPair a, HalfPair b) {
  return {round_half(double(a.x) - b.x), round_half(double(a.y) - b.y)};
}
inline HalfPair mul_rn(HalfPair a, HalfPair b) {
  return {round_half(double(a.x) * b.x), round_half(double(a.y) * b.y)};
}
inline float fma_rn1(float a, float b, float c) {
  const double p = double(a) * b;  // exact (11 x 11 bits)
  const double s = p + c;
  const double bb = s - p;
  const double err = (p - (s - bb)) + (double(c) - bb);  // TwoSum: s + err == p + c exactly
  return round_half(s, err);
}
inline HalfPair fma_rn(HalfPair a, HalfPair b, HalfPair c) { return {fma_rn1(a.x, b.x, c.x), fma_rn1(a.y, b.y, c.y)}; }
inline float low_f(HalfPair a) { return a.x; }
inline float high_f(HalfPair a) { return a.y; }
inline uint32_t lop3_and_or(uint32_t a, uint32_t b, uint32_t c) { return (a & b) | c; }
inline Words4 load_words4(const uint32_t* p) {
  Words4 r;
  std::memcpy(r.w, p, sizeof r.w);
  return r;
}
inline Words4 load_weights4(const uint32_t* p) { return load_words4(p); }
inline uint32_t load_word(const uint32_t* p) { return *p; }
inline float half_to_float(uint16_t h) { return half_bits_to_float(h); }
inline uint16_t float_to_half_rn(float f) { return float_to_half_bits(round_half(f)); }
#else
// ---- device ---------------------------------------------------------------------------------------------
typedef __half2 HalfPair;
__device__ __forceinline__ HalfPair pair_from_bits(uint32_t b) {
  union { uint32_t u; __half2 h; } v;
  v.u = b;
  return v.h;
}
__device__ __forceinline__ HalfPair lo_hi_broadcast(uint32_t b, bool high) {
  const __half2 h = pair_from_bits(b);
  return high ? __high2half2(h) : __low2half2(h);
}
__device__ __forceinline__ HalfPair sub_rn(HalfPair a, HalfPair b) { return __hsub2_rn(a, b); }
__device__ __forceinline__ HalfPair mul_rn(HalfPair a, HalfPair b) { return __hmul2_rn(a, b); }
__device__ __forceinline__ HalfPair fma_rn(HalfPair a, HalfPair b, HalfPair c) { return __hfma2(a, b, c); }
__device__ __forceinline__ float low_f(HalfPair a) { return __low2float(a); }
__device__ __forceinline__ float high_f(HalfPair a) { return __high2float(a); }
__device__ __forceinline__ uint32_t lop3_and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));  // 0xEA: (a & b) | c
  return d;
}
__device__ __forceinline__ Words4 load_words4(const uint32_t* p) {
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));  // one 128-bit load
  return {{v.x, v.y, v.z, v.w}};
}
// Weights are read once per call: a 128-bit read-only load that does not allocate in L1 (where x is reused).
__device__ __forceinline__ Words4 load_weights4(const uint32_t* p) {
  Words4 r;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r.w[0]), "=r"(r.w[1]), "=r"(r.w[2]), "=r"(r.w[3])
               : "l"(p));
  return r;
}
__device__ __forceinline__ uint32_t load_word(const uint32_t* p) { return __ldg(p); }
__device__ __forceinline__ float half_to_float(uint16_t h) { return __half2float(__ushort_as_half(h)); }
__device__ __forceinline__ uint16_t float_to_half_rn(float f) { return __half_as_ushort(__float2half_rn(f)); }
#endif

// ---- the lane code (identical on both sides) ------------------------------------------------------------

// Word `w` of a repacked chunk -> its 8 weights as 4 half pairs (inputs 2j, 2j+1), dequantized
// fp16(s * (q - z)): (1024 + q) - (1024 + z) is exact, the product rounds once. `sz`: (s, 1024 + z) bits.
LV_HD void dequant_word(uint32_t w, uint32_t sz, HalfPair (&out)[4]) {
  const HalfPair s = lo_hi_broadcast(sz, false), z = lo_hi_broadcast(sz, true);
LV_UNROLL
  for (int j = 0; j < 4; ++j) out[j] = mul_rn(sub_rn(pair_from_bits(lop3_and_or(w >> (4 * j), kNibbleMask, kHalf1024x2)), z), s);
}

// Dot product of 8 weights with 8 fp16 activations (one 128-bit load): fp16 products summed by fma in one
// half pair, the pair's two halves added in fp32.
LV_HD float dot_word(const HalfPair (&wq)[4], const Words4& xw) {
  HalfPair a = mul_rn(wq[0], pair_from_bits(xw.w[0]));
LV_UNROLL
  for (int j = 1; j < 4; ++j) a = fma_rn(wq[j], pair_from_bits(xw.w[j]), a);
  return low_f(a) + high_f(a);
}

// One lane's partial sums over its chunks (c = lane, lane + 32, ...) for weight rows row0 .. row0 + 3
// (rows past n read row n - 1 and are never stored). x: fp16 [M][ldx] gathered in group order; qw: the
// repacked words [n][k/8]; sz: (s, 1024 + z) [n][k/gs]. acc[r][i]: row r, activation row i.
template <int M>
LV_HD void lane_partials(int lane, int64_t row0, const uint16_t* x, int64_t ldx, const uint32_t* qw,
                         const uint32_t* sz, int64_t n, int64_t k, int64_t gs, float (&acc)[kRowsPerWarp][M]) {
LV_UNROLL
  for (int r = 0; r < kRowsPerWarp; ++r)
LV_UNROLL
    for (int i = 0; i < M; ++i) acc[r][i] = 0.0f;
  const int64_t kw = k / 8, groups = k / gs;
  const int chunks = static_cast<int>(k / kChunk);
  const uint32_t* wbase = qw + row0 * kw;  // rows are addressed from one base: fewer live 64-bit registers
  const uint32_t* sbase = sz + row0 * groups;
  const int rlast = n - row0 - 1 < kRowsPerWarp - 1 ? static_cast<int>(n - row0 - 1) : kRowsPerWarp - 1;
LV_UNROLL_CHUNKS
  for (int c = lane; c < chunks; c += kWarp) {
    Words4 w[kRowsPerWarp];
    uint32_t s[kRowsPerWarp];
    const int64_t g = static_cast<int64_t>(c) * kChunk / gs;  // gs is a multiple of 32: one group per chunk
LV_UNROLL
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int rr = r < rlast ? r : rlast;
      w[r] = load_weights4(wbase + rr * kw + 4 * c);
      s[r] = load_word(sbase + rr * groups + g);
    }
LV_UNROLL
    for (int j = 0; j < 4; ++j) {
      HalfPair dq[kRowsPerWarp][4];
LV_UNROLL
      for (int r = 0; r < kRowsPerWarp; ++r) dequant_word(w[r].w[j], s[r], dq[r]);
LV_UNROLL
      for (int i = 0; i < M; ++i) {
        const Words4 xw = load_words4(reinterpret_cast<const uint32_t*>(x + i * ldx + c * kChunk + 8 * j));
LV_UNROLL
        for (int r = 0; r < kRowsPerWarp; ++r) acc[r][i] += dot_word(dq[r], xw);
      }
    }
  }
}

// The epilogue of one output element: store fp16, or add into fp16 (one rounding after the fp32 add) / fp32.
LV_HD void store_out(void* out, int64_t ldo, int kind, int64_t i, int64_t col, float v) {
  if (kind == kAddF32) {
    float* o = static_cast<float*>(out) + i * ldo + col;
    *o = *o + v;
  } else {
    uint16_t* o = static_cast<uint16_t*>(out) + i * ldo + col;
    *o = float_to_half_rn(kind == kAddF16 ? half_to_float(*o) + v : v);
  }
}

// The dequantized weights of one chunk (32 inputs of row `row`), for the prefill's dequantize kernel.
LV_HD void dequant_chunk(const uint32_t* qw, const uint32_t* sz, int64_t row, int64_t c, int64_t k, int64_t gs,
                         HalfPair (&out)[16]) {
  const Words4 w = load_weights4(qw + row * (k / 8) + 4 * c);
  const uint32_t s = load_word(sz + row * (k / gs) + c * kChunk / gs);
LV_UNROLL
  for (int j = 0; j < 4; ++j) {
    HalfPair d[4];
    dequant_word(w.w[j], s, d);
LV_UNROLL
    for (int t = 0; t < 4; ++t) out[4 * j + t] = d[t];
  }
}

}  // namespace lane
}  // namespace lavin
