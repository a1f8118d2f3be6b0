// Bit-packing of spikes on the CPU (semantics: spikeops/reference.py, pack_spikes/unpack_spikes).
// pack:   x [R, n] (0./1. floats) -> words [R, ceil(n/64)] int64, bit j of word w = x[r, 64w + j];
//         also reports whether any element was neither 0 nor 1.
// unpack: words [R, W] int64 -> [R, n] 0./1. in the requested dtype (AVX2 where the CPU has it).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <type_traits>

#include "../ops.h"
#include "bits.h"
#include "float_staging.h"
#include "simd_variants.h"

namespace spikeops {
namespace cpu {
namespace {

#if defined(__x86_64__) && defined(__GNUC__)
// pack_row for fp16 / bf16 with AVX-512 straight from their bits, 32 values per compare (going
// through floats took ~4x a copy of the input): x != 0 is (bits & 0x7FFF) != 0, NaN included as
// for floats, and x == 1 is bits == one, the format's 1.0 (no other pattern equals 1).
__attribute__((target("avx512f,avx512bw"))) bool pack_row_16_avx512(const uint16_t* row, int64_t n, uint16_t one,
                                                                     uint64_t* words) {
  const __m512i magnitude = _mm512_set1_epi16(0x7FFF), ones = _mm512_set1_epi16(static_cast<short>(one));
  uint32_t not_binary = 0;  // lanes where (x != 0) differs from (x == 1)
  for (int64_t w = 0; w * 64 < n; ++w) {
    const int64_t m = std::min<int64_t>(64, n - w * 64);
    uint64_t bits = 0;
    for (int64_t j = 0; j < m; j += 32) {  // the lanes past the row load as 0
      const __mmask32 lanes = m - j >= 32 ? ~__mmask32{0} : static_cast<__mmask32>((1u << (m - j)) - 1);
      const __m512i v = _mm512_maskz_loadu_epi16(lanes, row + w * 64 + j);
      const __mmask32 nonzero = _mm512_test_epi16_mask(v, magnitude);
      not_binary |= nonzero & _mm512_cmpneq_epi16_mask(v, ones);
      bits |= static_cast<uint64_t>(nonzero) << j;
    }
    words[w] = bits;
  }
  return not_binary != 0;
}
#endif

// One row of n values into words; fp16/bf16 (without AVX-512) and fp64 go through buf one word at
// a time.
template <typename scalar_t>
bool pack_row(const scalar_t* row, int64_t n, uint64_t* words, float* buf) {
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (sizeof(scalar_t) == 2) {
    if (avx512_enabled()) {
      const scalar_t one_value(1.0f);
      uint16_t one;
      std::memcpy(&one, &one_value, sizeof(one));
      return pack_row_16_avx512(reinterpret_cast<const uint16_t*>(row), n, one, words);
    }
  }
#endif
  bool bad = false;
  for (int64_t w = 0; w * 64 < n; ++w) {
    const int64_t m = std::min<int64_t>(64, n - w * 64);
    as_float_into(row + w * 64, m, buf);
    bad |= pack_bits(buf, m, words + w);
  }
  return bad;
}

bool pack_row(const float* row, int64_t n, uint64_t* words, float*) { return pack_bits(row, n, words); }

// The low m bits of `bits` as 0./1. values into dst, for a dtype whose 1.0 has the bit pattern
// `one` in a Bits-sized integer: each lane of a 32-byte vector tests its bit of a broadcast chunk
// (8 fp32 or 16 fp16/bf16 values per vector), then keeps `one` or 0.
template <typename Bits>
static inline __attribute__((always_inline)) void
unpack_word_body(uint64_t bits, int64_t m, Bits one, Bits* dst) {
  constexpr int kLanes = 32 / sizeof(Bits);
  typedef Bits Vec __attribute__((vector_size(32)));
  Vec lane_bit;
  for (int i = 0; i < kLanes; ++i) lane_bit[i] = static_cast<Bits>(1u << i);
  int64_t j = 0;
  for (; j + kLanes <= m; j += kLanes) {
    const Vec chunk = Vec{} + static_cast<Bits>(bits >> j);
    const Vec v = reinterpret_cast<Vec>((chunk & lane_bit) != 0) & (Vec{} + one);
    __builtin_memcpy(dst + j, &v, sizeof(v));
  }
  for (; j < m; ++j) dst[j] = ((bits >> j) & 1u) ? one : Bits{0};
}
SPIKEOPS_SIMD_VARIANTS(template <typename Bits>, void, unpack_word, (uint64_t bits, int64_t m, Bits one, Bits* dst),
                       (bits, m, one, dst))

template <typename scalar_t>
void unpack_word(uint64_t bits, int64_t m, scalar_t* dst) {
  if constexpr (sizeof(scalar_t) == 4 || sizeof(scalar_t) == 2) {
    using Bits = std::conditional_t<sizeof(scalar_t) == 4, uint32_t, uint16_t>;
    const scalar_t one_value(1.0f);
    Bits one;
    std::memcpy(&one, &one_value, sizeof(one));
    unpack_word<Bits>(bits, m, one, reinterpret_cast<Bits*>(dst));
  } else {
    for (int64_t j = 0; j < m; ++j) dst[j] = ((bits >> j) & 1u) ? scalar_t(1.0f) : scalar_t(0.0f);
  }
}

}  // namespace

std::tuple<at::Tensor, bool> pack_spikes(const at::Tensor& x, bool check) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "pack_spikes: x must be contiguous [R, n]");
  const int64_t R = x.size(0), n = x.size(1), W = (n + 63) / 64;
  auto words = at::empty({R, W}, x.options().dtype(at::kLong));
  std::atomic<bool> bad{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pack_spikes", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    uint64_t* wp = reinterpret_cast<uint64_t*>(words.mutable_data_ptr<int64_t>());
    at::parallel_for(0, R, std::max<int64_t>(1, 16384 / n), [&](int64_t begin, int64_t end) {
      bool local_bad = false;
      float buf[64];
      for (int64_t r = begin; r < end; ++r) {
        local_bad |= pack_row(xp + r * n, n, wp + r * W, buf);
      }
      if (local_bad && check) bad.store(true, std::memory_order_relaxed);
    });
  });
  return {words, !bad.load()};
}

at::Tensor unpack_spikes(const at::Tensor& words, int64_t n, at::ScalarType dtype) {
  TORCH_CHECK(words.dim() == 2 && words.is_contiguous() && words.scalar_type() == at::kLong,
              "unpack_spikes: words must be contiguous int64 [R, W]");
  const int64_t R = words.size(0), W = words.size(1);
  TORCH_CHECK(n > 0 && (n + 63) / 64 == W, "unpack_spikes: n does not match the number of words");
  auto out = at::empty({R, n}, words.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "unpack_spikes", [&] {
    const uint64_t* wp = reinterpret_cast<const uint64_t*>(words.const_data_ptr<int64_t>());
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, R * W, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t r = i / W, w = i % W;
        unpack_word(wp[i], std::min<int64_t>(64, n - w * 64), op + r * n + w * 64);
      }
    });
  });
  return out;
}

}  // namespace cpu
}  // namespace spikeops
