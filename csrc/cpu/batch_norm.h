// BatchNorm's backward in training mode (batch statistics) for batch_norm_lif's C++ path, in two
// parts: the channel sums, accumulated by the LIF backward (lif.cpp, lif_backward_through_bn) while
// its dL/dZ is in cache, and the input gradient from them (batch_norm.cpp). With M = R * inner
// positions per channel c of y [R, C, inner]:
//
//   db_c = sum dz,   dw_c = invstd_c sum dz (y - mean_c),   k_c = invstd_c^2 sum dz (y - mean_c) / M
//   dy   = (dz - db_c / M - (y - mean_c) k_c) invstd_c w_c
//
// ATen's formula (aten/src/ATen/native/batch_norm.cpp); the sums are fp32 over a run of positions
// (inner > 1) or over a position's time steps (inner 1) and fp64 beyond, so the gradients differ
// from ATen's in rounding only.
#pragma once
#include <algorithm>
#include <cstdint>

namespace spikeops {
namespace cpu {

// The n positions from p0 of rows of C * inner values (position p is channel p / inner % C) as
// runs: f(i, len, c) for the positions p0 + i .. p0 + i + len - 1, which are with inner 1 of the
// consecutive channels c .. c + len - 1, else all of channel c.
template <typename F>
inline __attribute__((always_inline)) void channel_runs(int64_t p0, int64_t n, int64_t C, int64_t inner, F&& f) {
  if (inner == 1) {
    for (int64_t i = 0, c = p0 % C; i < n; c = 0) {
      const int64_t len = std::min(C - c, n - i);
      f(i, len, c);
      i += len;
    }
    return;
  }
  for (int64_t i = 0, c = p0 / inner % C, pos = p0 % inner; i < n; pos = 0, c = c + 1 == C ? 0 : c + 1) {
    const int64_t len = std::min(inner - pos, n - i);
    f(i, len, c);
    i += len;
  }
}

// sums[0][c] += sum dz, sums[1][c] += sum dz (y - mean[c]) over n positions of y / dz [*, C, inner]
// starting at position p0 of a row of C * inner (element i of the row is channel i / inner % C),
// in each of `steps` arrays step_stride elements apart (the LIF's time steps).
// T: float, or uint16_t for bf16 (float_staging.h's in_loop types).
template <typename T>
void add_channel_sums(const T* dz, const T* y, int64_t steps, int64_t step_stride, int64_t p0, int64_t n, int64_t C,
                      int64_t inner, const float* mean, double* s1, double* s2);
extern template void add_channel_sums<float>(const float*, const float*, int64_t, int64_t, int64_t, int64_t, int64_t,
                                             int64_t, const float*, double*, double*);
extern template void add_channel_sums<uint16_t>(const uint16_t*, const uint16_t*, int64_t, int64_t, int64_t, int64_t,
                                                int64_t, int64_t, const float*, double*, double*);

// dy (may be dz itself) and, where not null, dw, db [C] from the sums over the M = numel / C
// positions: y, dz, dy numel values as [R, C, inner].
template <typename T>
void batch_norm_input_grad(const T* dz, const T* y, int64_t numel, int64_t C, int64_t inner, const double* s1,
                           const double* s2, const float* mean, const float* invstd, const float* weight, T* dy,
                           float* dw, float* db);
extern template void batch_norm_input_grad<float>(const float*, const float*, int64_t, int64_t, int64_t,
                                                  const double*, const double*, const float*, const float*,
                                                  const float*, float*, float*, float*);
extern template void batch_norm_input_grad<uint16_t>(const uint16_t*, const uint16_t*, int64_t, int64_t, int64_t,
                                                     const double*, const double*, const float*, const float*,
                                                     const float*, uint16_t*, float*, float*);

}  // namespace cpu
}  // namespace spikeops
