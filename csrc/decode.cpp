// DecodeStack: one batch-1 decode step of the whole decoder in one call (see kernels.h).
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
// ~100k per SmolLM2 token, and this version took 0.3 ms off the 5.5 ms step). Range reduction x = k ln2 + r with
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
  std::vector<float> xn, qkv, att, tmp, g13, h, scores, acc;  // acc: an accumulating part's output
  std::vector<int8_t> q;
  std::vector<float> d, gsum;
};

DecodeStack::DecodeStack(const DecodeShape& shape, W4GemmFn gemm, LlmAdapterFn adapter, int threads)
    : shape_(shape), gemm_(gemm), adapter_(adapter), threads_(threads), act_(act_format_from_env()),
      s_(new DecodeScratch) {
  const int64_t hd = shape.head_dim;
  s_->xn.resize(shape.dim);
  s_->qkv.resize((shape.n_heads + 2 * shape.n_kv) * hd);
  s_->att.resize(shape.n_heads * hd);
  s_->tmp.resize(shape.dim);
  s_->g13.resize(2 * shape.ffn);
  s_->h.resize(shape.ffn);
  s_->scores.resize(shape.n_heads * shape.ctx);
}

DecodeStack::~DecodeStack() { delete s_; }

static void reserve_quant(DecodeScratch& s, const std::vector<DecodeLinearPart>& parts) {
  for (const auto& p : parts) {
    if (static_cast<int64_t>(s.q.size()) < act_row_bytes(p.w.kp)) s.q.resize(act_row_bytes(p.w.kp));
    if (static_cast<int64_t>(s.d.size()) < p.w.kp / kBlock) s.d.resize(p.w.kp / kBlock);
    if (static_cast<int64_t>(s.gsum.size()) < p.w.groups) s.gsum.resize(p.w.groups);
    if (p.accumulate && static_cast<int64_t>(s.acc.size()) < p.w.n) s.acc.resize(p.w.n);
  }
}

void DecodeStack::add_layer(const DecodeLayer& layer) {
  for (const auto* parts : {&layer.wqkv, &layer.wo, &layer.w13, &layer.w2}) reserve_quant(*s_, *parts);
  layers_.push_back(layer);
}

void DecodeStack::set_head(const DecodeNorm& norm, const std::vector<DecodeLinearPart>& head) {
  reserve_quant(*s_, head);
  head_norm_ = norm;
  head_ = head;
}

void DecodeStack::linear(const std::vector<DecodeLinearPart>& parts, const float* x, float* y) {
  for (const auto& p : parts) {
    const XQuant xq = quantize_activations(x, p.w.k, p.w, 1, act_, s_->q.data(), s_->d.data(), s_->gsum.data());
    if (!p.accumulate) {
      gemm_(p.w, xq, y + p.out_offset, p.w.n, p.threads);
    } else {
      float* t = s_->acc.data();
      gemm_(p.w, xq, t, p.w.n, p.threads);
      float* dst = y + p.out_offset;
      for (int64_t i = 0; i < p.w.n; ++i) dst[i] += t[i];
    }
  }
}

void DecodeStack::norm(const DecodeNorm& n, const float* x, float* y, const int32_t* modality) {
  LlmAdapterArgs a{x, y, 1, shape_.dim, n.rank, n.g, n.A, n.a, n.U, n.u, modality, shape_.eps};
  adapter_(a, 1);
}

// One kv head and the `group` query heads that share it (GQA): scores over the `end` cached positions,
// softmax, weighted sum of V. Each cached k/v row is read once for the whole group. GCC clones the
// function per ISA and picks one at load time (ifunc), so the file itself needs no -m flags.
__attribute__((noinline, target_clones("default", "arch=haswell", "arch=skylake-avx512")))
void attend_group(const float* q, const float* K, const float* V, int64_t end, int64_t hd, int64_t group,
                         float scale, float* sc, float* out) {
  for (int64_t j = 0; j < end; ++j) {
    const float* kj = K + j * hd;
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = q + g * hd;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t i = 0; i < hd; ++i) dot += qg[i] * kj[i];
      sc[g * end + j] = dot * scale;
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    float* s = sc + g * end;
    float mx = -3.0e38f;
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
  for (int64_t i = 0; i < group * hd; ++i) out[i] = 0.0f;
  for (int64_t j = 0; j < end; ++j) {
    const float* vj = V + j * hd;
    for (int64_t g = 0; g < group; ++g) {
      const float p = sc[g * end + j];
      float* og = out + g * hd;
#pragma omp simd
      for (int64_t i = 0; i < hd; ++i) og[i] += p * vj[i];
    }
  }
}

__attribute__((noinline, target_clones("default", "arch=haswell", "arch=skylake-avx512")))
void silu_mul(const float* gate, const float* up, float* out, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = gate[i] / (1.0f + exp_vec(-gate[i])) * up[i];
}

void DecodeStack::attention(const DecodeLayer& l, const float* q, int64_t end, float* out) {
  const int64_t nkv = shape_.n_kv, hd = shape_.head_dim, group = shape_.n_heads / nkv, ctx = shape_.ctx;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  float* scores = s_->scores.data();
  // kv heads in parallel only when the cache is long enough to pay for the fork.
  const bool par = threads_ > 1 && nkv > 1 && end * shape_.n_heads * hd >= (1 << 18);
#pragma omp parallel for num_threads(threads_) schedule(static) if (par)
  for (int64_t kv = 0; kv < nkv; ++kv) {
    attend_group(q + kv * group * hd, l.k_cache + kv * ctx * hd, l.v_cache + kv * ctx * hd, end, hd, group, scale,
                 scores + kv * group * ctx, out + kv * group * hd);
  }
}

void DecodeStack::step(float* x, int64_t pos, int32_t modality, float* out) {
  const int64_t D = shape_.dim, nh = shape_.n_heads, nkv = shape_.n_kv, hd = shape_.head_dim;
  const int64_t ctx = shape_.ctx, F = shape_.ffn, half = hd / 2;
  const float* rope = shape_.rope + pos * hd;  // [half][2]
  float *xn = s_->xn.data(), *qkv = s_->qkv.data(), *att = s_->att.data(), *tmp = s_->tmp.data();
  float *g13 = s_->g13.data(), *h = s_->h.data();
  for (const DecodeLayer& l : layers_) {
    norm(l.attn_in, x, xn, &modality);
    linear(l.wqkv, xn, qkv);
    // Rotary on q and k: pairs (2i, 2i+1) times (cos + i sin), as view_as_complex in the reference.
    for (int64_t r = 0; r < nh + nkv; ++r) {
      float* v = qkv + r * hd;
      for (int64_t i = 0; i < half; ++i) {
        const float c = rope[2 * i], s = rope[2 * i + 1];
        const float re = v[2 * i], im = v[2 * i + 1];
        v[2 * i] = re * c - im * s;
        v[2 * i + 1] = re * s + im * c;
      }
    }
    for (int64_t kv = 0; kv < nkv; ++kv) {
      std::copy_n(qkv + (nh + kv) * hd, hd, l.k_cache + (kv * ctx + pos) * hd);
      std::copy_n(qkv + (nh + nkv + kv) * hd, hd, l.v_cache + (kv * ctx + pos) * hd);
    }
    attention(l, qkv, pos + 1, att);
    linear(l.wo, att, tmp);
    for (int64_t i = 0; i < D; ++i) x[i] += tmp[i];
    norm(l.ffn_norm, x, xn, &modality);
    linear(l.w13, xn, g13);
    silu_mul(g13, g13 + F, h, F);
    linear(l.w2, h, tmp);
    for (int64_t i = 0; i < D; ++i) x[i] += tmp[i];
  }
  if (head_.empty()) {  // the caller applies its own head to the normed state
    norm(head_norm_, x, out, &modality);
    return;
  }
  norm(head_norm_, x, xn, &modality);
  linear(head_, xn, out);
}

}  // namespace lavin
