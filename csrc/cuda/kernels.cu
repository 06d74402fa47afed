// CUDA kernels (sm_80, sm_90): fp16 activations in and out, fp32 accumulation.
//
// W4 GEMM: split-K over the GPTQ-ordered weights. Each thread owns one output column and
// up to kRowsPerBlock activation rows; a block covers 128 columns x kSliceK input rows, with
// the x slice staged in shared memory (gathered by the act-order permutation there, so the
// weights stream in their stored order). Nibbles are dequantized in registers; partial sums
// are atomically added into an fp32 workspace, then converted to fp16. Coalesced: adjacent
// threads read adjacent int32 words of a qweight row.
//
// Adapters: one block per row (token); block-wide reductions for the RMS and for each of the
// r (<= kMaxAdapterRank) rank channels.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>

#include "cuda_api.h"

namespace lavin {
namespace cuda {
namespace {

constexpr int kCols = 128;        // threads (columns) per block
constexpr int kSliceK = 256;      // input rows per block (multiple of 8)
constexpr int kRowsPerBlock = 8;  // activation rows per block (grid.z covers the rest)

__global__ void w4_gemm_splitk(const __half* __restrict__ x, int64_t ldx, const int32_t* __restrict__ perm,
                               const uint32_t* __restrict__ qweight, const __half* __restrict__ scales,
                               const uint8_t* __restrict__ zeros, int m, int n, int k, int group_size,
                               float* __restrict__ ws) {
  __shared__ float xs[kRowsPerBlock][kSliceK];
  const int col = blockIdx.x * kCols + threadIdx.x;
  const int k0 = blockIdx.y * kSliceK;
  const int r0 = blockIdx.z * kRowsPerBlock;
  const int kend = min(k, k0 + kSliceK);
  const int rows = min(kRowsPerBlock, m - r0);

  for (int i = threadIdx.x; i < kRowsPerBlock * kSliceK; i += blockDim.x) {
    const int rr = i / kSliceK, kk = k0 + i % kSliceK;
    float v = 0.0f;
    if (rr < rows && kk < kend) v = __half2float(x[(int64_t)(r0 + rr) * ldx + (perm ? perm[kk] : kk)]);
    xs[rr][i % kSliceK] = v;
  }
  __syncthreads();
  if (col >= n) return;

  float acc[kRowsPerBlock];
#pragma unroll
  for (int rr = 0; rr < kRowsPerBlock; ++rr) acc[rr] = 0.0f;
  for (int kk = k0; kk < kend; kk += 8) {
    const uint32_t word = qweight[(int64_t)(kk / 8) * n + col];
    const int g = kk / group_size;  // group_size % 8 == 0: one group per word
    const float s = __half2float(scales[(int64_t)g * n + col]);
    const float z = static_cast<float>(zeros[(int64_t)g * n + col]);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float wv = s * (static_cast<float>((word >> (4 * j)) & 0xFu) - z);
#pragma unroll
      for (int rr = 0; rr < kRowsPerBlock; ++rr) acc[rr] = fmaf(wv, xs[rr][kk - k0 + j], acc[rr]);
    }
  }
  for (int rr = 0; rr < rows; ++rr) atomicAdd(&ws[(int64_t)(r0 + rr) * n + col], acc[rr]);
}

__global__ void f32_to_f16(const float* __restrict__ in, __half* __restrict__ out, int64_t count) {
  const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (i < count) out[i] = __float2half(in[i]);
}

// Block-wide sum; every thread gets the result. `red` holds one float per warp.
__device__ float block_sum(float v, float* red) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // red may still be read by a previous call
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < (int)(blockDim.x / 32); ++w) total += red[w];
  return total;
}

constexpr int kAdapterThreads = 256;

// Dynamic shared memory: n [dim] floats.
__global__ void llm_adapter_kernel(const __half* __restrict__ x, __half* __restrict__ y, int dim, int rank,
                                   const float* __restrict__ g, const float* __restrict__ A,
                                   const float* __restrict__ a, const float* __restrict__ U,
                                   const float* __restrict__ u, const int32_t* __restrict__ row_modality,
                                   float eps) {
  extern __shared__ float nrm[];
  __shared__ float red[kAdapterThreads / 32];
  __shared__ float z[kMaxAdapterRank];
  const int64_t row = blockIdx.x;
  const __half* xr = x + row * dim;
  float ss = 0.0f;
  for (int j = threadIdx.x; j < dim; j += blockDim.x) {
    const float v = __half2float(xr[j]);
    nrm[j] = v;
    ss += v * v;
  }
  ss = block_sum(ss, red);
  const float inv = rsqrtf(ss / dim + eps);
  for (int j = threadIdx.x; j < dim; j += blockDim.x) nrm[j] = nrm[j] * inv * g[j];
  __syncthreads();
  for (int i = 0; i < rank; ++i) {
    float p = 0.0f;
    for (int j = threadIdx.x; j < dim; j += blockDim.x) p += A[(int64_t)i * dim + j] * nrm[j];
    p = block_sum(p, red);
    if (threadIdx.x == 0) z[i] = p + a[i];
  }
  __syncthreads();
  const int mod = row_modality[row];
  const float* Um = U + (int64_t)mod * dim * rank;
  const float* um = u + (int64_t)mod * dim;
  for (int j = threadIdx.x; j < dim; j += blockDim.x) {
    float acc = nrm[j] + um[j];
    for (int i = 0; i < rank; ++i) acc += Um[(int64_t)j * rank + i] * z[i];
    y[row * dim + j] = __float2half(acc);
  }
}

__global__ void vit_adapter_kernel(const __half* __restrict__ x, __half* __restrict__ y, int dim, int rank,
                                   const float* __restrict__ A, const float* __restrict__ a,
                                   const float* __restrict__ R, const float* __restrict__ rb,
                                   const float* __restrict__ B, const float* __restrict__ b,
                                   const float* __restrict__ Dw, const float* __restrict__ d, float temperature,
                                   float scale) {
  extern __shared__ float xsh[];
  __shared__ float red[kAdapterThreads / 32];
  __shared__ float z[kMaxAdapterRank];
  __shared__ float wgt[2];
  const int64_t row = blockIdx.x;
  for (int j = threadIdx.x; j < dim; j += blockDim.x) xsh[j] = __half2float(x[row * dim + j]);
  __syncthreads();
  for (int i = 0; i < rank + 2; ++i) {
    const float* wrow = i < rank ? A + (int64_t)i * dim : R + (int64_t)(i - rank) * dim;
    float p = 0.0f;
    for (int j = threadIdx.x; j < dim; j += blockDim.x) p += wrow[j] * xsh[j];
    p = block_sum(p, red);
    if (threadIdx.x == 0) {
      if (i < rank) z[i] = p + a[i];
      else wgt[i - rank] = (p + rb[i - rank]) / temperature;
    }
  }
  __syncthreads();
  const float mx = fmaxf(wgt[0], wgt[1]);
  const float e0 = __expf(wgt[0] - mx), e1 = __expf(wgt[1] - mx);
  const float w0 = scale * e0 / (e0 + e1), w1 = scale * e1 / (e0 + e1);
  const int h = rank / 2, half = dim / 2;
  for (int j = threadIdx.x; j < dim; j += blockDim.x) {
    const float* zh = z + (j < half ? 0 : h);  // output half k reads hidden channels h*k..h*k+h-1
    float eb = b[j], ed = d[j];
    for (int i = 0; i < h; ++i) {
      eb += B[(int64_t)j * h + i] * zh[i];
      ed += Dw[(int64_t)j * h + i] * zh[i];
    }
    y[row * dim + j] = __float2half(xsh[j] + w0 * eb + w1 * ed);
  }
}

std::string last_error() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? std::string() : std::string(cudaGetErrorString(e));
}

}  // namespace

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return count;
}

std::string w4_gemm(const void* x, int64_t ldx, const int32_t* perm, const int32_t* qweight, const void* scales,
                    const uint8_t* zeros, int64_t m, int64_t n, int64_t k, int64_t groups, int64_t group_size,
                    float* workspace, void* y, int64_t stream) {
  (void)groups;
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  cudaError_t e = cudaMemsetAsync(workspace, 0, sizeof(float) * m * n, s);
  if (e != cudaSuccess) return cudaGetErrorString(e);
  const dim3 grid((unsigned)((n + kCols - 1) / kCols), (unsigned)((k + kSliceK - 1) / kSliceK),
                  (unsigned)((m + kRowsPerBlock - 1) / kRowsPerBlock));
  w4_gemm_splitk<<<grid, kCols, 0, s>>>(static_cast<const __half*>(x), ldx, perm,
                                        reinterpret_cast<const uint32_t*>(qweight), static_cast<const __half*>(scales),
                                        zeros, (int)m, (int)n, (int)k, (int)group_size, workspace);
  const int64_t count = m * n;
  f32_to_f16<<<(unsigned)((count + 255) / 256), 256, 0, s>>>(workspace, static_cast<__half*>(y), count);
  return last_error();
}

std::string llm_adapter(const void* x, void* y, int64_t rows, int64_t dim, int64_t rank, const float* g,
                        const float* A, const float* a, const float* U, const float* u, const int32_t* row_modality,
                        float eps, int64_t stream) {
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const size_t shmem = sizeof(float) * dim;
  if (shmem > 48 * 1024) return "llm_adapter: dim too large for shared memory (max 12288)";
  llm_adapter_kernel<<<(unsigned)rows, kAdapterThreads, shmem, s>>>(
      static_cast<const __half*>(x), static_cast<__half*>(y), (int)dim, (int)rank, g, A, a, U, u, row_modality, eps);
  return last_error();
}

std::string vit_adapter(const void* x, void* y, int64_t rows, int64_t dim, int64_t rank, const float* A,
                        const float* a, const float* R, const float* rb, const float* B, const float* b,
                        const float* Dw, const float* d, float temperature, float scale, int64_t stream) {
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const size_t shmem = sizeof(float) * dim;
  if (shmem > 48 * 1024) return "vit_adapter: dim too large for shared memory (max 12288)";
  vit_adapter_kernel<<<(unsigned)rows, kAdapterThreads, shmem, s>>>(static_cast<const __half*>(x),
                                                                    static_cast<__half*>(y), (int)dim, (int)rank, A,
                                                                    a, R, rb, B, b, Dw, d, temperature, scale);
  return last_error();
}

}  // namespace cuda
}  // namespace lavin
