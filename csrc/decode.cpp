// DecodeStack: one decode step of the whole decoder in one call, for one sequence or for m rows of a
// continuous batch (see kernels.h).
//
// Compiled without ISA flags: the heavy work goes through the W4 and adapter function pointers
// chosen at construction (scalar / AVX2 / AVX-512 units); what is left here (rope, a softmax
// over the cached positions, SwiGLU, residual adds) is O(dim + ctx) per layer.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include <omp.h>

#include "kernels.h"

namespace lavin {

// exp for the softmax and SiLU, written so `omp simd` loops vectorise it (libm's expf is a scalar call;
// ~100k calls per SmolLM2 token). Range reduction x = k ln2 + r with
// |r| <= ln2/2, then a degree-6 Taylor polynomial: relative error < 2.5e-7 (~2 ulp) over the clamped
// range (checked against exp in double over [-87, 88]), below the rounding of the fp32 sums it feeds.
#pragma omp declare simd
static inline float exp_vec(float x) {
  x = std::min(88.0f, std::max(-87.0f, x));
  const float kf = (x * 1.44269504f + 12582912.0f) - 12582912.0f;  // round to nearest without a libm call
  const float r = (x - kf * 0.693359375f) + kf * 2.12194440e-4f;    // ln2 split in two for exactness
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(kf) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

struct DecodeScratch {
  // Row-major [rows][...] buffers for up to `rows` rows (shape.rows); acc: an accumulating part's output.
  std::vector<float> xn, qkv, att, tmp, g13, h, scores, acc;
  std::vector<int8_t> q;
  std::vector<float> d, gsum;
  std::vector<int64_t> top;  // the rescored head's candidates of one row
  std::vector<int64_t> end;  // per row: cached positions after this step
  // A prefill chunk's rows: all in one slot, at consecutive positions, one modality.
  std::vector<int64_t> slot, pos;
  std::vector<int32_t> modality;
  int64_t rows = 0;  // rows every buffer above holds
};

DecodeStack::DecodeStack(const DecodeShape& shape, W4GemmFn gemm, LlmAdapterFn adapter, int threads)
    : shape_(shape), gemm_(gemm), adapter_(adapter), threads_(threads), act_(act_format_from_env()),
      s_(new DecodeScratch) {
  shape_.rows = std::max<int64_t>(1, shape.rows);
  ensure_rows(shape_.rows);
}

DecodeStack::~DecodeStack() { delete s_; }

static void reserve_quant(DecodeScratch& s, const std::vector<DecodeLinearPart>& parts, int64_t m) {
  for (const auto& p : parts) {
    if (static_cast<int64_t>(s.q.size()) < m * act_row_bytes(p.w.kp)) s.q.resize(m * act_row_bytes(p.w.kp));
    if (static_cast<int64_t>(s.d.size()) < m * p.w.kp / kBlock) s.d.resize(m * p.w.kp / kBlock);
    if (static_cast<int64_t>(s.gsum.size()) < m * p.w.groups) s.gsum.resize(m * p.w.groups);
    if (p.accumulate && static_cast<int64_t>(s.acc.size()) < m * p.w.n) s.acc.resize(m * p.w.n);
  }
}

// Buffers for m rows per call (grown once for prefill chunks; a step's rows fit from construction).
void DecodeStack::ensure_rows(int64_t m) {
  DecodeScratch& s = *s_;
  if (m <= s.rows) return;
  const DecodeShape& sh = shape_;
  s.xn.resize(m * sh.dim);
  s.qkv.resize(m * (sh.n_heads + 2 * sh.n_kv) * sh.head_dim);
  s.att.resize(m * sh.n_heads * sh.head_dim);
  s.tmp.resize(m * sh.dim);
  s.g13.resize(m * 2 * sh.ffn);
  s.h.resize(m * sh.ffn);
  s.end.resize(m);
  s.slot.resize(m);
  s.pos.resize(m);
  s.modality.resize(m);
  for (const DecodeLayer& l : layers_)
    for (const auto* parts : {&l.wqkv, &l.wo, &l.w13, &l.w2}) reserve_quant(s, *parts, m);
  reserve_quant(s, head_, m);
  s.rows = m;
}

void DecodeStack::add_layer(const DecodeLayer& layer) {
  for (const auto* parts : {&layer.wqkv, &layer.wo, &layer.w13, &layer.w2}) reserve_quant(*s_, *parts, s_->rows);
  layers_.push_back(layer);
}

void DecodeStack::set_head(const DecodeNorm& norm, const std::vector<DecodeLinearPart>& head,
                           const DecodeRescore& rescore) {
  reserve_quant(*s_, head, s_->rows);
  head_norm_ = norm;
  head_ = head;
  rescore_ = rescore;
  s_->top.resize(std::max<int64_t>(rescore.top, 0));
}

// y [m][ldy] = x [m][k] W^T, the parts side by side (or summed). Every row is quantized and accumulated on its
// own in the same order whatever m (kernels.h), so a row's output does not depend on the other rows.
void DecodeStack::linear(const std::vector<DecodeLinearPart>& parts, const float* x, int64_t m, float* y,
                         int64_t ldy) {
  for (const auto& p : parts) {
    const XQuant xq = quantize_activations(x, p.w.k, p.w, m, act_, s_->q.data(), s_->d.data(), s_->gsum.data());
    const int nt = m == 1 ? p.threads : threads_;  // a GEMV keeps its own choice; m rows read the weight once
    if (!p.accumulate) {
      gemm_(p.w, xq, y + p.out_offset, ldy, nt);
    } else {
      float* t = s_->acc.data();
      gemm_(p.w, xq, t, p.w.n, nt);
      for (int64_t r = 0; r < m; ++r) {
        float* dst = y + r * ldy + p.out_offset;
        const float* src = t + r * p.w.n;
        for (int64_t i = 0; i < p.w.n; ++i) dst[i] += src[i];
      }
    }
  }
}

void DecodeStack::norm(const DecodeNorm& n, const float* x, float* y, int64_t m, const int32_t* modality) {
  LlmAdapterArgs a{x, y, m, shape_.dim, n.rank, n.g, n.A, n.a, n.U, n.u, modality, shape_.eps};
  adapter_(a, 1);  // D * r flops per row: a thread team would cost more than it saves
}

// Sixteen floats as one value: GCC lowers it to one zmm, two ymm or four xmm in each clone of attend_group, so
// the attention is written once for every ISA. The helpers are always inlined into those clones, so no vector
// crosses a call (which is what -Wpsabi warns about).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float f32x16 __attribute__((vector_size(64)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));

__attribute__((always_inline)) static inline f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

__attribute__((always_inline)) static inline void store16(float* p, f32x16 v) { std::memcpy(p, &v, sizeof v); }

// Sum of the 16 lanes as a fixed halving tree: four dependent adds where an in-order sum is sixteen.
__attribute__((always_inline)) static inline float sum16(f32x16 v) {
  const f32x8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                  __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const f32x4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// The scores of the `group` query heads against the `end` cached keys for hd = 16 NC: each (key, head) dot
// product is NC multiply-adds on two alternating accumulators and one tree sum, so successive scores are
// independent work (the in-order sum of an `omp simd` reduction made each one a 16-add chain).
template <int NC>
__attribute__((always_inline)) static inline void scores16(const float* q, const float* K, int64_t end, int64_t group, float scale, int64_t ld,
                            float* sc) {
  constexpr int64_t hd = 16 * NC;
  for (int64_t j = 0; j < end; ++j) {
    const float* kj = K + j * hd;
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = q + g * hd;
      f32x16 a[2] = {load16(qg) * load16(kj), f32x16{}};
#pragma GCC unroll 16
      for (int c = 1; c < NC; ++c) a[c & 1] += load16(qg + 16 * c) * load16(kj + 16 * c);
      sc[g * ld + j] = sum16(a[0] + a[1]) * scale;
    }
  }
}

// out[g] = sum_j p[g][j] V[j] for hd = 16 NC with the output in registers: GB heads at a time (GB NC <= 8
// accumulators of 16 floats), each sum taken over j in order (the scalar loop's sums, to the last bit).
template <int NC>
__attribute__((always_inline)) static inline void weighted_values16(const float* V, int64_t end, int64_t group, int64_t ld, const float* sc,
                                     float* out) {
  constexpr int64_t hd = 16 * NC;
  constexpr int GB = NC >= 8 ? 1 : 8 / NC;
  int64_t g0 = 0;
  for (; g0 + GB <= group; g0 += GB) {
    f32x16 acc[GB][NC] = {};
    for (int64_t j = 0; j < end; ++j) {
      const float* vj = V + j * hd;
#pragma GCC unroll 8
      for (int g = 0; g < GB; ++g) {
        const float p = sc[(g0 + g) * ld + j];
#pragma GCC unroll 16
        for (int c = 0; c < NC; ++c) acc[g][c] += p * load16(vj + 16 * c);
      }
    }
    for (int g = 0; g < GB; ++g)
      for (int c = 0; c < NC; ++c) store16(out + (g0 + g) * hd + 16 * c, acc[g][c]);
  }
  for (; g0 < group; ++g0) {  // the heads left over: one at a time
    f32x16 acc[NC] = {};
    for (int64_t j = 0; j < end; ++j) {
      const float p = sc[g0 * ld + j];
#pragma GCC unroll 16
      for (int c = 0; c < NC; ++c) acc[c] += p * load16(V + j * hd + 16 * c);
    }
    for (int c = 0; c < NC; ++c) store16(out + g0 * hd + 16 * c, acc[c]);
  }
}

#pragma GCC diagnostic pop

// One kv head and the `group` query heads that share it (GQA): scores over the `end` cached positions,
// softmax, weighted sum of V. Each cached k/v row is read once for the whole group. GCC clones the
// function per ISA and picks one at load time (ifunc), so the file itself needs no -m flags.
__attribute__((noinline, target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
void attend_group(const float* q, const float* K, const float* V, int64_t end, int64_t hd, int64_t group,
                  float scale, int64_t ld, float* sc, float* out) {
  // Head sizes that are a multiple of 16 up to 128 (SmolLM2's 64, LLaMA's 128) run on the register-blocked
  // paths; any other size on plain loops.
  const int nc = hd % 16 == 0 && hd <= 128 ? static_cast<int>(hd / 16) : 0;
  switch (nc) {
    case 1: scores16<1>(q, K, end, group, scale, ld, sc); break;
    case 2: scores16<2>(q, K, end, group, scale, ld, sc); break;
    case 3: scores16<3>(q, K, end, group, scale, ld, sc); break;
    case 4: scores16<4>(q, K, end, group, scale, ld, sc); break;
    case 5: scores16<5>(q, K, end, group, scale, ld, sc); break;
    case 6: scores16<6>(q, K, end, group, scale, ld, sc); break;
    case 7: scores16<7>(q, K, end, group, scale, ld, sc); break;
    case 8: scores16<8>(q, K, end, group, scale, ld, sc); break;
    default:
      for (int64_t j = 0; j < end; ++j) {
        const float* kj = K + j * hd;
        for (int64_t g = 0; g < group; ++g) {
          const float* qg = q + g * hd;
          float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
          for (int64_t i = 0; i < hd; ++i) dot += qg[i] * kj[i];
          sc[g * ld + j] = dot * scale;
        }
      }
  }
  for (int64_t g = 0; g < group; ++g) {
    float* s = sc + g * ld;
    float mx = -3.0e38f;
#pragma omp simd reduction(max : mx)
    for (int64_t j = 0; j < end; ++j) mx = std::max(mx, s[j]);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < end; ++j) {
      s[j] = exp_vec(s[j] - mx);
      sum += s[j];
    }
    const float inv = 1.0f / sum;
#pragma omp simd
    for (int64_t j = 0; j < end; ++j) s[j] *= inv;
  }
  switch (nc) {
    case 1: weighted_values16<1>(V, end, group, ld, sc, out); return;
    case 2: weighted_values16<2>(V, end, group, ld, sc, out); return;
    case 3: weighted_values16<3>(V, end, group, ld, sc, out); return;
    case 4: weighted_values16<4>(V, end, group, ld, sc, out); return;
    case 5: weighted_values16<5>(V, end, group, ld, sc, out); return;
    case 6: weighted_values16<6>(V, end, group, ld, sc, out); return;
    case 7: weighted_values16<7>(V, end, group, ld, sc, out); return;
    case 8: weighted_values16<8>(V, end, group, ld, sc, out); return;
    default: break;
  }
  for (int64_t i = 0; i < group * hd; ++i) out[i] = 0.0f;
  for (int64_t j = 0; j < end; ++j) {
    const float* vj = V + j * hd;
    for (int64_t g = 0; g < group; ++g) {
      const float p = sc[g * ld + j];
      float* og = out + g * hd;
#pragma omp simd
      for (int64_t i = 0; i < hd; ++i) og[i] += p * vj[i];
    }
  }
}

__attribute__((noinline, target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
void silu_mul(const float* gate, const float* up, float* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = gate[i] / (1.0f + exp_vec(-gate[i])) * up[i];
}

static float* align64(float* p) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  return reinterpret_cast<float*>((a + 63) & ~static_cast<uintptr_t>(63));
}

// Attention of m rows, each over exactly its own slot's first end[r] cached positions; one (row, kv head) is
// one unit of work, computed the same way whichever thread runs it and whatever the other rows are.
void DecodeStack::attention(const DecodeLayer& l, const float* q, int64_t m, const int64_t* slot,
                            const int64_t* end, float* out) {
  const int64_t nh = shape_.n_heads, nkv = shape_.n_kv, hd = shape_.head_dim, group = nh / nkv, ctx = shape_.ctx;
  const int64_t qkv_w = (nh + 2 * nkv) * hd, slot_stride = nkv * ctx * hd;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  int64_t work = 0, longest = 0;
  for (int64_t r = 0; r < m; ++r) {
    work += end[r];
    longest = std::max(longest, end[r]);
  }
  // Each (row, head) gets a scores row of the longest length in this call, rounded to 16 floats so every
  // row starts 64-byte aligned whatever the call's length (the vectorised softmax sums in the same order).
  const int64_t stride = (longest + 15) / 16 * 16;
  if (static_cast<int64_t>(s_->scores.size()) < m * nh * stride + 16) s_->scores.resize(m * nh * stride + 16);
  float* scores = align64(s_->scores.data());
  // In parallel only when the caches are long enough to pay for the fork.
  const bool par = threads_ > 1 && m * nkv > 1 && work * nh * hd >= (1 << 18);
#pragma omp parallel for num_threads(threads_) schedule(static) if (par)
  for (int64_t u = 0; u < m * nkv; ++u) {
    const int64_t r = u / nkv, kv = u % nkv;
    const int64_t base = slot[r] * slot_stride + kv * ctx * hd;
    attend_group(q + r * qkv_w + kv * group * hd, l.k_cache + base, l.v_cache + base, end[r], hd, group, scale,
                 stride, scores + (r * nh + kv * group) * stride, out + r * nh * hd + kv * group * hd);
  }
}

// The rescored head (RescoredHead in lavin_edge/runtime/ops.py): the `top` largest approximate logits of each row
// recomputed from the fp weight rows, each a sum of exact products in double, rounded once to float. Why double:
// the sum then carries no fp32 rounding, so the result matches the Python head (a BLAS dot in fp64, another order)
// and does not depend on the batch. Ties among the approximate logits go to the lower index.
template <typename T>
static inline double dot_fp64(const T* w, const float* x, int64_t n) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += static_cast<double>(static_cast<float>(w[i])) * static_cast<double>(x[i]);
  return s;
}

static inline float bf16_to_float(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

void DecodeStack::rescore(const float* xn, float* logits) {
  const DecodeRescore& rs = rescore_;
  const int64_t V = shape_.vocab, D = shape_.dim, k = std::min(rs.top, V);
  int64_t* top = s_->top.data();
  int64_t filled = 0;
  // Insertion into a sorted list of k (k is small: 8): value descending, index ascending.
  for (int64_t i = 0; i < V; ++i) {
    const float v = logits[i];
    if (filled == k && !(v > logits[top[k - 1]])) continue;
    int64_t j = filled < k ? filled++ : k - 1;
    while (j > 0 && v > logits[top[j - 1]]) {
      top[j] = top[j - 1];
      --j;
    }
    top[j] = i;
  }
  double exact[kMaxRescore];
  for (int64_t j = 0; j < k; ++j) {
    const int64_t row = top[j];
    switch (rs.dtype) {
      case DecodeRescore::kF32:
        exact[j] = dot_fp64(static_cast<const float*>(rs.weight) + row * D, xn, D);
        break;
      case DecodeRescore::kF16: {
        const uint16_t* w = static_cast<const uint16_t*>(rs.weight) + row * D;
        double s = 0.0;
        for (int64_t i = 0; i < D; ++i) s += static_cast<double>(half_to_float(w[i])) * static_cast<double>(xn[i]);
        exact[j] = s;
        break;
      }
      default: {
        const uint16_t* w = static_cast<const uint16_t*>(rs.weight) + row * D;
        double s = 0.0;
        for (int64_t i = 0; i < D; ++i) s += static_cast<double>(bf16_to_float(w[i])) * static_cast<double>(xn[i]);
        exact[j] = s;
        break;
      }
    }
  }
  for (int64_t j = 0; j < k; ++j) logits[top[j]] = static_cast<float>(exact[j]);
}

void DecodeStack::step(float* x, int64_t pos, int32_t modality, float* out) {
  const int64_t slot = 0;
  step_rows(x, 1, &slot, &pos, &modality, out);
}

void DecodeStack::step_rows(float* x, int64_t m, const int64_t* slot, const int64_t* pos, const int32_t* modality,
                            float* out) {
  layers(x, m, slot, pos, modality);
  head(x, m, modality, out);
}

// A prompt of t positions of one sequence: chunks of rows that each write their keys and values before any
// of them attends (attention() runs after every row's cache write), so row r sees the cached history and the
// rows before it, as t single steps would; each row is computed as a single step computes it, so the result is
// bitwise t calls of step(). The head runs on the last row only.
void DecodeStack::prefill(float* x, int64_t t, int64_t slot, int64_t start, int32_t modality, float* out) {
  ensure_rows(std::min(t, kPrefillChunk));
  DecodeScratch& s = *s_;
  for (int64_t c0 = 0; c0 < t; c0 += kPrefillChunk) {
    const int64_t m = std::min(kPrefillChunk, t - c0);
    for (int64_t r = 0; r < m; ++r) {
      s.slot[r] = slot;
      s.pos[r] = start + c0 + r;
      s.modality[r] = modality;
    }
    layers(x + c0 * shape_.dim, m, s.slot.data(), s.pos.data(), s.modality.data());
  }
  head(x + (t - 1) * shape_.dim, 1, &modality, out);
}

void DecodeStack::layers(float* x, int64_t m, const int64_t* slot, const int64_t* pos, const int32_t* modality) {
  const int64_t D = shape_.dim, nh = shape_.n_heads, nkv = shape_.n_kv, hd = shape_.head_dim;
  const int64_t ctx = shape_.ctx, F = shape_.ffn, half = hd / 2, qkv_w = (nh + 2 * nkv) * hd;
  const int64_t slot_stride = nkv * ctx * hd;
  float *xn = s_->xn.data(), *qkv = s_->qkv.data(), *att = s_->att.data(), *tmp = s_->tmp.data();
  float *g13 = s_->g13.data(), *h = s_->h.data();
  int64_t* end = s_->end.data();
  for (int64_t r = 0; r < m; ++r) end[r] = pos[r] + 1;
  for (const DecodeLayer& l : layers_) {
    norm(l.attn_in, x, xn, m, modality);
    linear(l.wqkv, xn, m, qkv, qkv_w);
    for (int64_t r = 0; r < m; ++r) {
      float* row = qkv + r * qkv_w;
      const float* rope = shape_.rope + pos[r] * hd;  // [half][2]
      // Rotary on q and k: pairs (2i, 2i+1) times (cos + i sin), as view_as_complex in the reference.
      for (int64_t hh = 0; hh < nh + nkv; ++hh) {
        float* v = row + hh * hd;
        for (int64_t i = 0; i < half; ++i) {
          const float c = rope[2 * i], s = rope[2 * i + 1];
          const float re = v[2 * i], im = v[2 * i + 1];
          v[2 * i] = re * c - im * s;
          v[2 * i + 1] = re * s + im * c;
        }
      }
      for (int64_t kv = 0; kv < nkv; ++kv) {
        const int64_t at = slot[r] * slot_stride + (kv * ctx + pos[r]) * hd;
        std::copy_n(row + (nh + kv) * hd, hd, l.k_cache + at);
        std::copy_n(row + (nh + nkv + kv) * hd, hd, l.v_cache + at);
      }
    }
    attention(l, qkv, m, slot, end, att);
    linear(l.wo, att, m, tmp, D);
    for (int64_t i = 0; i < m * D; ++i) x[i] += tmp[i];
    norm(l.ffn_norm, x, xn, m, modality);
    linear(l.w13, xn, m, g13, 2 * F);
    for (int64_t r = 0; r < m; ++r) silu_mul(g13 + r * 2 * F, g13 + r * 2 * F + F, h + r * F, F);
    linear(l.w2, h, m, tmp, D);
    for (int64_t i = 0; i < m * D; ++i) x[i] += tmp[i];
  }
}

void DecodeStack::head(const float* x, int64_t m, const int32_t* modality, float* out) {
  const int64_t D = shape_.dim;
  if (head_.empty()) {  // the caller applies its own head to the normed state
    norm(head_norm_, x, out, m, modality);
    return;
  }
  float* xn = s_->xn.data();
  norm(head_norm_, x, xn, m, modality);
  linear(head_, xn, m, out, shape_.vocab);
  if (rescore_.weight != nullptr && rescore_.top > 0) {
    for (int64_t r = 0; r < m; ++r) rescore(xn + r * D, out + r * shape_.vocab);
  }
}

}  // namespace lavin
