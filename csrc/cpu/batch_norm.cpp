// BatchNorm's backward from channel sums (batch_norm.h): the sums' runs and the input gradient,
// vectorised over 16 fp32 lanes (GCC vector code, compiled for AVX-512, AVX2 and baseline x86-64,
// picked per call: simd_variants.h).
#include "batch_norm.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "float_staging.h"
#include "simd_variants.h"

namespace spikeops {
namespace cpu {
namespace {

constexpr int kLanes = 16;
typedef float Floats __attribute__((vector_size(4 * kLanes)));
typedef uint32_t Words __attribute__((vector_size(4 * kLanes)));
typedef uint16_t Halves __attribute__((vector_size(2 * kLanes)));

inline __attribute__((always_inline)) Floats load_lanes(const float* p) {
  Floats v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
inline __attribute__((always_inline)) Floats load_lanes(const uint16_t* p) {  // bf16: its bits << 16
  Halves h;
  __builtin_memcpy(&h, p, sizeof(h));
  return reinterpret_cast<Floats>(__builtin_convertvector(h, Words) << 16);
}
typedef double Doubles __attribute__((vector_size(8 * kLanes)));
inline __attribute__((always_inline)) void add_lanes(double* p, Floats v) {  // p[0, kLanes) += v
  Doubles d;
  __builtin_memcpy(&d, p, sizeof(d));
  d += __builtin_convertvector(v, Doubles);
  __builtin_memcpy(p, &d, sizeof(d));
}
inline __attribute__((always_inline)) void store_lanes(float* p, Floats v) { __builtin_memcpy(p, &v, sizeof(v)); }
inline __attribute__((always_inline)) void store_lanes(uint16_t* p, Floats v) {  // as float_to_bf16
  const Halves h = __builtin_convertvector(bf16_bits(v, reinterpret_cast<Words>(v)), Halves);
  __builtin_memcpy(p, &h, sizeof(h));
}

// The sums of one run of n positions of channel c (inner > 1).
template <typename T>
inline __attribute__((always_inline)) void run_sums(const T* g, const T* x, int64_t n, float m, double& s1,
                                                    double& s2) {
  Floats a1 = {}, a2 = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const Floats gl = load_lanes(g + i);
    a1 += gl;
    a2 += gl * (load_lanes(x + i) - m);
  }
  float r1 = 0.0f, r2 = 0.0f;
  for (int l = 0; l < kLanes; ++l) r1 += a1[l], r2 += a2[l];
  for (; i < n; ++i) {
    const float gl = load_float(g, i);
    r1 += gl;
    r2 += gl * (load_float(x, i) - m);
  }
  s1 += r1;
  s2 += r2;
}

// The sums over `steps` arrays (step_stride apart) of the n positions from p0. With inner 1 each
// position's values over the steps are summed in fp32 first, then added to the fp64 totals (one
// fp64 add per position instead of one per value).
template <typename T>
static inline __attribute__((always_inline)) void channel_sums_body(const T* dz, const T* y, int64_t steps,
                                                                    int64_t step_stride, int64_t p0, int64_t n,
                                                                    int64_t C, int64_t inner, const float* mean,
                                                                    double* s1, double* s2) {
  if (inner > 1) {
    for (int64_t t = 0; t < steps; ++t) {
      const T* g = dz + t * step_stride;
      const T* x = y + t * step_stride;
      channel_runs(p0, n, C, inner, [&](int64_t i, int64_t len, int64_t c) {
        run_sums(g + i, x + i, len, mean[c], s1[c], s2[c]);
      });
    }
    return;
  }
  channel_runs(p0, n, C, 1, [&](int64_t i, int64_t len, int64_t c) {
    int64_t j = 0;
    for (; j + kLanes <= len; j += kLanes) {
      const Floats m = load_lanes(mean + c + j);
      Floats a1 = {}, a2 = {};
      for (int64_t t = 0; t < steps; ++t) {
        const Floats gl = load_lanes(dz + t * step_stride + i + j);
        a1 += gl;
        a2 += gl * (load_lanes(y + t * step_stride + i + j) - m);
      }
      add_lanes(s1 + c + j, a1);
      add_lanes(s2 + c + j, a2);
    }
    for (; j < len; ++j) {
      float a1 = 0.0f, a2 = 0.0f;
      for (int64_t t = 0; t < steps; ++t) {
        const float gj = load_float(dz, t * step_stride + i + j);
        a1 += gj;
        a2 += gj * (load_float(y, t * step_stride + i + j) - mean[c + j]);
      }
      s1[c + j] += a1;
      s2[c + j] += a2;
    }
  });
}

// dy for the runs [u0, u1) of inner positions (run u: channel u % C), or with inner 1 for the rows
// [u0, u1) of C positions; per channel: mean, db / M (md), k, invstd w (s).
template <typename T>
static inline __attribute__((always_inline)) void input_grad_body(const T* dz, const T* y, int64_t u0, int64_t u1,
                                                                  int64_t C, int64_t inner, const float* mean,
                                                                  const float* md, const float* k, const float* s,
                                                                  T* dy) {
  if (inner > 1) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t c = u % C;
      const float m = mean[c], mdc = md[c], kc = k[c], sc = s[c];
      const T* g = dz + u * inner;
      const T* x = y + u * inner;
      T* o = dy + u * inner;
      int64_t i = 0;
      for (; i + kLanes <= inner; i += kLanes)
        store_lanes(o + i, (load_lanes(g + i) - mdc - (load_lanes(x + i) - m) * kc) * sc);
      for (; i < inner; ++i) store_float(o, i, (load_float(g, i) - mdc - (load_float(x, i) - m) * kc) * sc);
    }
  } else {
    for (int64_t r = u0; r < u1; ++r) {
      const T* g = dz + r * C;
      const T* x = y + r * C;
      T* o = dy + r * C;
      int64_t c = 0;
      for (; c + kLanes <= C; c += kLanes)
        store_lanes(o + c, (load_lanes(g + c) - load_lanes(md + c) - (load_lanes(x + c) - load_lanes(mean + c)) *
                                                                        load_lanes(k + c)) * load_lanes(s + c));
      for (; c < C; ++c) store_float(o, c, (load_float(g, c) - md[c] - (load_float(x, c) - mean[c]) * k[c]) * s[c]);
    }
  }
}

SPIKEOPS_SIMD_VARIANTS(template <typename T>, void, channel_sums, (const T* dz, const T* y, int64_t steps,
                       int64_t step_stride, int64_t p0, int64_t n, int64_t C, int64_t inner, const float* mean,
                       double* s1, double* s2), (dz, y, steps, step_stride, p0, n, C, inner, mean, s1, s2))
SPIKEOPS_SIMD_VARIANTS(template <typename T>, void, input_grad, (const T* dz, const T* y, int64_t u0, int64_t u1,
                       int64_t C, int64_t inner, const float* mean, const float* md, const float* k, const float* s,
                       T* dy), (dz, y, u0, u1, C, inner, mean, md, k, s, dy))

}  // namespace

template <typename T>
void add_channel_sums(const T* dz, const T* y, int64_t steps, int64_t step_stride, int64_t p0, int64_t n, int64_t C,
                      int64_t inner, const float* mean, double* s1, double* s2) {
  channel_sums(dz, y, steps, step_stride, p0, n, C, inner, mean, s1, s2);
}

template <typename T>
void batch_norm_input_grad(const T* dz, const T* y, int64_t numel, int64_t C, int64_t inner, const double* s1,
                           const double* s2, const float* mean, const float* invstd, const float* weight, T* dy,
                           float* dw, float* db) {
  const double M = static_cast<double>(numel / C);
  std::vector<float> md(C), k(C), s(C);
  for (int64_t c = 0; c < C; ++c) {
    md[c] = static_cast<float>(s1[c] / M);
    k[c] = static_cast<float>(s2[c] * invstd[c] * invstd[c] / M);
    s[c] = invstd[c] * weight[c];
    if (db) db[c] = static_cast<float>(s1[c]);
    if (dw) dw[c] = static_cast<float>(s2[c] * invstd[c]);
  }
  if (!dy) return;
  if (inner > 1) {
    at::parallel_for(0, numel / inner, std::max<int64_t>(1, 4096 / inner), [&](int64_t u0, int64_t u1) {
      input_grad(dz, y, u0, u1, C, inner, mean, md.data(), k.data(), s.data(), dy);
    });
  } else {
    at::parallel_for(0, numel / C, std::max<int64_t>(1, 4096 / C), [&](int64_t r0, int64_t r1) {
      input_grad(dz, y, r0, r1, C, 1, mean, md.data(), k.data(), s.data(), dy);
    });
  }
}

template void add_channel_sums<float>(const float*, const float*, int64_t, int64_t, int64_t, int64_t, int64_t,
                                      int64_t, const float*, double*, double*);
template void add_channel_sums<uint16_t>(const uint16_t*, const uint16_t*, int64_t, int64_t, int64_t, int64_t, int64_t,
                                         int64_t, const float*, double*, double*);
template void batch_norm_input_grad<float>(const float*, const float*, int64_t, int64_t, int64_t, const double*,
                                           const double*, const float*, const float*, const float*, float*, float*,
                                           float*);
template void batch_norm_input_grad<uint16_t>(const uint16_t*, const uint16_t*, int64_t, int64_t, int64_t,
                                              const double*, const double*, const float*, const float*, const float*,
                                              uint16_t*, float*, float*);

}  // namespace cpu
}  // namespace spikeops
