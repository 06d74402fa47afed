// STREAM-like read-bandwidth probe used by the kernel benchmark: every thread sums its own
// contiguous share of a buffer much larger than the last-level cache. Eight independent
// 64-bit lanes (vectorised by `omp simd`) keep the loads, not the adds, the bottleneck; the
// checksum is returned so the compiler cannot drop the reads. The shares are static and
// contiguous, like the STREAM kernels (one sequential stream per thread).
#include "kernels.h"
#include "parallel.h"

namespace lavin {

double read_bandwidth_kernel(const void* buf, int64_t nbytes, int threads) {
  const uint64_t* p = static_cast<const uint64_t*>(buf);
  const int64_t n = nbytes / 64 * 8;  // whole 64-byte lines
  uint64_t total = 0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
  {
    const int nt = team_size(), id = team_index();
    const int64_t lines = n / 8;
    const int64_t lo = lines * id / nt * 8, hi = lines * (id + 1) / nt * 8;
    uint64_t acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = lo; i < hi; ++i) acc += p[i];
    total += acc;
  }
  return static_cast<double>(total % 1000003u);
}

}  // namespace lavin
