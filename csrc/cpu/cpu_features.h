// Which hand-written SIMD paths the CPU kernels take (bits.h, ssa.cpp), decided once per process:
//   AVX2 where the CPU has AVX2 and BMI1, unless the environment variable SPIKEOPS_NO_AVX2 is set;
//   AVX-512 where it also has AVX-512 F and BW, unless SPIKEOPS_NO_AVX2 or SPIKEOPS_NO_AVX512 is set;
//   AVX-512's bit instructions (VPOPCNTDQ, VBMI and GFNI: Ice Lake, Sapphire Rapids, Zen 4 and later)
//   where it also has them, unless one of those or SPIKEOPS_NO_AVX512_BITOPS is set
// ("set": to anything but "" or "0" when the extension first asks). The tests set them to run the
// narrower paths on a wider machine (tests/test_simd_paths.py). The loops of simd_variants.h pick
// their variant here too.
#pragma once
#include <cstdlib>
#include <cstring>

namespace spikeops {
namespace cpu {

#if defined(__x86_64__) && defined(__GNUC__)
inline bool env_flag(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && value[0] != '\0' && std::strcmp(value, "0") != 0;
}

inline bool avx2_enabled() {
  static const bool enabled =
      !env_flag("SPIKEOPS_NO_AVX2") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("bmi");
  return enabled;
}

inline bool avx512_enabled() {
  static const bool enabled = avx2_enabled() && !env_flag("SPIKEOPS_NO_AVX512") &&
                              __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  return enabled;
}

// ... and FMA, BMI2, POPCNT (x86-64-v3 but LZCNT, MOVBE, F16C; every AVX2 CPU but a few early
// ones): the AVX2 loops of simd_variants.h
inline bool x86_64_v3_enabled() {
  static const bool enabled = avx2_enabled() && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2") &&
                              __builtin_cpu_supports("popcnt");
  return enabled;
}

// AVX-512 as above and what x86-64-v4 adds (AVX-512 VL, DQ, CD) with the x86-64-v3 features: the
// loops of simd_variants.h compiled for it
inline bool x86_64_v4_enabled() {
  static const bool enabled = avx512_enabled() && __builtin_cpu_supports("avx512vl") &&
                              __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512cd") &&
                              x86_64_v3_enabled();
  return enabled;
}

inline bool avx512_bitops_enabled() {
  static const bool enabled = avx512_enabled() && !env_flag("SPIKEOPS_NO_AVX512_BITOPS") &&
                              __builtin_cpu_supports("avx512vpopcntdq") && __builtin_cpu_supports("avx512vbmi") &&
                              __builtin_cpu_supports("gfni");
  return enabled;
}
#else  // no hand-written SIMD paths off x86 / GCC
inline bool avx2_enabled() { return false; }
inline bool avx512_enabled() { return false; }
inline bool x86_64_v3_enabled() { return false; }
inline bool x86_64_v4_enabled() { return false; }
inline bool avx512_bitops_enabled() { return false; }
#endif

}  // namespace cpu
}  // namespace spikeops
