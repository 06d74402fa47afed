// DecodeStack: one decode step of the whole decoder in one call, for one sequence or for m rows of a
// continuous batch (see kernels.h).
//
// Compiled without ISA flags: the heavy work goes through the W4, adapter and attention function pointers
// chosen at construction (scalar / AVX2 / AVX-512 units); what is left here (rope, the fp16 cache writes,
// SwiGLU, residual adds) is O(dim) per row and layer.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "exp_vec.h"
#include "kernels.h"

// On x86-64, GCC clones the generic attention and SiLU per ISA level and picks one at load time (ifunc), so this
// file itself needs no -m flags. Elsewhere (AArch64: Advanced SIMD is baseline) there is one build.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LAVIN_ISA_CLONES __attribute__((noinline, target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define LAVIN_ISA_CLONES __attribute__((noinline))
#endif

// The attention of one kv head and its query heads, for the scalar backend and any CPU (the AVX2, AVX-512 and
// NEON backends have builds of their own with a hardware fp16 conversion: attention_avx2.cpp,
// attention_avx512.cpp, attention_neon.cpp).
#define LAVIN_ATTEND_SUFFIX generic
#define LAVIN_ATTEND_ATTRS LAVIN_ISA_CLONES
#define LAVIN_LOAD16H_INTEGER 1
#include "attention_impl.h"

namespace lavin {

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

DecodeStack::DecodeStack(const DecodeShape& shape, W4GemmFn gemm, LlmAdapterFn adapter, AttendFn attend,
                         int threads)
    : shape_(shape), gemm_(gemm), adapter_(adapter), attend_(attend), threads_(threads), act_(act_format_from_env()),
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

LAVIN_ISA_CLONES
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
    attend_(q + r * qkv_w + kv * group * hd, l.k_cache + base, l.v_cache + base, end[r], hd, group, scale,
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
        const float* k = row + (nh + kv) * hd;
        const float* v = row + (nh + nkv + kv) * hd;
        for (int64_t i = 0; i < hd; ++i) {
          l.k_cache[at + i] = float_to_half(k[i]);
          l.v_cache[at + i] = float_to_half(v[i]);
        }
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
