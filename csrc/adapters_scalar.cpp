// Scalar reference adapter kernels: plain loops, dot products accumulated in double. The
// vectorised builds (adapters_simd.h) are tested against these and against PyTorch.
#include <algorithm>
#include <cmath>

#include "kernels.h"

namespace lavin {

void llm_adapter_scalar(const LlmAdapterArgs& p, int threads) {
  const int64_t D = p.dim, r = p.rank;
#pragma omp parallel for schedule(static) num_threads(threads) if (p.rows > 1)
  for (int64_t row = 0; row < p.rows; ++row) {
    const float* x = p.x + row * D;
    float* y = p.y + row * D;
    double ss = 0.0;
    for (int64_t j = 0; j < D; ++j) ss += static_cast<double>(x[j]) * x[j];
    const double inv = 1.0 / std::sqrt(ss / static_cast<double>(D) + p.eps);
    for (int64_t j = 0; j < D; ++j) y[j] = static_cast<float>(x[j] * inv * p.g[j]);  // n
    double z[kMaxAdapterRank];
    for (int64_t i = 0; i < r; ++i) {
      double acc = p.a[i];
      for (int64_t j = 0; j < D; ++j) acc += static_cast<double>(p.A[i * D + j]) * y[j];
      z[i] = acc;
    }
    const int32_t mod = p.row_modality[row];
    const float* Um = p.U + mod * D * r;
    const float* um = p.u + mod * D;
    for (int64_t j = 0; j < D; ++j) {
      double acc = static_cast<double>(y[j]) + um[j];
      for (int64_t i = 0; i < r; ++i) acc += static_cast<double>(Um[j * r + i]) * z[i];
      y[j] = static_cast<float>(acc);
    }
  }
}

void vit_adapter_scalar(const VitAdapterArgs& p, int threads) {
  const int64_t D = p.dim, r = p.rank, h = r / 2;
#pragma omp parallel for schedule(static) num_threads(threads) if (p.rows > 1)
  for (int64_t row = 0; row < p.rows; ++row) {
    const float* x = p.x + row * D;
    float* y = p.y + row * D;
    double z[kMaxAdapterRank];
    for (int64_t i = 0; i < r; ++i) {
      double acc = p.a[i];
      for (int64_t j = 0; j < D; ++j) acc += static_cast<double>(p.A[i * D + j]) * x[j];
      z[i] = acc;
    }
    double l[2];
    for (int e = 0; e < 2; ++e) {
      double acc = p.rb[e];
      for (int64_t j = 0; j < D; ++j) acc += static_cast<double>(p.R[e * D + j]) * x[j];
      l[e] = acc / p.temperature;
    }
    const double mx = std::max(l[0], l[1]);
    const double e0 = std::exp(l[0] - mx), e1 = std::exp(l[1] - mx);
    const double w0 = e0 / (e0 + e1), w1 = e1 / (e0 + e1);
    for (int64_t j = 0; j < D; ++j) {
      const int64_t k = j < D / 2 ? 0 : 1;  // output half k reads hidden channels h*k..h*k+h-1
      double eb = p.b[j], ed = p.d[j];
      for (int64_t i = 0; i < h; ++i) {
        eb += static_cast<double>(p.B[j * h + i]) * z[k * h + i];
        ed += static_cast<double>(p.Dw[j * h + i]) * z[k * h + i];
      }
      y[j] = static_cast<float>(x[j] + p.scale * (w0 * eb + w1 * ed));
    }
  }
}

}  // namespace lavin
