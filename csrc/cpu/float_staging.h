// fp16/bf16/fp64 data staged through fp32 buffers, so that a kernel written for float serves
// every dtype (shared by lif.cpp, ssa.cpp and token_attention.cpp); fp32 data is used in place.
// bf16 is converted by integer ops compiled for AVX-512, AVX2 and baseline x86-64 (picked per
// call, simd_variants.h): c10::BFloat16's own conversions, in code built for baseline x86-64, ran
// the LIF forward on bf16 no faster than on fp32.
#pragma once
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <type_traits>
#include <vector>

#include "simd_variants.h"

namespace spikeops {
namespace cpu {

// fp32 <-> bf16 (round to nearest even, NaN -> 0x7FC0: c10::BFloat16's rounding) with integer ops
// that vectorise.
// bf16_rounded: that rounding on a float's bits b (a uint32_t, or a GCC vector of them), in the
// low 16 bits.
template <typename Bits>
static inline __attribute__((always_inline)) Bits bf16_rounded(Bits b) {
  return (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
}

// float_to_bf16's result in the low 16 bits, for a float f with bits b (scalars, or GCC vectors of
// floats and of uint32_t): NaN -> 0x7FC0, else bf16_rounded(b).
template <typename F, typename Bits>
static inline __attribute__((always_inline)) Bits bf16_bits(F f, Bits b) {
  return f != f ? Bits{} + 0x7FC0u : bf16_rounded(b);
}

static inline __attribute__((always_inline)) uint16_t float_to_bf16(float f) {
  uint32_t b;
  __builtin_memcpy(&b, &f, sizeof(b));
  return static_cast<uint16_t>(bf16_bits(f, b));
}

static inline __attribute__((always_inline)) float bf16_to_float(uint16_t h) {
  const uint32_t b = static_cast<uint32_t>(h) << 16;
  float f;
  __builtin_memcpy(&f, &b, sizeof(f));
  return f;
}

static inline __attribute__((always_inline)) void bf16_into_floats_body(const uint16_t* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(src[i]);
}
SPIKEOPS_SIMD_VARIANTS(static, void, bf16_into_floats, (const uint16_t* src, int64_t n, float* dst), (src, n, dst))

static inline __attribute__((always_inline)) void floats_into_bf16_body(const float* src, int64_t n, uint16_t* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = float_to_bf16(src[i]);
}
SPIKEOPS_SIMD_VARIANTS(static, void, floats_into_bf16, (const float* src, int64_t n, uint16_t* dst), (src, n, dst))

// Element access for loops that read and write fp32 or bf16 (as its bits, uint16_t) in place: the
// bf16 conversion is a few integer ops per vector inside the loop, no staging buffer and no
// second pass over it. in_loop(p) is p as such a loop takes it (fp32 and bf16 only, kInLoop);
// fp16 and fp64 go through the staging buffers below.
#define SPIKEOPS_INLINE static inline __attribute__((always_inline))
SPIKEOPS_INLINE float load_float(const float* p, int64_t i) { return p[i]; }
SPIKEOPS_INLINE float load_float(const uint16_t* p, int64_t i) { return bf16_to_float(p[i]); }
SPIKEOPS_INLINE void store_float(float* p, int64_t i, float v) { p[i] = v; }
SPIKEOPS_INLINE void store_float(uint16_t* p, int64_t i, float v) { p[i] = float_to_bf16(v); }
// a spike (1) or not (0): bf16's 1.0 is 0x3F80
SPIKEOPS_INLINE void store_spike(float* p, int64_t i, bool s) { p[i] = s ? 1.0f : 0.0f; }
SPIKEOPS_INLINE void store_spike(uint16_t* p, int64_t i, bool s) { p[i] = s ? 0x3F80u : 0u; }
#undef SPIKEOPS_INLINE

template <typename scalar_t>
constexpr bool kInLoop = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>;
template <typename scalar_t>
using in_loop_t = std::conditional_t<std::is_same_v<scalar_t, c10::BFloat16>, uint16_t, float>;
template <typename scalar_t>
const in_loop_t<scalar_t>* in_loop(const scalar_t* p) {
  static_assert(kInLoop<scalar_t>, "in_loop: fp32 and bf16 only (stage the other dtypes)");
  return reinterpret_cast<const in_loop_t<scalar_t>*>(p);
}
template <typename scalar_t>
in_loop_t<scalar_t>* in_loop(scalar_t* p) {
  static_assert(kInLoop<scalar_t>, "in_loop: fp32 and bf16 only (stage the other dtypes)");
  return reinterpret_cast<in_loop_t<scalar_t>*>(p);
}

// dst[0, n) = src[0, n) converted to float.
template <typename scalar_t>
void as_float_into(const scalar_t* src, int64_t n, float* dst) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    bf16_into_floats(reinterpret_cast<const uint16_t*>(src), n, dst);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  }
}

// src[0, n) as floats: src itself for fp32, else a converted copy in buf (n floats).
template <typename scalar_t>
const float* as_float(const scalar_t* src, int64_t n, float* buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return src;
  } else {
    as_float_into(src, n, buf);
    return buf;
  }
}

// ... with buf resized to n.
template <typename scalar_t>
const float* as_float(const scalar_t* src, int64_t n, std::vector<float>& buf) {
  if constexpr (!std::is_same_v<scalar_t, float>) buf.resize(n);
  return as_float(src, n, buf.data());
}

// Where a kernel writes float results bound for dst: dst itself for fp32, else buf, to be copied
// over by store_floats.
template <typename scalar_t>
float* float_out(scalar_t* dst, float* buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return dst;
  } else {
    return buf;
  }
}

// ... with buf resized to n.
template <typename scalar_t>
float* float_out(scalar_t* dst, int64_t n, std::vector<float>& buf) {
  if constexpr (!std::is_same_v<scalar_t, float>) buf.resize(n);
  return float_out(dst, buf.data());
}

// dst[0, n) = src converted, after float_out handed out a buffer (nothing to do for fp32).
template <typename scalar_t>
void store_floats(scalar_t* dst, const float* src, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    floats_into_bf16(src, n, reinterpret_cast<uint16_t*>(dst));
  } else if constexpr (!std::is_same_v<scalar_t, float>) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
  }
}

}  // namespace cpu
}  // namespace spikeops
