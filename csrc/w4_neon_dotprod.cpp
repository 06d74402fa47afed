// The W4 kernel with the int8 dot product (sdot; w4_neon_impl.h). Compiled with -march=armv8.2-a+dotprod; only
// called after cpu_features() found FEAT_DotProd.
#define LAVIN_NEON_LEVEL 1
#define LAVIN_NEON_GEMM w4_gemm_neon_dotprod
#include "w4_neon_impl.h"
