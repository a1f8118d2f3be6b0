// fp16/bf16/fp64 data staged through fp32 buffers, so that a kernel written for float serves
// every dtype (shared by ssa.cpp and token_attention.cpp); fp32 data is used in place.
#pragma once
#include <cstdint>
#include <type_traits>
#include <vector>

namespace spikeops {
namespace cpu {

// dst[0, n) = src[0, n) converted to float.
template <typename scalar_t>
void as_float_into(const scalar_t* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// src[0, n) as floats: src itself for fp32, else a converted copy in buf (resized to n).
template <typename scalar_t>
const float* as_float(const scalar_t* src, int64_t n, std::vector<float>& buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return src;
  } else {
    buf.resize(n);
    as_float_into(src, n, buf.data());
    return buf.data();
  }
}

// Where a kernel writes n float results bound for dst: dst itself for fp32, else buf (resized
// to n), to be copied over by store_floats.
template <typename scalar_t>
float* float_out(scalar_t* dst, int64_t n, std::vector<float>& buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return dst;
  } else {
    buf.resize(n);
    return buf.data();
  }
}

// dst[0, n) = src converted, after float_out handed out a buffer (nothing to do for fp32).
template <typename scalar_t>
void store_floats(scalar_t* dst, const float* src, int64_t n) {
  if constexpr (!std::is_same_v<scalar_t, float>) {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
  }
}

}  // namespace cpu
}  // namespace spikeops
