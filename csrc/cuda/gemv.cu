// The CUDA engine's kernels (v1: robust rather than clever; csrc/cuda/README.md says where each choice is
// borrowed from):
//   - w4_gemv<M>: decode GEMV for M <= 8 activation rows. A warp owns 4 weight rows; each lane walks its
//     32-input chunks (c = lane, lane + 32, ...) with one 128-bit load per row per chunk, dequantizes in
//     registers (lop3), multiplies in fp16 and accumulates in fp32 (csrc/cuda/w4_lane.h, shared with the CPU
//     emulation); a shuffle butterfly reduces the warp, and the epilogue stores or adds into the output. No
//     shared memory, no atomics, no split-K.
//   - w4_dequant: the same dequantization, writing fp16 W [n][k] in group order (prefill: torch.matmul).
//   - norm_adapter: RMSNorm + folded routed adapter, fp16 weights, fp32 x (the residual) or fp16 x, fp16 out.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>

#include "gemv_api.h"
#include "w4_lane.h"

namespace lavin {
namespace cuda {
namespace {

using lane::kRowsPerWarp;
using lane::kWarp;

constexpr int kWarpsPerBlock = 4;

// (128, 1): without a minimum block count ptxas caps registers at an occupancy step and spilled a few bytes
// in the loop on sm_86/87/89; uncapped, no kernel spills (scripts/cuda_static_check.sh checks it).
template <int M>
__global__ void __launch_bounds__(kWarp* kWarpsPerBlock, 1)
    w4_gemv(const uint16_t* __restrict__ x, const uint32_t* __restrict__ qw, const uint32_t* __restrict__ sz,
            void* __restrict__ out, int64_t ldo, int kind, int64_t n, int64_t k, int64_t gs) {
  const int ln = threadIdx.x % kWarp;
  const int64_t warp = (int64_t)blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarp;
  const int64_t row0 = warp * kRowsPerWarp;
  if (row0 >= n) return;  // whole warps only: the shuffles below see all 32 lanes
  float acc[kRowsPerWarp][M];
  lane::lane_partials<M>(ln, row0, x, k, qw, sz, n, k, gs, acc);
  // Butterfly (xor 16, 8, 4, 2, 1): every lane ends with the same sums; the emulation adds in this order.
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1)
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
      for (int i = 0; i < M; ++i) acc[r][i] += __shfl_xor_sync(0xffffffffu, acc[r][i], o);
  // Output (r, i) is written by lane (r * M + i) % 32: the stores spread over the lanes.
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
    for (int i = 0; i < M; ++i)
      if ((r * M + i) % kWarp == ln && row0 + r < n) lane::store_out(out, ldo, kind, i, row0 + r, acc[r][i]);
}

__global__ void w4_dequant(const uint32_t* __restrict__ qw, const uint32_t* __restrict__ sz,
                           uint16_t* __restrict__ w, int64_t n, int64_t k, int64_t gs) {
  const int64_t chunks = k / lane::kChunk;
  const int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= n * chunks) return;
  const int64_t row = t / chunks, c = t % chunks;
  lane::HalfPair d[16];
  lane::dequant_chunk(qw, sz, row, c, k, gs, d);
  uint4* dst = reinterpret_cast<uint4*>(w + row * k + c * lane::kChunk);
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    uint4 v;
    v.x = *reinterpret_cast<uint32_t*>(&d[4 * q]);
    v.y = *reinterpret_cast<uint32_t*>(&d[4 * q + 1]);
    v.z = *reinterpret_cast<uint32_t*>(&d[4 * q + 2]);
    v.w = *reinterpret_cast<uint32_t*>(&d[4 * q + 3]);
    dst[q] = v;
  }
}

constexpr int kNormThreads = 256;

template <typename T>
__device__ __forceinline__ float to_f(T v);
template <>
__device__ __forceinline__ float to_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }

__device__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// One block per row. Dynamic shared memory: the row's normed values, fp32 [dim].
template <typename T>
__global__ void __launch_bounds__(kNormThreads)
    norm_adapter(const T* __restrict__ x, __half* __restrict__ y, int dim, int rank, const __half* __restrict__ g,
                 const __half* __restrict__ A, const __half* __restrict__ a, const __half* __restrict__ U,
                 const __half* __restrict__ u, const int32_t* __restrict__ row_modality, float eps) {
  extern __shared__ float nrm[];
  __shared__ float red[kNormThreads / kWarp];
  __shared__ float z[kMaxAdapterRank];
  const int64_t row = blockIdx.x;
  const int warp = threadIdx.x / kWarp, ln = threadIdx.x % kWarp;
  const T* xr = x + row * dim;
  float ss = 0.0f;
  for (int j = threadIdx.x; j < dim; j += blockDim.x) {
    const float v = to_f(xr[j]);
    nrm[j] = v;
    ss += v * v;
  }
  ss = warp_sum(ss);
  if (ln == 0) red[warp] = ss;
  __syncthreads();
  float tot = 0.0f;
  for (int w = 0; w < kNormThreads / kWarp; ++w) tot += red[w];
  const float inv = rsqrtf(tot / dim + eps);
  for (int j = threadIdx.x; j < dim; j += blockDim.x) nrm[j] = nrm[j] * inv * __half2float(g[j]);
  __syncthreads();
  // Rank channel i is one warp's dot product (warp i % 8): no block-wide barrier per channel.
  for (int i = warp; i < rank; i += kNormThreads / kWarp) {
    float p = 0.0f;
    for (int j = ln; j < dim; j += kWarp) p += __half2float(A[(int64_t)i * dim + j]) * nrm[j];
    p = warp_sum(p);
    if (ln == 0) z[i] = p + __half2float(a[i]);
  }
  __syncthreads();
  const int mod = row_modality[row] != 0;
  const __half* Um = U + (int64_t)mod * dim * rank;
  const __half* um = u + (int64_t)mod * dim;
  for (int j = threadIdx.x; j < dim; j += blockDim.x) {
    float acc = nrm[j] + __half2float(um[j]);
    for (int i = 0; i < rank; ++i) acc += __half2float(Um[(int64_t)j * rank + i]) * z[i];
    y[row * dim + j] = __float2half_rn(acc);
  }
}

std::string last_error() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? std::string() : std::string(cudaGetErrorString(e));
}

template <int M>
void launch_gemv(const void* x, const void* qw, const void* sz, void* out, int64_t ldo, int kind, int64_t n,
                 int64_t k, int64_t gs, cudaStream_t s) {
  const int64_t rows_per_block = (int64_t)kRowsPerWarp * kWarpsPerBlock;
  const unsigned blocks = (unsigned)((n + rows_per_block - 1) / rows_per_block);
  w4_gemv<M><<<blocks, kWarp * kWarpsPerBlock, 0, s>>>(static_cast<const uint16_t*>(x),
                                                       static_cast<const uint32_t*>(qw),
                                                       static_cast<const uint32_t*>(sz), out, ldo, kind, n, k, gs);
}

}  // namespace

std::string w4_gemv(const void* x, int64_t m, const void* qw, const void* sz, void* out, int64_t ldo, int kind,
                    int64_t n, int64_t k, int64_t gs, int64_t stream) {
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  switch (m) {
    case 1: launch_gemv<1>(x, qw, sz, out, ldo, kind, n, k, gs, s); break;
    case 2: launch_gemv<2>(x, qw, sz, out, ldo, kind, n, k, gs, s); break;
    case 3: launch_gemv<3>(x, qw, sz, out, ldo, kind, n, k, gs, s); break;
    case 4: launch_gemv<4>(x, qw, sz, out, ldo, kind, n, k, gs, s); break;
    case 5: launch_gemv<5>(x, qw, sz, out, ldo, kind, n, k, gs, s); break;
    case 6: launch_gemv<6>(x, qw, sz, out, ldo, kind, n, k, gs, s); break;
    case 7: launch_gemv<7>(x, qw, sz, out, ldo, kind, n, k, gs, s); break;
    case 8: launch_gemv<8>(x, qw, sz, out, ldo, kind, n, k, gs, s); break;
    default: return "w4_gemv: m must be 1..8";
  }
  return last_error();
}

std::string w4_dequant(const void* qw, const void* sz, void* w, int64_t n, int64_t k, int64_t gs, int64_t stream) {
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const int64_t total = n * (k / lane::kChunk);
  w4_dequant<<<(unsigned)((total + 255) / 256), 256, 0, s>>>(static_cast<const uint32_t*>(qw),
                                                             static_cast<const uint32_t*>(sz),
                                                             static_cast<uint16_t*>(w), n, k, gs);
  return last_error();
}

std::string norm_adapter(const void* x, bool x_fp32, void* y, int64_t rows, int64_t dim, int64_t rank,
                         const void* g, const void* A, const void* a, const void* U, const void* u,
                         const int32_t* row_modality, float eps, int64_t stream) {
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const size_t shmem = sizeof(float) * dim;
  if (shmem > 48 * 1024) return "norm_adapter: dim too large for shared memory (max 12288)";
  auto h = [](const void* p) { return static_cast<const __half*>(p); };
  if (x_fp32) {
    norm_adapter<float><<<(unsigned)rows, kNormThreads, shmem, s>>>(
        static_cast<const float*>(x), static_cast<__half*>(y), (int)dim, (int)rank, h(g), h(A), h(a), h(U), h(u),
        row_modality, eps);
  } else {
    norm_adapter<__half><<<(unsigned)rows, kNormThreads, shmem, s>>>(
        h(x), static_cast<__half*>(y), (int)dim, (int)rank, h(g), h(A), h(a), h(U), h(u), row_modality, eps);
  }
  return last_error();
}

}  // namespace cuda
}  // namespace lavin
