// The few OpenMP runtime calls the kernels make, for builds with and without OpenMP. Without it (Apple clang
// has no libomp; CMakeLists.txt says so at configure time) every `#pragma omp parallel` is ignored and the
// kernels run on the calling thread: these report one thread, so the thread counts the bindings resolve and
// the `omp simd` loops (kept vectorised by -fopenmp-simd) behave the same.
#pragma once

#ifdef _OPENMP
#include <omp.h>
#endif

namespace lavin {

#ifdef _OPENMP
constexpr bool kHaveOpenMP = true;
inline int max_threads() { return omp_get_max_threads(); }
inline int team_size() { return omp_get_num_threads(); }
inline int team_index() { return omp_get_thread_num(); }
#else
constexpr bool kHaveOpenMP = false;
inline int max_threads() { return 1; }
inline int team_size() { return 1; }
inline int team_index() { return 0; }
#endif

}  // namespace lavin
