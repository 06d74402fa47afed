// The W4 kernel with the int8 matrix multiply (smmla on row pairs, sdot for a last odd row; w4_neon_impl.h).
// Compiled with -march=armv8.2-a+dotprod+i8mm; only called after cpu_features() found FEAT_I8MM and DotProd.
#define LAVIN_NEON_LEVEL 2
#define LAVIN_NEON_GEMM w4_gemm_neon_i8mm
#include "w4_neon_impl.h"
