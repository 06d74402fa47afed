// Shared declarations of the lavin-edge CPU kernels.
//
// Every kernel takes raw pointers: the Python wrappers (lavin_edge/kernels/) have
// already checked dtype, device, contiguity and shapes, and bindings.cpp re-checks the
// shapes it is given before calling in here. Nothing in this file allocates or validates.
#pragma once

#include <cstdint>
#include <cstring>
#include <cmath>
#include <vector>

#include "adapter_limits.h"

namespace lavin {

// ---------------------------------------------------------------------------------------
// W4 GEMM, prepared ("tiled") layout.
//
// Built once at load by lavin_edge.kernels.prepare_w4 from a GPTQ checkpoint:
//   * act-order rows are permuted so that every quantization group is a contiguous run of
//     K rows (the permutation `perm` is kept and x is gathered by it at run time);
//   * K is padded with zero rows to Kp, a multiple of kBlock (x is zero-padded likewise, so
//     the padding never contributes);
//   * N is padded to Np, a multiple of kTile columns;
//   * weights: for tile t (16 output columns) and k-chunk c (8 rows) one 64-byte record:
//     32-bit lane i = column 16t+i, byte b of that lane = q[8c+b] | q[8c+b+4] << 4.
//     So `v & 0xF` gives, per column, the 4 values of rows 8c..8c+3 and `v >> 4 & 0xF`
//     rows 8c+4..8c+7: exactly the u8 operand of vpdpbusd against 4 broadcast x bytes.
//     Records are interleaved by units of kUnit = 4 tiles: unit u (tiles 4u..4u+3) holds, for
//     c = 0, 1, ..., the records of its 4 tiles side by side (256 bytes per chunk), units follow
//     each other; the last unit may have fewer tiles (Np/16 % 4) and then the same order with
//     that many (w4_record_offset). Why: the SIMD kernels work on 4 tiles at once (independent
//     dot-product chains, activation broadcasts shared by 4 tiles), and this order makes those 4
//     tiles one contiguous stream; with tiles one after the other they were 4 streams of
//     Kp/8 * 64 bytes each, too short at small k (4.6 KiB at k = 576) for the hardware
//     prefetcher, which then ran slower than one tile at a time.
//   * scales: fp16 bits [Np/16][G][16] (the checkpoint's values, unchanged);
//   * zeros:  uint8     [Np/16][G][16] (true zero point, 0..16: v1's stored zero-1 is
//     normalised at load).
// y[m, n] = sum_g s[g,n] * (sum_{k in g} q[k,n] x[m,k] - z[g,n] sum_{k in g} x[m,k]).
constexpr int kTile = 16;   // output columns per tile (one zmm of int32 lanes)
constexpr int kBlock = 32;  // rows per activation block (one float scale each)
constexpr int kUnit = 4;    // tiles whose records are interleaved (above)

// Byte offset in W4Prepared::qw of the record of tile t, k-chunk c (tiles = Np/16, chunks = Kp/8).
inline int64_t w4_record_offset(int64_t t, int64_t c, int64_t tiles, int64_t chunks) {
  const int64_t u0 = t - t % kUnit;                                // first tile of t's unit
  const int64_t nt = tiles - u0 < kUnit ? tiles - u0 : kUnit;     // tiles in that unit
  return (u0 * chunks + c * nt + (t - u0)) * 64;
}

struct W4Prepared {
  const uint8_t* qw = nullptr;       // Np/16 * Kp/8 records of 64 bytes, order above
  const uint16_t* scales = nullptr;  // [Np/16][G][16] fp16 bits
  const uint8_t* zeros = nullptr;    // [Np/16][G][16]
  const int32_t* perm = nullptr;     // [K] or nullptr: x is read as x[perm[k]]
  int64_t n = 0, np = 0;             // true and padded output columns
  int64_t k = 0, kp = 0;             // true and padded input rows
  int64_t groups = 0;                // G
  int64_t blocks_per_group = 0;      // Kp / kBlock / G
};

// ---------------------------------------------------------------------------------------
// Activations, quantized once per matmul: per row, blocks of kBlock values with one float
// scale d per block, symmetric integers q with x ~ d q.
//
//   kInt16 (default): q = round(x * kInt16Max / amax) in [-32639, 32639] (15 bits + sign).
//     Stored as two int8 planes per row, q = 256 hi + lo with hi = floor((q + 128) / 256) in
//     [-127, 127] and lo in [-128, 127]: the kernels run the same u8 x s8 dot products
//     (vpdpbusd / maddubs) once per plane on the same unpacked weights and combine the two
//     integer sums exactly, 256 * sum(w hi) + sum(w lo) = sum(w q) (|sum| <= 32*15*32639 <
//     2^24, so its float conversion is exact too). Why: SmolLM2-class LLMs carry a few
//     massive activation channels; in an int8 block of 32 one of them leaves the other 31
//     values with a few levels or none, which moved ~6% of the engine's next-token choices
//     away from the exact 4-bit model. 15 bits keep them (README, "Accuracy of the engine").
//   kInt8: q = round(x * 127 / amax) in [-127, 127], one plane (llama.cpp's Q8_0): half the
//     dot products, the format of earlier releases, kept as LAVIN_EDGE_W4_ACT=int8 (the CLI's
//     --activations int8). At m = 1 both formats are bound by the weight stream; the second
//     plane costs compute at m > 1 (prefill).
//
// gsum holds, per group, the sum of the dequantized x (sum of d * sum q over the group's
// blocks), which folds the zero point out of the inner loop.
enum class ActFormat : int32_t { kInt8 = 0, kInt16 = 1 };
constexpr int32_t kInt8Max = 127;
constexpr int32_t kInt16Max = 127 * 256 + 127;  // both planes stay inside int8

struct XQuant {
  const int8_t* q = nullptr;    // [m][act_row_bytes(Kp)]: high plane at +0, low plane (kInt16) at +Kp
  const float* d = nullptr;     // [m][Kp/kBlock]
  const float* gsum = nullptr;  // [m][G]
  int64_t m = 0;
  ActFormat fmt = ActFormat::kInt16;
};

// Bytes of q per activation row, whatever the format (buffers are sized once for either).
inline int64_t act_row_bytes(int64_t kp) { return 2 * kp; }

// The format chosen by $LAVIN_EDGE_W4_ACT ("int16", the default, or "int8"); anything else
// throws std::invalid_argument naming the valid values.
ActFormat act_format_from_env();

// Quantize (and gather by perm, and zero-pad) the rows of x [m][k] (row stride ldx) into q
// (m * act_row_bytes(kp) bytes), d and gsum; returns the descriptor the GEMMs take.
// quantize_activations runs the AVX-512 build when the CPU has it, else the scalar one; the two
// give the same bytes and floats to the last bit (same operations in the same order; the scalar
// loop is kept as the readable reference and for the "scalar" backend). Why a SIMD build: the
// scalar loop calls libm's nearbyint per value, which cost ~5% of a k = 11008 GEMV.
XQuant quantize_activations(const float* x, int64_t ldx, const W4Prepared& w, int64_t m, ActFormat fmt, int8_t* q,
                            float* d, float* gsum);
XQuant quantize_activations_scalar(const float* x, int64_t ldx, const W4Prepared& w, int64_t m, ActFormat fmt,
                                   int8_t* q, float* d, float* gsum);
XQuant quantize_activations_avx512(const float* x, int64_t ldx, const W4Prepared& w, int64_t m, ActFormat fmt,
                                   int8_t* q, float* d, float* gsum);
XQuant quantize_activations_neon(const float* x, int64_t ldx, const W4Prepared& w, int64_t m, ActFormat fmt,
                                 int8_t* q, float* d, float* gsum);
using QuantizeFn = XQuant (*)(const float*, int64_t, const W4Prepared&, int64_t, ActFormat, int8_t*, float*, float*);

// y [m][n] (row stride ldy) = x W^T on the prepared layout. One per ISA; the generic one is
// the scalar reference of the integer algorithm (the SIMD ones agree with it to the last bit
// in practice: all three use the same operation order and explicit FMAs).
void w4_gemm_generic(const W4Prepared& w, const XQuant& xq, float* y, int64_t ldy, int threads);
void w4_gemm_avx2(const W4Prepared& w, const XQuant& xq, float* y, int64_t ldy, int threads);
void w4_gemm_avx512(const W4Prepared& w, const XQuant& xq, float* y, int64_t ldy, int threads);
// AArch64: plain Advanced SIMD (no dot product: Cortex-A72, Raspberry Pi 4), the int8 dot product (sdot), and
// the int8 matrix multiply (smmla, for m >= 2; its m = 1 rows run the sdot kernel).
void w4_gemm_neon(const W4Prepared& w, const XQuant& xq, float* y, int64_t ldy, int threads);
void w4_gemm_neon_dotprod(const W4Prepared& w, const XQuant& xq, float* y, int64_t ldy, int threads);
void w4_gemm_neon_i8mm(const W4Prepared& w, const XQuant& xq, float* y, int64_t ldy, int threads);

// One-time repack of a GPTQ qweight int32 [k/8][n] (rows gathered by perm when given) into
// the prepared layout above: out must hold np/16 * kp/8 * 64 bytes.
void w4_repack_gptq(const int32_t* qweight, int64_t n, int64_t k, const int32_t* perm, int64_t np, int64_t kp,
                    uint8_t* out, int threads);

// Scalar fp reference straight on the GPTQ checkpoint layout (fp32 activations):
// qweight int32 [k/8][n], qzeros int32 [G][ceil(n/8)], scales fp16 [G][n], g_idx [k] or
// nullptr (then group = k / group_size); zero = stored + zero_offset (1 for gptq v1).
// Accumulates in double: this is the oracle, not a fast path.
void w4_gemm_gptq_reference(const float* x, int64_t m, const int32_t* qweight, const int32_t* qzeros,
                            const uint16_t* scales, const int32_t* g_idx, int64_t n, int64_t k,
                            int64_t groups, int64_t group_size, int zero_offset, float* y, int threads);

// ---------------------------------------------------------------------------------------
// Adapters (fp32 on CPU). Shapes as in docs/method.md ("Model"):
//   LLM: x [rows][D]; g [D]; A [r][D]; a [r]; U [2][D][r]; u [2][D]; modality per row 0/1.
//   ViT: x [rows][D]; A [r][D]; a [r]; R [2][D]; rb [2]; B [D][r/2]; b [D]; Dw [D][r/2]; d [D].
struct LlmAdapterArgs {
  const float* x; float* y; int64_t rows, dim, rank;
  const float *g, *A, *a, *U, *u;
  const int32_t* row_modality;  // [rows], each 0 or 1
  float eps;
};
struct VitAdapterArgs {
  const float* x; float* y; int64_t rows, dim, rank;
  const float *A, *a, *R, *rb, *B, *b, *Dw, *d;
  float temperature, scale;
};
void llm_adapter_scalar(const LlmAdapterArgs& p, int threads);
void llm_adapter_avx2(const LlmAdapterArgs& p, int threads);
void llm_adapter_avx512(const LlmAdapterArgs& p, int threads);
void vit_adapter_scalar(const VitAdapterArgs& p, int threads);
void vit_adapter_avx2(const VitAdapterArgs& p, int threads);
void vit_adapter_avx512(const VitAdapterArgs& p, int threads);
void llm_adapter_neon(const LlmAdapterArgs& p, int threads);
void vit_adapter_neon(const VitAdapterArgs& p, int threads);
using VitAdapterFn = void (*)(const VitAdapterArgs&, int);

// ---------------------------------------------------------------------------------------
// One decode step of the whole decoder in a single call: one sequence (chat), or m rows of a continuous batch
// (lavin_edge/runtime/batch.py), each row with its own token, KV cache slot, position and modality.
//
// The Python runtime (lavin_edge/runtime/engine.py, Engine.decode_step_reference; BatchDecoder.step_reference for
// m rows) is the readable reference: per layer, x += Wo attn(rope(Wqkv adapter(norm(x)))); x += W2 (silu(W1 n) *
// W3 n) with n = norm(x). Calling its ~20 ops per layer from Python costs more dispatch time than the
// GEMVs of a small model; here the same ops run back to back on preallocated buffers. With m rows every linear
// runs once as a W4 GEMM over all rows (each weight read once per step, not once per sequence), the norm +
// adapter kernel takes each row's modality, and attention runs per row over exactly that row's cached
// positions. Rows never mix: the W4 kernel and the adapter treat each row alone in a fixed order, so a row's
// logits are bitwise those of the same sequence stepped alone (step() is step_rows with m = 1).
// A linear is one or more W4 parts: parts write consecutive output columns (q|k|v when the
// act-order permutations differ) or, with `accumulate`, add into the previous part's columns
// (the lm_head's 4-bit value + 4-bit residual).
struct DecodeLinearPart {
  W4Prepared w;
  int64_t out_offset = 0;
  bool accumulate = false;
  int threads = 1;
};
struct DecodeNorm {
  const float *g, *A, *a, *U, *u;  // as LlmAdapterArgs
  int64_t rank;
};
struct DecodeLayer {
  DecodeNorm attn_in, ffn_norm;
  std::vector<DecodeLinearPart> wqkv, wo, w13, w2;
  // fp16 bits [slots][n_kv][ctx][head_dim], as llama.cpp's default cache: half the memory of fp32 and half the
  // bytes attention reads per cached position (which at long contexts is as much as the weights).
  uint16_t* k_cache;
  uint16_t* v_cache;
};
// The head's exact re-scoring (RescoredHead, lavin_edge/runtime/ops.py): after the 4-bit head, each row's `top`
// largest logits are recomputed from the fp weight rows [vocab][dim] as sums of exact products in double.
// weight == nullptr: none.
constexpr int64_t kMaxRescore = 64;
struct DecodeRescore {
  enum Dtype : int32_t { kF32 = 0, kF16 = 1, kBF16 = 2 };
  const void* weight = nullptr;
  int32_t dtype = kF32;
  int64_t top = 0;  // <= kMaxRescore
};
struct DecodeShape {
  int64_t dim, n_heads, n_kv, head_dim, ffn, ctx, vocab;
  float eps;
  const float* rope;  // [ctx][head_dim / 2][2]: cos, sin of runtime slot p
  int64_t rows = 1;   // most rows per step_rows call (the number of cache slots)
};
using W4GemmFn = void (*)(const W4Prepared&, const XQuant&, float*, int64_t, int);
// One kv head and its `group` query heads: q [group][hd]; K, V the head's cache rows [end][hd] (fp16 bits);
// sc scratch [group][ld] (ld >= end); out [group][hd] = softmax(q K^T / sqrt(hd)) V with `scale` = 1/sqrt(hd).
using AttendFn = void (*)(const float* q, const uint16_t* K, const uint16_t* V, int64_t end, int64_t hd,
                          int64_t group, float scale, int64_t ld, float* sc, float* out);
void attend_group_generic(const float* q, const uint16_t* K, const uint16_t* V, int64_t end, int64_t hd,
                          int64_t group, float scale, int64_t ld, float* sc, float* out);
void attend_group_avx2(const float* q, const uint16_t* K, const uint16_t* V, int64_t end, int64_t hd,
                       int64_t group, float scale, int64_t ld, float* sc, float* out);
void attend_group_avx512(const float* q, const uint16_t* K, const uint16_t* V, int64_t end, int64_t hd,
                         int64_t group, float scale, int64_t ld, float* sc, float* out);
void attend_group_neon(const float* q, const uint16_t* K, const uint16_t* V, int64_t end, int64_t hd,
                       int64_t group, float scale, int64_t ld, float* sc, float* out);
using LlmAdapterFn = void (*)(const LlmAdapterArgs&, int);
struct DecodeScratch;  // buffers for the most rows of a call (decode.cpp)
// Rows per prefill chunk: every weight is read once per chunk, and the chunk's scores buffer
// (rows x heads x cached positions) stays bounded for long contexts.
constexpr int64_t kPrefillChunk = 64;

class DecodeStack {
 public:
  DecodeStack(const DecodeShape& shape, W4GemmFn gemm, LlmAdapterFn adapter, AttendFn attend, int threads);
  ~DecodeStack();
  DecodeStack(const DecodeStack&) = delete;
  DecodeStack& operator=(const DecodeStack&) = delete;
  void add_layer(const DecodeLayer& layer);
  void set_head(const DecodeNorm& norm, const std::vector<DecodeLinearPart>& head, const DecodeRescore& rescore);
  // x [dim] (the new position's embedding) is overwritten with the last hidden state; out
  // receives the head's logits [vocab], or with an empty head the final-normed state [dim] for
  // the caller's own head; pos = the runtime slot (< ctx), modality 0 text / 1 image. Cache slot 0.
  void step(float* x, int64_t pos, int32_t modality, float* out);
  // The same for m <= rows rows: x [m][dim], out [m][vocab or dim]; row r writes and attends cache slot slot[r]
  // (distinct) at position pos[r] with modality[r].
  void step_rows(float* x, int64_t m, const int64_t* slot, const int64_t* pos, const int32_t* modality, float* out);
  // A prompt: x [t][dim], the embeddings of runtime positions start .. start + t - 1 of cache slot `slot` (whose
  // first `start` positions hold the history), overwritten with the last hidden states; out receives the head's
  // output for the last position only (as step()). Bitwise t calls of step() at those positions.
  void prefill(float* x, int64_t t, int64_t slot, int64_t start, int32_t modality, float* out);
  int64_t n_layers() const { return static_cast<int64_t>(layers_.size()); }

 private:
  void ensure_rows(int64_t m);
  void layers(float* x, int64_t m, const int64_t* slot, const int64_t* pos, const int32_t* modality);
  void head(const float* x, int64_t m, const int32_t* modality, float* out);
  void linear(const std::vector<DecodeLinearPart>& parts, const float* x, int64_t m, float* y, int64_t ldy);
  void norm(const DecodeNorm& n, const float* x, float* y, int64_t m, const int32_t* modality);
  void attention(const DecodeLayer& l, const float* q, int64_t m, const int64_t* slot, const int64_t* end,
                 float* out);
  void rescore(const float* xn, float* logits);
  DecodeShape shape_;
  W4GemmFn gemm_;
  LlmAdapterFn adapter_;
  AttendFn attend_;
  int threads_;
  ActFormat act_;  // $LAVIN_EDGE_W4_ACT when the stack is built
  std::vector<DecodeLayer> layers_;
  DecodeNorm head_norm_{};
  std::vector<DecodeLinearPart> head_;
  DecodeRescore rescore_{};
  DecodeScratch* s_;
};

// ---------------------------------------------------------------------------------------
// Misc.
double read_bandwidth_kernel(const void* buf, int64_t nbytes, int threads);  // returns checksum

inline float half_to_float(uint16_t h) {
  // IEEE binary16 -> binary32, exact for every input (normals, subnormals, inf, nan).
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t mant = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      int e = -1;
      do { ++e; mant <<= 1; } while ((mant & 0x400u) == 0);
      mant &= 0x3FFu;
      bits = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | (mant << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7F800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// IEEE binary32 -> binary16, rounding to nearest even (as torch's .half() and F16C's vcvtps2ph): overflow to
// inf, subnormals kept, nan stays nan.
inline uint16_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, sizeof x);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7FFFFFFFu;
  if (ax >= 0x7F800000u) return sign | (ax > 0x7F800000u ? 0x7E00u : 0x7C00u);  // nan, inf
  if (ax >= 0x477FF000u) return sign | 0x7C00u;  // rounds past 65504
  if (ax < 0x38800000u) {  // below 2^-14: a subnormal half (or zero), rounded at 2^-24
    if (ax < 0x33000000u) return sign;  // at most half of the smallest subnormal: rounds to (even) zero
    const uint32_t e = ax >> 23, m = (ax & 0x7FFFFFu) | 0x800000u;
    const uint32_t shift = 126 - e;  // 14..24: bits dropped from the 24-bit significand
    uint32_t h = m >> shift;
    const uint32_t rest = m & ((1u << shift) - 1u), half = 1u << (shift - 1);
    if (rest > half || (rest == half && (h & 1u))) ++h;
    return sign | static_cast<uint16_t>(h);
  }
  uint32_t h = ((ax >> 13) - ((127u - 15u) << 10));
  const uint32_t rest = ax & 0x1FFFu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // a carry into the exponent is still correct
  return sign | static_cast<uint16_t>(h);
}

}  // namespace lavin
