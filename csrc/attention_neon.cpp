// The attention kernel (attention_impl.h) built for the NEON backends: the cached fp16 keys and values convert
// with fcvtl (vcvt_f32_f16, AArch64 baseline, exact).
#define LAVIN_ATTEND_SUFFIX neon
#define LAVIN_ATTEND_ATTRS
#define LAVIN_LOAD16H_INTEGER 0
#include "attention_impl.h"
