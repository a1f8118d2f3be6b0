// Packing 0/1 floats into 64-bit words, shared by pack.cpp and ssa.cpp. Uses SSE2 compare +
// movemask (part of baseline x86-64) four values at a time, with a scalar tail elsewhere.
#pragma once
#include <algorithm>
#include <cstdint>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace spikeops {
namespace cpu {

// words[w] bit j = (x[64 w + j] != 0) for the n values of x; returns true if any value was
// neither 0 nor 1 (NaN included).
inline bool pack_bits(const float* x, int64_t n, uint64_t* words) {
  bool bad = false;
  for (int64_t base = 0, w = 0; base < n; base += 64, ++w) {
    const int64_t m = std::min<int64_t>(64, n - base);
    const float* src = x + base;
    uint64_t bits = 0;
    int64_t j = 0;
#if defined(__SSE2__)
    const __m128 zero = _mm_setzero_ps(), one = _mm_set1_ps(1.0f);
    for (; j + 4 <= m; j += 4) {
      const __m128 v = _mm_loadu_ps(src + j);
      bits |= static_cast<uint64_t>(_mm_movemask_ps(_mm_cmpneq_ps(v, zero))) << j;
      bad |= _mm_movemask_ps(_mm_or_ps(_mm_cmpeq_ps(v, zero), _mm_cmpeq_ps(v, one))) != 0xF;
    }
#endif
    for (; j < m; ++j) {
      bits |= static_cast<uint64_t>(src[j] != 0.0f) << j;
      bad |= (src[j] != 0.0f) & (src[j] != 1.0f);
    }
    words[w] = bits;
  }
  return bad;
}

// Calls f(i) for every set bit i of the W words (ascending).
template <typename F>
inline void for_each_bit(const uint64_t* words, int64_t W, F&& f) {
  for (int64_t w = 0; w < W; ++w) {
    for (uint64_t m = words[w]; m; m &= m - 1) f(w * 64 + __builtin_ctzll(m));
  }
}

}  // namespace cpu
}  // namespace spikeops
