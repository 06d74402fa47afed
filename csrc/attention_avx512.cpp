// The attention kernel (attention_impl.h) built for the avx512 backend: compiled with its own -m flags
// (AVX-512 (F, BW, VL) + F16C), so the cached fp16 keys and values convert with vcvtph2ps; only called after cpu_features()
// confirmed those at run time.
#define LAVIN_ATTEND_SUFFIX avx512
#define LAVIN_ATTEND_ATTRS
#define LAVIN_LOAD16H_INTEGER 0
#include "attention_impl.h"
