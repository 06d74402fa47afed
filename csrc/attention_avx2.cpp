// The attention kernel (attention_impl.h) built for the avx2 backend: compiled with its own -m flags
// (AVX2 + FMA + F16C), so the cached fp16 keys and values convert with vcvtph2ps; only called after cpu_features()
// confirmed those at run time.
#define LAVIN_ATTEND_SUFFIX avx2
#define LAVIN_ATTEND_ATTRS
#define LAVIN_LOAD16H_INTEGER 0
#include "attention_impl.h"
