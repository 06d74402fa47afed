// Host entry points of the CUDA kernels (csrc/cuda/kernels.cu). Declared without any CUDA
// header so bindings.cpp compiles with the plain C++ compiler. All pointers are device
// pointers; `stream` is a cudaStream_t passed as an integer (0 = legacy default stream).
// Each function returns an empty string on success, else the CUDA error text.
#pragma once

#include <cstdint>
#include <string>

#include "../adapter_limits.h"

namespace lavin {
namespace cuda {

int device_count();  // 0 when no driver / no GPU (never throws)

// y [m][n] fp16 = x [m][k] fp16 (gathered by perm when given) times the dequantized
// weights: qweight int32 [k/8][n] with rows already in group order, scales fp16 [G][n],
// zeros uint8 [G][n] (true zero points), group_size rows per group (multiple of 8).
// workspace: fp32 [m][n], overwritten.
std::string w4_gemm(const void* x, int64_t ldx, const int32_t* perm, const int32_t* qweight,
                    const void* scales, const uint8_t* zeros, int64_t m, int64_t n, int64_t k,
                    int64_t groups, int64_t group_size, float* workspace, void* y, int64_t stream);

// x, y fp16 [rows][dim]; every parameter fp32; row_modality int32 [rows].
std::string llm_adapter(const void* x, void* y, int64_t rows, int64_t dim, int64_t rank, const float* g,
                        const float* A, const float* a, const float* U, const float* u,
                        const int32_t* row_modality, float eps, int64_t stream);
std::string vit_adapter(const void* x, void* y, int64_t rows, int64_t dim, int64_t rank, const float* A,
                        const float* a, const float* R, const float* rb, const float* B, const float* b,
                        const float* Dw, const float* d, float temperature, float scale, int64_t stream);

}  // namespace cuda
}  // namespace lavin
