// Whether the CPU kernels take their hand-written AVX2 paths (bits.h, ssa.cpp), decided once per
// process: where the CPU has AVX2 and BMI1, unless the environment variable SPIKEOPS_NO_AVX2 is set
// to anything but "" or "0" when the extension first asks; the tests set it to run the portable
// paths on an AVX2 machine (tests/test_simd_paths.py). (Functions compiled with target_clones pick
// their clone by the CPU alone.)
#pragma once
#include <cstdlib>
#include <cstring>

namespace spikeops {
namespace cpu {

#if defined(__x86_64__) && defined(__GNUC__)
inline bool avx2_enabled() {
  static const bool enabled = [] {
    const char* off = std::getenv("SPIKEOPS_NO_AVX2");
    const bool forced_off = off != nullptr && off[0] != '\0' && std::strcmp(off, "0") != 0;
    return !forced_off && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("bmi");
  }();
  return enabled;
}
#endif

}  // namespace cpu
}  // namespace spikeops
