// Packing 0/1 floats into 64-bit words, shared by pack.cpp, ssa.cpp and token_attention.cpp:
// compares giving masks, sixteen values at a time with AVX-512 where the CPU has it (checked at
// run time, cpu_features.h), else compare + movemask, eight values at a time with AVX2, else four
// with SSE2 (baseline x86-64), with a scalar tail (and a scalar path off x86).
#pragma once
#include <algorithm>
#include <cstdint>

#include "cpu_features.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>  // outside the namespace: the AVX2 paths below
#endif

namespace spikeops {
namespace cpu {

// words[w] bit j = (x[64 w + j] != 0) for the n values of x; returns true if any value was
// neither 0 nor 1 (NaN included). pack_bits picks AVX2 (8 values per compare) at run time.
inline bool pack_bits_sse2(const float* x, int64_t n, uint64_t* words) {
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

// Rows of x [rows, n] (row stride n) packed one by one as above, into words [rows, ceil(n/64)];
// returns true if any value was neither 0 nor 1. pack_rows picks AVX2 at run time.
inline bool pack_rows_sse2(const float* x, int64_t rows, int64_t n, uint64_t* words) {
  const int64_t W = (n + 63) / 64;
  bool bad = false;
  for (int64_t r = 0; r < rows; ++r) bad |= pack_bits_sse2(x + r * n, n, words + r * W);
  return bad;
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2"))) inline bool pack_bits_avx2(const float* x, int64_t n, uint64_t* words) {
  const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
  int not_binary = 0;
  for (int64_t base = 0, w = 0; base < n; base += 64, ++w) {
    const int64_t m = std::min<int64_t>(64, n - base);
    const float* src = x + base;
    uint64_t bits = 0;
    int64_t j = 0;
    for (; j + 8 <= m; j += 8) {
      const __m256 v = _mm256_loadu_ps(src + j);
      bits |= static_cast<uint64_t>(_mm256_movemask_ps(_mm256_cmp_ps(v, zero, _CMP_NEQ_UQ))) << j;
      const __m256 ok = _mm256_or_ps(_mm256_cmp_ps(v, zero, _CMP_EQ_OQ), _mm256_cmp_ps(v, one, _CMP_EQ_OQ));
      not_binary |= _mm256_movemask_ps(ok) ^ 0xFF;
    }
    for (; j < m; ++j) {
      bits |= static_cast<uint64_t>(src[j] != 0.0f) << j;
      not_binary |= (src[j] != 0.0f) & (src[j] != 1.0f);
    }
    words[w] = bits;
  }
  return not_binary != 0;
}

// pack_rows with AVX2: 32 compares at a time become 32 bits through two saturating packs, one
// lane fix-up and one byte movemask; the 0/1 check is one vector per call, OR-ed over the lanes
// where (x != 0) differs from (x == 1).
__attribute__((target("avx2"))) inline bool pack_rows_avx2(const float* x, int64_t rows, int64_t n, uint64_t* words) {
  const int64_t W = (n + 63) / 64;
  const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
  const __m256i dword_order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undoes the packs' lane interleave
  __m256 not_binary = zero;
  int tail_not_binary = 0;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t w = 0; w < W; ++w) {
      const int64_t m = std::min<int64_t>(64, n - 64 * w);
      const float* src = x + r * n + 64 * w;
      uint64_t bits = 0;
      int64_t j = 0;
      for (; j + 32 <= m; j += 32) {
        __m256i nonzero[4];
        for (int i = 0; i < 4; ++i) {
          const __m256 v = _mm256_loadu_ps(src + j + 8 * i);
          const __m256 nz = _mm256_cmp_ps(v, zero, _CMP_NEQ_UQ);
          not_binary = _mm256_or_ps(not_binary, _mm256_xor_ps(nz, _mm256_cmp_ps(v, one, _CMP_EQ_OQ)));
          nonzero[i] = _mm256_castps_si256(nz);
        }
        const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(nonzero[0], nonzero[1]),
                                                 _mm256_packs_epi32(nonzero[2], nonzero[3]));
        const uint32_t mask = _mm256_movemask_epi8(_mm256_permutevar8x32_epi32(bytes, dword_order));
        bits |= static_cast<uint64_t>(mask) << j;
      }
      for (; j + 8 <= m; j += 8) {
        const __m256 v = _mm256_loadu_ps(src + j);
        const __m256 nz = _mm256_cmp_ps(v, zero, _CMP_NEQ_UQ);
        not_binary = _mm256_or_ps(not_binary, _mm256_xor_ps(nz, _mm256_cmp_ps(v, one, _CMP_EQ_OQ)));
        bits |= static_cast<uint64_t>(_mm256_movemask_ps(nz)) << j;
      }
      for (; j < m; ++j) {
        bits |= static_cast<uint64_t>(src[j] != 0.0f) << j;
        tail_not_binary |= (src[j] != 0.0f) & (src[j] != 1.0f);
      }
      words[r * W + w] = bits;
    }
  }
  return tail_not_binary != 0 || _mm256_movemask_ps(not_binary) != 0;
}

// pack_rows with AVX-512: a compare of 16 values gives their 16 bits as a mask; the last values of
// a row go through a masked load (the lanes past the row read as 0), so there is no scalar tail.
// The 0/1 check is arithmetic and stays in a vector register: x * x - x with one rounding (an
// fma) is +0 for x = 0, -0 and 1, and nonzero or NaN for every other x (its exact value x (x - 1)
// is then nonzero, and at least the smallest subnormal in size), so the OR of its bits over the
// call is 0 exactly when every value was 0 or 1. Rows of 32 and 64 values (Spikformer's head
// widths) take a loop without the per-word bookkeeping.
__attribute__((target("avx512f,avx512bw"))) inline __m512i not_binary_bits(__m512i acc, __m512 v) {
  return _mm512_or_si512(acc, _mm512_castps_si512(_mm512_fmsub_ps(v, v, v)));
}

template <int kVecs>  // rows of 16 kVecs values, kVecs <= 4: one word a row
__attribute__((target("avx512f,avx512bw"))) inline __m512i pack_short_rows_avx512(const float* x, int64_t rows,
                                                                                   uint64_t* words) {
  const __m512 zero = _mm512_setzero_ps();
  __m512i not_binary = _mm512_setzero_si512();
  for (int64_t r = 0; r < rows; ++r) {
    uint64_t bits = 0;
    for (int i = 0; i < kVecs; ++i) {
      const __m512 v = _mm512_loadu_ps(x + (r * kVecs + i) * 16);
      bits |= static_cast<uint64_t>(_mm512_cmp_ps_mask(v, zero, _CMP_NEQ_UQ)) << (16 * i);
      not_binary = not_binary_bits(not_binary, v);
    }
    words[r] = bits;
  }
  return not_binary;
}

__attribute__((target("avx512f,avx512bw"))) inline bool pack_rows_avx512(const float* x, int64_t rows, int64_t n,
                                                                          uint64_t* words) {
  __m512i not_binary = _mm512_setzero_si512();
  if (n == 32) {
    not_binary = pack_short_rows_avx512<2>(x, rows, words);
  } else if (n == 64) {
    not_binary = pack_short_rows_avx512<4>(x, rows, words);
  } else {
    const int64_t W = (n + 63) / 64;
    const __m512 zero = _mm512_setzero_ps();
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t w = 0; w < W; ++w) {
        const int64_t m = std::min<int64_t>(64, n - 64 * w);
        const float* src = x + r * n + 64 * w;
        uint64_t bits = 0;
        for (int64_t j = 0; j < m; j += 16) {
          const __mmask16 lanes = m - j >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (m - j)) - 1);
          const __m512 v = _mm512_maskz_loadu_ps(lanes, src + j);
          bits |= static_cast<uint64_t>(_mm512_cmp_ps_mask(v, zero, _CMP_NEQ_UQ)) << j;
          not_binary = not_binary_bits(not_binary, v);
        }
        words[r * W + w] = bits;
      }
    }
  }
  return _mm512_test_epi32_mask(not_binary, not_binary) != 0;
}

inline bool pack_rows(const float* x, int64_t rows, int64_t n, uint64_t* words) {
  if (avx512_enabled()) return pack_rows_avx512(x, rows, n, words);
  return avx2_enabled() ? pack_rows_avx2(x, rows, n, words) : pack_rows_sse2(x, rows, n, words);
}

inline bool pack_bits(const float* x, int64_t n, uint64_t* words) {
  if (avx512_enabled()) return pack_rows_avx512(x, 1, n, words);
  return avx2_enabled() ? pack_bits_avx2(x, n, words) : pack_bits_sse2(x, n, words);
}
#else
inline bool pack_bits(const float* x, int64_t n, uint64_t* words) { return pack_bits_sse2(x, n, words); }

inline bool pack_rows(const float* x, int64_t rows, int64_t n, uint64_t* words) {
  return pack_rows_sse2(x, rows, n, words);
}
#endif

// Calls f(i) for every set bit i of the W words (ascending).
template <typename F>
inline void for_each_bit(const uint64_t* words, int64_t W, F&& f) {
  for (int64_t w = 0; w < W; ++w) {
    for (uint64_t m = words[w]; m; m &= m - 1) f(w * 64 + __builtin_ctzll(m));
  }
}

}  // namespace cpu
}  // namespace spikeops
