// The uint8 form compact() keeps of a layer input that holds small counts (Spikformer's residual
// sums of spikes; semantics: spikeops/reference.py, to_counts):
//   counts[i] = (uint8) x[i],  ok = every x[i] is an integer in [0, 255]
// for fp32/fp16/bf16 x, contiguous, in one pass (ATen's bf16 -> uint8 cast alone took 7x a clone
// of x). Values that are not such integers still give a (meaningless) byte, and ok = false.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>

#include "../ops.h"
#include "float_staging.h"
#include "simd_variants.h"

namespace spikeops {
namespace cpu {
namespace {

constexpr int64_t kBlock = 2048;  // values per pass through the float staging buffer

// counts[0, n) from floats; returns false if one is not an integer in [0, 255] (-0 passes as 0,
// as in ATen's cast and back). Values outside [0, 255] (and NaN) are zeroed through their bits
// before the conversion, which then stays in range; they fail the check. Written without
// ternaries or std::min/max so that GCC vectorises it.
static inline __attribute__((always_inline)) bool floats_to_counts_body(const float* x, int64_t n, uint8_t* counts) {
  int32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float xi = x[i];
    const int32_t in_range = (xi >= 0.0f) & (xi <= 255.0f);  // false for NaN
    uint32_t bits;
    std::memcpy(&bits, &xi, sizeof(bits));
    bits &= 0u - static_cast<uint32_t>(in_range);
    float safe;
    std::memcpy(&safe, &bits, sizeof(safe));
    const int32_t c = static_cast<int32_t>(safe);
    bad |= (in_range & (safe == static_cast<float>(c))) ^ 1;
    counts[i] = static_cast<uint8_t>(c);
  }
  return !bad;
}
SPIKEOPS_SIMD_VARIANTS(, bool, floats_to_counts, (const float* x, int64_t n, uint8_t* counts), (x, n, counts))

// to_counts for one dtype: counts of x's values into cp; whether all were integers 0..255.
template <typename scalar_t>
bool counts_of(const at::Tensor& x, uint8_t* cp) {
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const int64_t n = x.numel();
  std::atomic<bool> ok{true};
  at::parallel_for(0, (n + kBlock - 1) / kBlock, 16, [&](int64_t begin, int64_t end) {
    float buf[kBlock];
    bool all = true;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t i0 = b * kBlock, m = std::min(kBlock, n - i0);
      all &= floats_to_counts(as_float(xp + i0, m, buf), m, cp + i0);
    }
    if (!all) ok.store(false, std::memory_order_relaxed);
  });
  return ok.load();
}

}  // namespace

std::tuple<at::Tensor, bool> to_counts(const at::Tensor& x) {
  TORCH_CHECK(x.is_contiguous(), "to_counts: x must be contiguous");
  auto counts = at::empty(x.sizes(), x.options().dtype(at::kByte));
  uint8_t* cp = counts.mutable_data_ptr<uint8_t>();
  switch (x.scalar_type()) {  // not fp64: through fp32, a value such as 255.0000001 would pass as 255
    case at::kFloat: return {counts, counts_of<float>(x, cp)};
    case at::kHalf: return {counts, counts_of<at::Half>(x, cp)};
    case at::kBFloat16: return {counts, counts_of<at::BFloat16>(x, cp)};
    default: TORCH_CHECK(false, "to_counts: x must be float32, float16 or bfloat16, got ", x.scalar_type());
  }
}

}  // namespace cpu
}  // namespace spikeops
