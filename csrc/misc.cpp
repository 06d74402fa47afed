// STREAM-like read-bandwidth probe used by the kernel benchmark: every thread sums its own
// contiguous share of a buffer much larger than the last-level cache. Four independent
// 64-bit accumulators keep the loads, not the adds, the bottleneck; the checksum is returned
// so the compiler cannot drop the reads.
#include <omp.h>

#include "kernels.h"

namespace lavin {

double read_bandwidth_kernel(const void* buf, int64_t nbytes, int threads) {
  const uint64_t* p = static_cast<const uint64_t*>(buf);
  const int64_t n = nbytes / 8 / 4 * 4;
  uint64_t total = 0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
  {
    const int nt = omp_get_num_threads(), id = omp_get_thread_num();
    const int64_t per = (n / 4 + nt - 1) / nt * 4;
    const int64_t lo = id * per, hi = lo + per < n ? lo + per : n;
    uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
    for (int64_t i = lo; i < hi; i += 4) {
      a0 += p[i];
      a1 += p[i + 1];
      a2 += p[i + 2];
      a3 += p[i + 3];
    }
    total += a0 + a1 + a2 + a3;
  }
  return static_cast<double>(total % 1000003u);
}

}  // namespace lavin
