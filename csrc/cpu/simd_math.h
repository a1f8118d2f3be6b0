// Branch-free float math (no ternaries: GCC's if-conversion gives up on them) that GCC auto-vectorises (libm's expf does not vectorise
// without -ffast-math). Accuracy: exp within ~2 ulp on [-87, 88].
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>

namespace spikeops {
namespace cpu {

static inline __attribute__((always_inline)) float exp_approx(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  // x = n ln2 + r, |r| <= ln2/2
  // round to nearest through a float->int conversion (vectorises; floorf needs SSE4.1)
  const float fn = x * 1.44269504088896341f;
  const float n = static_cast<float>(static_cast<int32_t>(fn + __builtin_copysignf(0.5f, fn)));
  const float r = (x - n * 0.693359375f) - n * (-2.12194440e-4f);
  // Cephes expf polynomial
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

}  // namespace cpu
}  // namespace spikeops
