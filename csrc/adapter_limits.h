// The adapter rank limit shared by the CPU and CUDA kernels.
#pragma once

namespace lavin {

// The adapters' bottleneck rank is at most this: the kernels keep one rank-sized row on the stack (CPU) or
// in shared memory (CUDA). lavin_edge.config.MAX_ADAPTER_RANK is the same number: the extension exports it
// as _C.MAX_ADAPTER_RANK and a test compares the two.
constexpr int kMaxAdapterRank = 64;

}  // namespace lavin
