// Loops compiled for three instruction sets and picked per call by cpu_features.h, in place of
// GCC's target_clones (which pick their clone by the CPU alone, so on a wide machine no test runs
// the narrower clones):
//
//   SPIKEOPS_SIMD_VARIANTS(PREFIX, RET, NAME, PARAMS, ARGS)
//
// defines `PREFIX RET NAME PARAMS`, which returns NAME##_body ARGS compiled for x86-64-v4 (AVX-512
// F, BW, DQ, VL, CD with AVX2 and FMA: GCC then vectorises 16-bit bf16 lanes at full width), for
// AVX2 + FMA, or for baseline x86-64: the first one that x86_64_v4_enabled() / avx2_fma_enabled()
// allow. The build contracts nothing into FMAs (-ffp-contract=off): FMA only turns explicit
// __builtin_fmaf calls into instructions instead of libm's fmaf, with the same result.
// SPIKEOPS_NO_AVX512 and SPIKEOPS_NO_AVX2 turn those off, and tests/test_simd_paths.py runs the
// kernel tests so. NAME##_body must be always_inline (it is compiled into each variant); PREFIX is
// `template <typename T>`, `static` or nothing.
#pragma once

#include "cpu_features.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SPIKEOPS_SIMD_VARIANTS(PREFIX, RET, NAME, PARAMS, ARGS)                                        \
  PREFIX __attribute__((target("arch=x86-64-v4"))) RET NAME##_v4 PARAMS { return NAME##_body ARGS; }   \
  PREFIX __attribute__((target("avx2,fma"))) RET NAME##_avx2 PARAMS { return NAME##_body ARGS; }      \
  PREFIX RET NAME##_baseline PARAMS { return NAME##_body ARGS; }                                       \
  PREFIX RET NAME PARAMS {                                                                             \
    if (::spikeops::cpu::x86_64_v4_enabled()) return NAME##_v4 ARGS;                                   \
    if (::spikeops::cpu::avx2_fma_enabled()) return NAME##_avx2 ARGS;                                  \
    return NAME##_baseline ARGS;                                                                       \
  }
#else
#define SPIKEOPS_SIMD_VARIANTS(PREFIX, RET, NAME, PARAMS, ARGS) \
  PREFIX RET NAME PARAMS { return NAME##_body ARGS; }
#endif
