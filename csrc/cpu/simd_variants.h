// Loops compiled for three instruction sets and picked per call by cpu_features.h, in place of
// GCC's target_clones (which pick their clone by the CPU alone, so on a wide machine no test runs
// the narrower clones):
//
//   SPIKEOPS_SIMD_VARIANTS(PREFIX, RET, NAME, PARAMS, ARGS)
//
// defines `PREFIX RET NAME PARAMS`, which returns NAME##_body ARGS compiled for x86-64-v4 (AVX-512
// F, BW, DQ, VL, CD with the AVX2 variant's features: GCC then vectorises 16-bit bf16 lanes at full
// width), for AVX2 + FMA + BMI1/2 + POPCNT (x86-64-v3 but LZCNT, MOVBE, F16C), or for baseline
// x86-64 (no POPCNT instruction: __builtin_popcountll is a bit-twiddling sum there): the first one
// that x86_64_v4_enabled() / x86_64_v3_enabled() allow. The build contracts nothing into FMAs
// (-ffp-contract=off): FMA only turns explicit __builtin_fmaf calls into instructions instead of
// libm's fmaf, with the same result. SPIKEOPS_NO_AVX512 and SPIKEOPS_NO_AVX2 turn those off, and
// tests/test_simd_paths.py runs the kernel tests so. NAME##_body must be always_inline (it is
// compiled into each variant); PREFIX is `template <typename T>`, `static` or nothing.
//
//   SPIKEOPS_SIMD_VARIANTS_T((TEMPLATE PARAMS), (TEMPLATE ARGS), RET, NAME, PARAMS, ARGS)
//
// is the same for a function template with several parameters (or ones its arguments do not
// deduce): e.g. ((bool kKeepH, typename Count), (kKeepH, Count), void, f, (Count* x), (x)).
#pragma once

#include "cpu_features.h"

#define SPIKEOPS_UNPAREN(...) __VA_ARGS__
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SPIKEOPS_V4 __attribute__((target("arch=x86-64-v4")))
#define SPIKEOPS_V3 __attribute__((target("avx2,fma,bmi,bmi2,popcnt")))
#define SPIKEOPS_SIMD_VARIANTS(PREFIX, RET, NAME, PARAMS, ARGS)                                        \
  PREFIX SPIKEOPS_V4 RET NAME##_v4 PARAMS { return NAME##_body ARGS; }                                 \
  PREFIX SPIKEOPS_V3 RET NAME##_v3 PARAMS { return NAME##_body ARGS; }                                 \
  PREFIX RET NAME##_baseline PARAMS { return NAME##_body ARGS; }                                       \
  PREFIX RET NAME PARAMS {                                                                             \
    if (::spikeops::cpu::x86_64_v4_enabled()) return NAME##_v4 ARGS;                                   \
    if (::spikeops::cpu::x86_64_v3_enabled()) return NAME##_v3 ARGS;                                   \
    return NAME##_baseline ARGS;                                                                       \
  }
#define SPIKEOPS_SIMD_VARIANTS_T(TPARAMS, TARGS, RET, NAME, PARAMS, ARGS)                                           \
  template <SPIKEOPS_UNPAREN TPARAMS>                                                                               \
  SPIKEOPS_V4 RET NAME##_v4 PARAMS { return NAME##_body<SPIKEOPS_UNPAREN TARGS> ARGS; }                             \
  template <SPIKEOPS_UNPAREN TPARAMS>                                                                               \
  SPIKEOPS_V3 RET NAME##_v3 PARAMS { return NAME##_body<SPIKEOPS_UNPAREN TARGS> ARGS; }                             \
  template <SPIKEOPS_UNPAREN TPARAMS>                                                                               \
  RET NAME##_baseline PARAMS { return NAME##_body<SPIKEOPS_UNPAREN TARGS> ARGS; }                                   \
  template <SPIKEOPS_UNPAREN TPARAMS>                                                                               \
  RET NAME PARAMS {                                                                                                 \
    if (::spikeops::cpu::x86_64_v4_enabled()) return NAME##_v4<SPIKEOPS_UNPAREN TARGS> ARGS;                        \
    if (::spikeops::cpu::x86_64_v3_enabled()) return NAME##_v3<SPIKEOPS_UNPAREN TARGS> ARGS;                        \
    return NAME##_baseline<SPIKEOPS_UNPAREN TARGS> ARGS;                                                            \
  }
#else
#define SPIKEOPS_SIMD_VARIANTS(PREFIX, RET, NAME, PARAMS, ARGS) \
  PREFIX RET NAME PARAMS { return NAME##_body ARGS; }
#define SPIKEOPS_SIMD_VARIANTS_T(TPARAMS, TARGS, RET, NAME, PARAMS, ARGS) \
  template <SPIKEOPS_UNPAREN TPARAMS>                                   \
  RET NAME PARAMS { return NAME##_body<SPIKEOPS_UNPAREN TARGS> ARGS; }
#endif
