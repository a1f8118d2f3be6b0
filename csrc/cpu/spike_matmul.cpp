// Spike matmul on the CPU by AND + popcount (semantics: spikeops/reference.py, spike_matmul).
// a_words [Bt, M, W] and bt_words [Bt, N, W] are 0/1 matrices packed along K (pack.cpp);
// out[b, m, n] = sum_w popcount(a_words[b, m, w] & bt_words[b, n, w]) = (A @ B)[b, m, n], exact.
// The popcount loop is compiled for x86-64-v4, the AVX2 set with POPCNT, and baseline x86-64
// (which lacks the POPCNT instruction), picked per call (simd_variants.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "../ops.h"
#include "popcount.h"
#include "simd_variants.h"

namespace spikeops {
namespace cpu {
static inline __attribute__((always_inline)) void
popcount_row_body(const uint64_t* a, const uint64_t* bt, int64_t N, int64_t W, int32_t* out) {
  for (int64_t n = 0; n < N; ++n) {
    const uint64_t* b = bt + n * W;
    int32_t acc = 0;
    for (int64_t w = 0; w < W; ++w) acc += __builtin_popcountll(a[w] & b[w]);
    out[n] = acc;
  }
}
SPIKEOPS_SIMD_VARIANTS(, void, popcount_row,
                       (const uint64_t* a, const uint64_t* bt, int64_t N, int64_t W, int32_t* out),
                       (a, bt, N, W, out))

at::Tensor spike_matmul_packed(const at::Tensor& a_words, const at::Tensor& bt_words) {
  TORCH_CHECK(a_words.dim() == 3 && bt_words.dim() == 3 && a_words.is_contiguous() && bt_words.is_contiguous() &&
                  a_words.scalar_type() == at::kLong && bt_words.scalar_type() == at::kLong,
              "spike_matmul_packed: expects contiguous int64 words [Bt, M, W] and [Bt, N, W]");
  TORCH_CHECK(a_words.size(0) == bt_words.size(0) && a_words.size(2) == bt_words.size(2),
              "spike_matmul_packed: batch or word counts differ");
  const int64_t Bt = a_words.size(0), M = a_words.size(1), N = bt_words.size(1), W = a_words.size(2);
  auto out = at::empty({Bt, M, N}, a_words.options().dtype(at::kInt));
  const uint64_t* ap = reinterpret_cast<const uint64_t*>(a_words.const_data_ptr<int64_t>());
  const uint64_t* bp = reinterpret_cast<const uint64_t*>(bt_words.const_data_ptr<int64_t>());
  int32_t* op = out.mutable_data_ptr<int32_t>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, N * W));
  at::parallel_for(0, Bt * M, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / M;
      popcount_row(ap + row * W, bp + b * N * W, N, W, op + row * N);
    }
  });
  return out;
}

}  // namespace cpu
}  // namespace spikeops
