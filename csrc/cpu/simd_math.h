// Branch-free float math that GCC auto-vectorises (libm's expf does not vectorise without
// -ffast-math). Accuracy: exp within ~2 ulp.
#pragma once
#include <cstdint>
#include <cstring>

namespace spikeops {
namespace cpu {

// exp(-a) for a >= 0 (NaN kept), a clamped to 87 (exp(-87) ~ 1.6e-38, still a normal float).
static inline __attribute__((always_inline)) float exp_minus(float a) {
  // the clamp as one compare-select (std::min / std::max, under IEEE NaN rules, compiled to chains
  // of compares and blends)
  const float x = -(87.0f < a ? 87.0f : a);
  // x = n ln2 + r, |r| <= ln2/2: n = x log2(e) rounded to nearest by adding and subtracting
  // 1.5 * 2^23 (exact for |n| < 2^22; t's low mantissa bits then hold n)
  const float t = x * 1.44269504088896341f + 12582912.0f;
  const float n = t - 12582912.0f;
  const float r = (x - n * 0.693359375f) - n * (-2.12194440e-4f);
  // Cephes expf polynomial
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 2^n from t's bits: bits(t) = 0x4B400000 + n, so (bits(t) - 0x4B400000 + 127) << 23 (unsigned:
  // NaN's bits wrap instead of shifting a negative int)
  uint32_t bits;
  std::memcpy(&bits, &t, sizeof(bits));
  bits = (bits - (0x4B400000u - 127u)) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

}  // namespace cpu
}  // namespace spikeops
