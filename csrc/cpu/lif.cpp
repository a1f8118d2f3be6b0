// Fused multi-step LIF on the CPU: one call runs all T steps (forward) or all T steps in
// reverse (backward). The math is documented in spikeops/ops/lif.py; it must equal
// spikeops/reference.py bit for bit for spikes, so the update is written in the same order
// (H = V + (X - (V - v_reset)) / tau) and compiled without FMA contraction.
//
// Layout: x is [T, N] contiguous. Neurons are split across threads (at::parallel_for) and,
// inside a thread, into chunks of kChunk neurons whose membrane potential stays in a small
// stack array while the chunk walks over T. The per-step loops are plain float loops that
// GCC vectorises, compiled for AVX-512, AVX2 and baseline x86-64 and picked per call
// (simd_variants.h), so the extension runs on any x86-64 CPU.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../ops.h"
#include "batch_norm.h"
#include "cpu_features.h"
#include "float_staging.h"
#include "lif_math.h"
#include "simd_variants.h"

namespace spikeops {
namespace cpu {
namespace {

constexpr int64_t kChunk = 512;

// The vectorised step loops are compiled for x86-64-v4 (AVX-512 F, BW, DQ, VL: GCC vectorises the
// bf16 loops' 16-bit lanes at full width; batch_norm_lif on bf16 0.89-0.96x the time of an AVX-512 F
// build, stop 25), AVX2 and baseline x86-64, picked per call (simd_variants.h).

// x and s are fp32 or bf16 (E = float / uint16_t, see float_staging.h: in_loop); v, h fp32.
template <bool kHard, bool kDecayInput, typename E>
static inline __attribute__((always_inline)) void step_forward_impl(
    const E* __restrict x, float* __restrict v, E* __restrict s,
    float* __restrict h, int64_t n, LifConsts c) {
  for (int64_t i = 0; i < n; ++i) {
    const float hi = lif_charge<kDecayInput>(v[i], load_float(x, i), c);
    const bool fire = lif_fire(hi, c);
    store_spike(s, i, fire);
    h[i] = hi;
    v[i] = lif_reset<kHard>(hi, fire, c);
  }
}

#define SPIKEOPS_STEP_FORWARD(E)                                                                      \
  static inline __attribute__((always_inline)) void step_forward_body(                               \
      const E* x, float* v, E* s, float* h, int64_t n, LifConsts c, bool hard, bool decay_input) {    \
    if (hard) {                                                                                       \
      decay_input ? step_forward_impl<true, true>(x, v, s, h, n, c)                                   \
                  : step_forward_impl<true, false>(x, v, s, h, n, c);                                 \
    } else {                                                                                          \
      decay_input ? step_forward_impl<false, true>(x, v, s, h, n, c)                                  \
                  : step_forward_impl<false, false>(x, v, s, h, n, c);                                \
    }                                                                                                 \
  }                                                                                                   \
  SPIKEOPS_SIMD_VARIANTS(, void, step_forward, (const E* x, float* v, E* s, float* h, int64_t n,      \
                         LifConsts c, bool hard, bool decay_input), (x, v, s, h, n, c, hard, decay_input))
SPIKEOPS_STEP_FORWARD(float)
SPIKEOPS_STEP_FORWARD(uint16_t)
#undef SPIKEOPS_STEP_FORWARD

// A forward step of n neurons from their input x(i) (Stored or BatchNormed below) that hands each
// neuron's H and spike to out(i, H, fire) (Distances or Spikes below) instead of writing both.
template <bool kHard, bool kDecayInput, typename Input, typename Out>
static inline __attribute__((always_inline)) void step_impl(Input x, Out out, float* __restrict v, int64_t n,
                                                            LifConsts c) {
  for (int64_t i = 0; i < n; ++i) {
    const float hi = lif_charge<kDecayInput>(v[i], x(i), c);
    const bool fire = lif_fire(hi, c);
    out(i, hi, fire);
    v[i] = lif_reset<kHard>(hi, fire, c);
  }
}

template <typename Input, typename Out>
static inline __attribute__((always_inline)) void step_any(Input x, Out out, float* v, int64_t n, LifConsts c,
                                                           bool hard, bool decay_input) {
  if (hard) {
    decay_input ? step_impl<true, true>(x, out, v, n, c) : step_impl<true, false>(x, out, v, n, c);
  } else {
    decay_input ? step_impl<false, true>(x, out, v, n, c) : step_impl<false, false>(x, out, v, n, c);
  }
}

// For the backward: d = H - v_threshold (lif_distance, as load_state makes it from a saved H).
struct Distances {
  float* __restrict d;
  LifConsts c;
  __attribute__((always_inline)) void operator()(int64_t i, float h, bool) const { d[i] = lif_distance(h, c); }
};

// The spikes alone (fp32 or bf16, E = float / uint16_t): lif_forward_from_bn_input keeps no state.
template <typename E>
struct Spikes {
  E* __restrict s;
  __attribute__((always_inline)) void operator()(int64_t i, float, bool fire) const { store_spike(s, i, fire); }
};

// The input as stored (fp32 or bf16, E = float / uint16_t).
template <typename E>
struct Stored {
  const E* __restrict x;
  __attribute__((always_inline)) float operator()(int64_t i) const { return load_float(x, i); }
};

// BatchNorm's output from its input y as ATen's CPU kernel computes it: fma(y, a, b) (its vectorised
// y * alpha + beta is compiled to an FMA), rounded to y's dtype; a, b: alpha, beta of each neuron's
// channel.
template <typename E>
struct BatchNormed {
  const E* __restrict y;
  const float* __restrict a;
  const float* __restrict b;
  __attribute__((always_inline)) float operator()(int64_t i) const {
    const float z = __builtin_fmaf(load_float(y, i), a[i], b[i]);
    if constexpr (std::is_same_v<E, uint16_t>) {
      return bf16_to_float(float_to_bf16(z));
    } else {
      return z;
    }
  }
};

#define SPIKEOPS_STEP_DISTANCE(E)                                                                        \
  static inline __attribute__((always_inline)) void step_distance_body(                                 \
      const E* x, float* v, float* d, int64_t n, LifConsts c, bool hard, bool decay_input) {             \
    step_any(Stored<E>{x}, Distances{d, c}, v, n, c, hard, decay_input);                                 \
  }                                                                                                      \
  SPIKEOPS_SIMD_VARIANTS(, void, step_distance, (const E* x, float* v, float* d, int64_t n, LifConsts c, \
                         bool hard, bool decay_input), (x, v, d, n, c, hard, decay_input))
SPIKEOPS_STEP_DISTANCE(float)
SPIKEOPS_STEP_DISTANCE(uint16_t)
#undef SPIKEOPS_STEP_DISTANCE

// A step on BatchNorm's output (BatchNormed): the spikes alone into s when s is given, else
// step_distance's d. Its FMA is why simd_variants.h's AVX2 variant is AVX2 + FMA (without, each
// element would call libm's fmaf; the baseline variant does).
#define SPIKEOPS_STEP_BN(E)                                                                              \
  static inline __attribute__((always_inline)) void step_bn_body(const E* y, const float* a, const float* b, \
                                                                 float* v, float* d, E* s, int64_t n,    \
                                                                 LifConsts c, bool hard, bool decay_input) { \
    if (s) step_any(BatchNormed<E>{y, a, b}, Spikes<E>{s}, v, n, c, hard, decay_input);                 \
    else step_any(BatchNormed<E>{y, a, b}, Distances{d, c}, v, n, c, hard, decay_input);                \
  }                                                                                                      \
  SPIKEOPS_SIMD_VARIANTS(, void, step_bn, (const E* y, const float* a, const float* b, float* v, float* d, \
                         E* s, int64_t n, LifConsts c, bool hard, bool decay_input),                     \
                         (y, a, b, v, d, s, n, c, hard, decay_input))
SPIKEOPS_STEP_BN(float)
SPIKEOPS_STEP_BN(uint16_t)
#undef SPIKEOPS_STEP_BN

// d: H - v_threshold (lif_distance); gs and gx fp32 or bf16 (E). The surrogate gets a loop of its
// own: fused into the loop below, GCC does not vectorise it.
template <bool kHard, bool kDetach, int64_t kSurrogate, typename E>
static inline __attribute__((always_inline)) void step_backward_impl(
    const E* __restrict gs, const float* __restrict d, float* __restrict gv,
    E* __restrict gx, int64_t n, LifConsts c, float alpha, bool decay_input) {
  float sgbuf[kChunk];
  for (int64_t i = 0; i < n; ++i) sgbuf[i] = surrogate_grad<kSurrogate>(d[i], alpha);
  for (int64_t i = 0; i < n; ++i)
    store_float(gx, i, lif_grad_step<kHard, kDetach>(d[i], sgbuf[i], load_float(gs, i), gv[i], c, decay_input));
}

#define SPIKEOPS_BWD(H, D, S) step_backward_impl<H, D, S>(gs, d, gv, gx, n, c, alpha, decay_input)
#define SPIKEOPS_STEP_BACKWARD(E)                                                                             \
  static inline __attribute__((always_inline)) void step_backward_body(                                      \
      const E* gs, const float* d, float* gv, E* gx, int64_t n, LifConsts c, float alpha, bool hard,          \
      bool detach, int64_t surrogate, bool decay_input) {                                                     \
    if (surrogate == kSigmoid) {                                                                              \
      if (hard) { detach ? SPIKEOPS_BWD(true, true, kSigmoid) : SPIKEOPS_BWD(true, false, kSigmoid); }        \
      else { detach ? SPIKEOPS_BWD(false, true, kSigmoid) : SPIKEOPS_BWD(false, false, kSigmoid); }           \
    } else {                                                                                                  \
      if (hard) { detach ? SPIKEOPS_BWD(true, true, kATan) : SPIKEOPS_BWD(true, false, kATan); }              \
      else { detach ? SPIKEOPS_BWD(false, true, kATan) : SPIKEOPS_BWD(false, false, kATan); }                 \
    }                                                                                                         \
  }                                                                                                           \
  SPIKEOPS_SIMD_VARIANTS(, void, step_backward, (const E* gs, const float* d, float* gv, E* gx, int64_t n,    \
                         LifConsts c, float alpha, bool hard, bool detach, int64_t surrogate, bool decay_input), \
                         (gs, d, gv, gx, n, c, alpha, hard, detach, surrogate, decay_input))
SPIKEOPS_STEP_BACKWARD(float)
SPIKEOPS_STEP_BACKWARD(uint16_t)
#undef SPIKEOPS_STEP_BACKWARD
#undef SPIKEOPS_BWD

// The saved state of n neurons at one step: H (fp32 state) or H - v_threshold rounded to bf16.
static inline __attribute__((always_inline)) void store_state_bf16_body(const float* h, uint16_t* out, int64_t n,
                                                                       LifConsts c) {
  for (int64_t i = 0; i < n; ++i) out[i] = float_to_bf16(lif_distance(h[i], c));
}
SPIKEOPS_SIMD_VARIANTS(, void, store_state_bf16, (const float* h, uint16_t* out, int64_t n, LifConsts c),
                       (h, out, n, c))

// ... and back, as d = H - v_threshold for step_backward.
static inline __attribute__((always_inline)) void load_state_body(const float* h, const uint16_t* h_bf16, float* d,
                                                                 int64_t n, LifConsts c) {
  if (h_bf16) {
    for (int64_t i = 0; i < n; ++i) d[i] = bf16_to_float(h_bf16[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) d[i] = lif_distance(h[i], c);
  }
}
SPIKEOPS_SIMD_VARIANTS(, void, load_state, (const float* h, const uint16_t* h_bf16, float* d, int64_t n,
                       LifConsts c), (h, h_bf16, d, n, c))

constexpr int64_t kGrain = 4 * kChunk;
// lif_backward_through_bn's blocks of neurons, each with its own BatchNorm sums [2][C] (fp64)
constexpr int64_t kSumBlock = 16 * kChunk;

LifConsts consts_of(double tau, double v_threshold, double v_reset, bool hard_reset) {
  return {static_cast<float>(tau), static_cast<float>(v_threshold), static_cast<float>(hard_reset ? v_reset : 0.0)};
}

// The neuron settings of a backward pass.
struct BackwardArgs {
  LifConsts c;
  float alpha;
  bool hard_reset, detach_reset, decay_input;
  int64_t surrogate;
};

// The checks both backwards make of grad_spikes ([T, N] contiguous) and the surrogate id, then
// their neuron settings; op names the kernel in the errors.
BackwardArgs backward_args(const char* op, const at::Tensor& grad_spikes, double tau, double v_threshold,
                           double v_reset, bool hard_reset, bool decay_input, bool detach_reset, int64_t surrogate,
                           double alpha) {
  TORCH_CHECK(grad_spikes.dim() == 2 && grad_spikes.is_contiguous(), op, ": grad_spikes must be contiguous [T, N]");
  TORCH_CHECK(surrogate == kSigmoid || surrogate == kATan, op, ": unknown surrogate id");
  return {consts_of(tau, v_threshold, v_reset, hard_reset), static_cast<float>(alpha), hard_reset, detach_reset,
          decay_input, surrogate};
}

// The backward steps t = T-1 .. 0 of the n neurons from c0 (n <= kChunk): dL/dS gsp [T, N] -> dL/dX
// gxp [T, N]; state(t, buf) returns H - v_threshold of step t (load_state's d), in buf or elsewhere.
template <typename scalar_t, typename State>
void backward_chunk(const scalar_t* gsp, scalar_t* gxp, int64_t T, int64_t N, int64_t c0, int64_t n,
                    const BackwardArgs& b, const State& state) {
  float gv[kChunk], gsbuf[kChunk], gxbuf[kChunk], dbuf[kChunk];
  std::fill(gv, gv + n, 0.0f);
  for (int64_t t = T - 1; t >= 0; --t) {
    const int64_t off = t * N + c0;
    if constexpr (kInLoop<scalar_t>) {
      step_backward(in_loop(gsp + off), state(t, dbuf), gv, in_loop(gxp + off), n, b.c, b.alpha, b.hard_reset,
                    b.detach_reset, b.surrogate, b.decay_input);
    } else {
      step_backward(as_float(gsp + off, n, gsbuf), state(t, dbuf), gv, gxbuf, n, b.c, b.alpha, b.hard_reset,
                    b.detach_reset, b.surrogate, b.decay_input);
      store_floats(gxp + off, gxbuf, n);
    }
  }
}

// One forward step of n neurons (step_forward), or its d = H - v_threshold (step_distance): fp32 /
// bf16 read and written inside the step's loop, other dtypes staged through xbuf / sbuf (kChunk).
template <typename scalar_t>
void forward_step(const scalar_t* x, float* v, scalar_t* s, float* h, int64_t n, LifConsts c, bool hard,
                  bool decay_input, float* xbuf, float* sbuf) {
  if constexpr (kInLoop<scalar_t>) {
    step_forward(in_loop(x), v, in_loop(s), h, n, c, hard, decay_input);
  } else {
    step_forward(as_float(x, n, xbuf), v, sbuf, h, n, c, hard, decay_input);
    store_floats(s, sbuf, n);
  }
}

template <typename scalar_t>
void distance_step(const scalar_t* x, float* v, float* d, int64_t n, LifConsts c, bool hard, bool decay_input,
                   float* xbuf) {
  if constexpr (kInLoop<scalar_t>) {
    step_distance(in_loop(x), v, d, n, c, hard, decay_input);
  } else {
    step_distance(as_float(x, n, xbuf), v, d, n, c, hard, decay_input);
  }
}

// The backward of [T, N] whose H is recomputed from the forward's input, a chunk of neurons at a
// time (H never written out): forward_steps(c0, n, v, d) runs lif_forward's steps t = 0..T-1 of
// neurons c0 .. c0 + n from the potentials v (at v_reset), writing each step's H - v_threshold
// (load_state's d) to d + t * kChunk; then backward_chunk reads them there. The threads take whole
// blocks of `block` neurons (a multiple of kChunk), chunks starting at the block's start, whatever
// their number. after_chunk(c0, n), if given, runs once a chunk's dL/dX is written (while in cache).
template <typename scalar_t, typename ForwardSteps, typename AfterChunk = std::nullptr_t>
void backward_recomputing(const scalar_t* gsp, scalar_t* gxp, int64_t T, int64_t N, const BackwardArgs& b,
                          const ForwardSteps& forward_steps, const AfterChunk& after_chunk = nullptr,
                          int64_t block = kGrain) {
  at::parallel_for(0, (N + block - 1) / block, 1, [&](int64_t b0, int64_t b1) {
    const int64_t begin = b0 * block, end = std::min(N, b1 * block);
    std::vector<float> d(T * kChunk);
    float v[kChunk];
    for (int64_t c0 = begin; c0 < end; c0 += kChunk) {
      const int64_t n = std::min(kChunk, end - c0);
      std::fill(v, v + n, b.c.v_reset);
      forward_steps(c0, n, v, d.data());
      backward_chunk(gsp, gxp, T, N, c0, n, b,
                     [&](int64_t t, float*) { return static_cast<const float*>(d.data() + t * kChunk); });
      if constexpr (!std::is_same_v<AfterChunk, std::nullptr_t>) after_chunk(c0, n);
    }
  });
}

// BatchNorm's alpha and beta (scale, shift [C]) of the n neurons from c0 into a, sh: element i of a
// row is channel i / inner % C.
void chunk_affine(int64_t c0, int64_t n, int64_t inner, const std::vector<float>& scale,
                  const std::vector<float>& shift, float* a, float* sh) {
  channel_runs(c0, n, static_cast<int64_t>(scale.size()), inner, [&](int64_t i, int64_t len, int64_t c) {
    if (inner == 1) {  // [rows, C]: consecutive channels
      std::copy(scale.data() + c, scale.data() + c + len, a + i);
      std::copy(shift.data() + c, shift.data() + c + len, sh + i);
    } else {
      std::fill(a + i, a + i + len, scale[c]);
      std::fill(sh + i, sh + i + len, shift[c]);
    }
  });
}

// lif_backward_from_bn_input's work for fp32 / bf16 y [T, M]: per chunk of neurons, their BatchNorm
// alpha and beta (element i of a row is channel i / inner % C), then the forward steps on Z = BN(y).
// With sums (lif_backward_through_bn): also BatchNorm's channel sums of dL/dZ (batch_norm.h) from
// each chunk, into sums [blocks of kSumBlock neurons][2][C] (so that their order does not depend on
// the number of threads).
template <typename scalar_t>
void bn_backward_chunks(const at::Tensor& grad_spikes, const at::Tensor& y, const std::vector<float>& scale,
                        const std::vector<float>& shift, int64_t inner, const BackwardArgs& b, at::Tensor& grad_x,
                        const float* mean = nullptr, double* sums = nullptr) {
  const int64_t T = y.size(0), M = y.size(1), C = static_cast<int64_t>(scale.size());
  const scalar_t* yp = y.const_data_ptr<scalar_t>();
  scalar_t* gxp = grad_x.mutable_data_ptr<scalar_t>();
  auto add_sums = [&](int64_t c0, int64_t n) {
    double* s = sums + c0 / kSumBlock * 2 * C;
    add_channel_sums(in_loop(gxp + c0), in_loop(yp + c0), T, M, c0, n, C, inner, mean, s, s + C);
  };
  auto forward_steps = [&](int64_t c0, int64_t n, float* v, float* d) {
    float a[kChunk], sh[kChunk];
    chunk_affine(c0, n, inner, scale, shift, a, sh);
    for (int64_t t = 0; t < T; ++t)
      step_bn(in_loop(yp + t * M + c0), a, sh, v, d + t * kChunk, nullptr, n, b.c, b.hard_reset, b.decay_input);
  };
  const scalar_t* gsp = grad_spikes.const_data_ptr<scalar_t>();
  if (sums) backward_recomputing(gsp, gxp, T, M, b, forward_steps, add_sums, kSumBlock);
  else backward_recomputing(gsp, gxp, T, M, b, forward_steps);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> lif_forward(
    const at::Tensor& x, double tau, double v_threshold, double v_reset,
    bool hard_reset, bool decay_input, bool save_h, bool state_bf16) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "lif_forward: x must be contiguous [T, N]");
  const int64_t T = x.size(0), N = x.size(1);
  auto spikes = at::empty_like(x);
  const auto state_type = state_bf16 ? at::kBFloat16 : at::kFloat;
  auto h = save_h ? at::empty({T, N}, x.options().dtype(state_type))
                  : at::empty({0}, x.options().dtype(state_type));
  const LifConsts c = consts_of(tau, v_threshold, v_reset, hard_reset);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lif_forward", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* sp = spikes.mutable_data_ptr<scalar_t>();
    float* hp = save_h && !state_bf16 ? h.mutable_data_ptr<float>() : nullptr;
    uint16_t* hbp = save_h && state_bf16 ? reinterpret_cast<uint16_t*>(h.mutable_data_ptr<at::BFloat16>()) : nullptr;
    at::parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
      float v[kChunk], xbuf[kChunk], sbuf[kChunk], hbuf[kChunk];
      for (int64_t c0 = begin; c0 < end; c0 += kChunk) {
        const int64_t n = std::min(kChunk, end - c0);
        std::fill(v, v + n, c.v_reset);
        for (int64_t t = 0; t < T; ++t) {
          const int64_t off = t * N + c0;
          forward_step(xp + off, v, sp + off, hp ? hp + off : hbuf, n, c, hard_reset, decay_input, xbuf, sbuf);
          if (hbp) store_state_bf16(hbuf, hbp + off, n, c);
        }
      }
    });
  });
  return {spikes, h};
}


at::Tensor lif_backward(
    const at::Tensor& grad_spikes, const at::Tensor& h, double tau, double v_threshold,
    double v_reset, bool hard_reset, bool decay_input, bool detach_reset,
    int64_t surrogate, double alpha) {
  const BackwardArgs b = backward_args("lif_backward", grad_spikes, tau, v_threshold, v_reset, hard_reset,
                                       decay_input, detach_reset, surrogate, alpha);
  TORCH_CHECK(h.sizes() == grad_spikes.sizes() && h.is_contiguous() &&
                  (h.scalar_type() == at::kFloat || h.scalar_type() == at::kBFloat16),
              "lif_backward: h must be the contiguous fp32/bf16 state of lif_forward");
  const int64_t T = grad_spikes.size(0), N = grad_spikes.size(1);
  auto grad_x = at::empty_like(grad_spikes);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_spikes.scalar_type(), "lif_backward", [&] {
    const scalar_t* gsp = grad_spikes.const_data_ptr<scalar_t>();
    scalar_t* gxp = grad_x.mutable_data_ptr<scalar_t>();
    const bool bf16 = h.scalar_type() == at::kBFloat16;
    const float* hp = bf16 ? nullptr : h.const_data_ptr<float>();
    const uint16_t* hbp = bf16 ? reinterpret_cast<const uint16_t*>(h.const_data_ptr<at::BFloat16>()) : nullptr;
    at::parallel_for(0, N, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t c0 = begin; c0 < end; c0 += kChunk) {
        const int64_t n = std::min(kChunk, end - c0);
        backward_chunk(gsp, gxp, T, N, c0, n, b, [&](int64_t t, float* d) {
          const int64_t off = t * N + c0;
          load_state(hp ? hp + off : nullptr, hbp ? hbp + off : nullptr, d, n, b.c);
          return static_cast<const float*>(d);
        });
      }
    });
  });
  return grad_x;
}

at::Tensor lif_backward_from_input(
    const at::Tensor& grad_spikes, const at::Tensor& x, double tau, double v_threshold,
    double v_reset, bool hard_reset, bool decay_input, bool detach_reset,
    int64_t surrogate, double alpha) {
  const BackwardArgs b = backward_args("lif_backward_from_input", grad_spikes, tau, v_threshold, v_reset, hard_reset,
                                       decay_input, detach_reset, surrogate, alpha);
  TORCH_CHECK(x.sizes() == grad_spikes.sizes() && x.is_contiguous() && x.scalar_type() == grad_spikes.scalar_type(),
              "lif_backward_from_input: x must be the contiguous [T, N] input of the forward, in grad_spikes' dtype");
  const int64_t T = grad_spikes.size(0), N = grad_spikes.size(1);
  auto grad_x = at::empty_like(grad_spikes);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_spikes.scalar_type(), "lif_backward_from_input", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    backward_recomputing(grad_spikes.const_data_ptr<scalar_t>(), grad_x.mutable_data_ptr<scalar_t>(), T, N, b,
                         [&](int64_t c0, int64_t n, float* v, float* d) {
      float xbuf[kChunk];
      for (int64_t t = 0; t < T; ++t)
        distance_step(xp + t * N + c0, v, d + t * kChunk, n, b.c, hard_reset, decay_input, xbuf);
    });
  });
  return grad_x;
}

namespace {

// The checks of lif_forward_from_bn_input, lif_backward_from_bn_input and lif_backward_through_bn (op
// names it) and BatchNorm's alpha, beta per channel as ATen's
// batch_norm_cpu_collect_linear_and_constant_terms (contracted).
void bn_affine(const char* op, const at::Tensor& y, const at::Tensor& mean, const at::Tensor& invstd,
               const at::Tensor& weight, const at::Tensor& bias, int64_t inner, std::vector<float>& scale,
               std::vector<float>& shift) {
  TORCH_CHECK(y.dim() == 2 && y.is_contiguous() && (y.scalar_type() == at::kFloat || y.scalar_type() == at::kBFloat16),
              op, ": y must be the contiguous fp32/bf16 [T, M] BatchNorm input");
  const int64_t C = mean.numel();
  for (const at::Tensor* p : {&mean, &invstd, &weight, &bias})
    TORCH_CHECK(p->dim() == 1 && p->numel() == C && p->is_contiguous() && p->scalar_type() == at::kFloat,
                op, ": mean, invstd, weight and bias must be contiguous fp32 [C]");
  TORCH_CHECK(C > 0 && inner > 0 && y.size(1) % (inner * C) == 0, op,
              ": the rows of y must hold whole [C, inner] blocks");
  scale.resize(C);
  shift.resize(C);
  const float *mp = mean.const_data_ptr<float>(), *ip = invstd.const_data_ptr<float>(),
              *wp = weight.const_data_ptr<float>(), *bp = bias.const_data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) {
    scale[c] = ip[c] * wp[c];
    shift[c] = __builtin_fmaf(-mp[c], scale[c], bp[c]);
  }
}

// The backwards' y is the forward's: grad_spikes' shape and dtype.
void check_grad_like_y(const char* op, const at::Tensor& grad_spikes, const at::Tensor& y) {
  TORCH_CHECK(y.sizes() == grad_spikes.sizes() && y.scalar_type() == grad_spikes.scalar_type(), op,
              ": y must be the [T, M] BatchNorm input, in grad_spikes' shape and dtype");
}

}  // namespace

at::Tensor lif_forward_from_bn_input(
    const at::Tensor& y, const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& weight,
    const at::Tensor& bias, int64_t inner, double tau, double v_threshold, double v_reset, bool hard_reset,
    bool decay_input) {
  std::vector<float> scale, shift;
  bn_affine("lif_forward_from_bn_input", y, mean, invstd, weight, bias, inner, scale, shift);
  const int64_t T = y.size(0), M = y.size(1);
  const LifConsts c = consts_of(tau, v_threshold, v_reset, hard_reset);
  auto spikes = at::empty_like(y);
  auto run = [&](auto tag) {
    using scalar_t = decltype(tag);
    const auto* yp = in_loop(y.const_data_ptr<scalar_t>());
    auto* sp = in_loop(spikes.mutable_data_ptr<scalar_t>());
    at::parallel_for(0, M, kGrain, [&](int64_t begin, int64_t end) {
      float v[kChunk], a[kChunk], sh[kChunk];
      for (int64_t c0 = begin; c0 < end; c0 += kChunk) {
        const int64_t n = std::min(kChunk, end - c0);
        chunk_affine(c0, n, inner, scale, shift, a, sh);
        std::fill(v, v + n, c.v_reset);
        for (int64_t t = 0; t < T; ++t)
          step_bn(yp + t * M + c0, a, sh, v, nullptr, sp + t * M + c0, n, c, hard_reset, decay_input);
      }
    });
  };
  if (y.scalar_type() == at::kFloat) run(float{});
  else run(c10::BFloat16{});
  return spikes;
}

at::Tensor lif_backward_from_bn_input(
    const at::Tensor& grad_spikes, const at::Tensor& y, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& weight, const at::Tensor& bias, int64_t inner, double tau, double v_threshold,
    double v_reset, bool hard_reset, bool decay_input, bool detach_reset, int64_t surrogate, double alpha) {
  const BackwardArgs b = backward_args("lif_backward_from_bn_input", grad_spikes, tau, v_threshold, v_reset,
                                       hard_reset, decay_input, detach_reset, surrogate, alpha);
  check_grad_like_y("lif_backward_from_bn_input", grad_spikes, y);
  std::vector<float> scale, shift;
  bn_affine("lif_backward_from_bn_input", y, mean, invstd, weight, bias, inner, scale, shift);
  auto grad_x = at::empty_like(grad_spikes);
  if (y.scalar_type() == at::kFloat) bn_backward_chunks<float>(grad_spikes, y, scale, shift, inner, b, grad_x);
  else bn_backward_chunks<c10::BFloat16>(grad_spikes, y, scale, shift, inner, b, grad_x);
  return grad_x;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lif_backward_through_bn(
    const at::Tensor& grad_spikes, const at::Tensor& y, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& weight, const at::Tensor& bias, int64_t inner, bool grad_affine, double tau,
    double v_threshold, double v_reset, bool hard_reset, bool decay_input, bool detach_reset, int64_t surrogate,
    double alpha) {
  const BackwardArgs b = backward_args("lif_backward_through_bn", grad_spikes, tau, v_threshold, v_reset,
                                       hard_reset, decay_input, detach_reset, surrogate, alpha);
  check_grad_like_y("lif_backward_through_bn", grad_spikes, y);
  std::vector<float> scale, shift;
  bn_affine("lif_backward_through_bn", y, mean, invstd, weight, bias, inner, scale, shift);
  const int64_t C = mean.numel(), blocks = (y.size(1) + kSumBlock - 1) / kSumBlock;
  std::vector<double> sums(blocks * 2 * C, 0.0);  // [block][sum dz, sum dz (y - mean)][C]
  auto grad = at::empty_like(grad_spikes);          // dL/dZ, then dL/dy in place
  at::Tensor dw = grad_affine ? at::empty({C}, mean.options()) : at::Tensor();
  at::Tensor db = grad_affine ? at::empty({C}, mean.options()) : at::Tensor();
  const float* mp = mean.const_data_ptr<float>();
  auto run = [&](auto tag) {
    using scalar_t = decltype(tag);
    bn_backward_chunks<scalar_t>(grad_spikes, y, scale, shift, inner, b, grad, mp, sums.data());
    for (int64_t q = 1; q < blocks; ++q)  // in block order
      for (int64_t i = 0; i < 2 * C; ++i) sums[i] += sums[q * 2 * C + i];
    batch_norm_input_grad(in_loop(grad.const_data_ptr<scalar_t>()), in_loop(y.const_data_ptr<scalar_t>()), y.numel(),
                          C, inner, sums.data(), sums.data() + C, mp, invstd.const_data_ptr<float>(),
                          weight.const_data_ptr<float>(), in_loop(grad.mutable_data_ptr<scalar_t>()),
                          grad_affine ? dw.mutable_data_ptr<float>() : nullptr,
                          grad_affine ? db.mutable_data_ptr<float>() : nullptr);
  };
  if (y.scalar_type() == at::kFloat) run(float{});
  else run(c10::BFloat16{});
  return {grad, dw, db};
}

}  // namespace cpu
}  // namespace spikeops
