// Host entry points of the CUDA engine's kernels (csrc/cuda/gemv.cu) and of their CPU emulation
// (csrc/cuda/lane_emulate.cpp), declared without CUDA headers for the plain C++ compiler. Device pointers
// for the CUDA functions, host pointers for the emulation; `stream` is a cudaStream_t as an integer.
// Each CUDA function returns an empty string on success, else the error text.
//
// Layout (csrc/cuda/README.md): x fp16 [m][k] contiguous, in group order; qw uint32 [n][k/8] (row n's
// chunks of 32 inputs, nibble-interleaved); sz (fp16 scale, fp16 1024 + zero) [n][k/gs]; out [m][ldo]
// fp16 (kind 0: store, 1: add) or fp32 (kind 2: add). k and gs multiples of 32, k a multiple of gs.
#pragma once

#include <cstdint>
#include <string>

#include "../adapter_limits.h"

namespace lavin {
namespace cuda {

std::string w4_gemv(const void* x, int64_t m, const void* qw, const void* sz, void* out, int64_t ldo, int kind,
                    int64_t n, int64_t k, int64_t gs, int64_t stream);
// W fp16 [n][k] in group order.
std::string w4_dequant(const void* qw, const void* sz, void* w, int64_t n, int64_t k, int64_t gs, int64_t stream);
// y fp16 [rows][dim] = RMSNorm(x) * g + U_m (A n + a) + u_m; x fp32 (x_fp32) or fp16; weights fp16.
std::string norm_adapter(const void* x, bool x_fp32, void* y, int64_t rows, int64_t dim, int64_t rank,
                         const void* g, const void* A, const void* a, const void* U, const void* u,
                         const int32_t* row_modality, float eps, int64_t stream);

}  // namespace cuda

namespace lane {
// The w4_gemv kernel run lane by lane on the CPU (host pointers, same arguments): its output bit for bit.
void w4_gemv_emulate(const void* x, int64_t m, const void* qw, const void* sz, void* out, int64_t ldo, int kind,
                     int64_t n, int64_t k, int64_t gs);
// The w4_dequant kernel on the CPU.
void w4_dequant_emulate(const void* qw, const void* sz, void* w, int64_t n, int64_t k, int64_t gs);
}  // namespace lane
}  // namespace lavin
