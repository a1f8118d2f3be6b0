// One LIF step, shared by every kernel that runs the neuron (lif.cpp, ssa.cpp). The order of
// operations is the reference's (spikeops/reference.py) so that spikes match bit for bit.
#pragma once

#include "../ops.h"
#include "simd_math.h"

#include <cstdint>

namespace spikeops {
namespace cpu {

struct LifConsts {
  float tau, v_threshold, v_reset;  // v_reset is 0 for soft reset
};

// H = V + (X - (V - r)) / tau   (decay_input)   or   H = V - (V - r) / tau + X
template <bool kDecayInput>
static inline __attribute__((always_inline)) float lif_charge(float v, float x, LifConsts c) {
  return kDecayInput ? v + (x - (v - c.v_reset)) / c.tau : v - (v - c.v_reset) / c.tau + x;
}

static inline __attribute__((always_inline)) bool lif_fire(float h, LifConsts c) {
  return (h - c.v_threshold) >= 0.0f;
}

// hard: V = fire ? r + 0 * H : H;  soft: V = fire ? H - v_threshold : H
// (the reference's S r + (1 - S) H: "r + 0 * H" is r for finite H and NaN for H = +Inf, as there)
template <bool kHard>
static inline __attribute__((always_inline)) float lif_reset(float h, bool fire, LifConsts c) {
  return kHard ? (fire ? c.v_reset + 0.0f * h : h) : (fire ? h - c.v_threshold : h);
}

// Surrogate dS/dH at d = H - v_threshold.
//   sigmoid: alpha * e / (1 + e)^2 with e = exp(-|alpha d|)  (= alpha sig(alpha d)(1 - sig(alpha d)))
//   atan:    alpha / 2 / (1 + (pi/2 alpha d)^2)
template <int64_t kSurrogate>
static inline __attribute__((always_inline)) float surrogate_grad(float d, float alpha) {
  if (kSurrogate == kSigmoid) {
    const float z = alpha * d;
    const float e = exp_minus(__builtin_fabsf(z));
    const float one_e = 1.0f + e;
    return alpha * e / (one_e * one_e);
  } else {
    const float z = 1.57079632679489662f * alpha * d;
    return alpha / 2.0f / (1.0f + z * z);
  }
}

// One backward step, given d = H - v_threshold with -0 normalised to +0 (so that the spike is
// exactly "sign bit of d clear", also after rounding d to bf16). Returns dL/dX and carries
// dL/dV (gv) to the previous step:
//   dL/dH = gs * sg + gv * dV/dH,  dV/dH = 1 - S (+ (r - H) sg without detach) for hard reset,
//   1 (- v_threshold sg without detach) for soft reset; dL/dX = dL/dH / tau (decay_input) or
//   dL/dH; dL/dV_prev = dL/dH - dL/dH / tau.
template <bool kHard, bool kDetach>
static inline __attribute__((always_inline)) float lif_grad_step(float d, float sg, float gs, float& gv,
                                                                 LifConsts c, bool decay_input) {
  const float fire = __builtin_signbit(d) ? 0.0f : 1.0f;
  float dv_dh;
  if (kHard) {
    dv_dh = kDetach ? 1.0f - fire : (1.0f - fire) + ((c.v_reset - c.v_threshold) - d) * sg;
  } else {
    dv_dh = kDetach ? 1.0f : 1.0f - c.v_threshold * sg;
  }
  const float gh = gs * sg + gv * dv_dh;
  gv = gh - gh / c.tau;
  return decay_input ? gh / c.tau : gh;
}

// d = H - v_threshold as lif_grad_step wants it (-0 -> +0).
static inline __attribute__((always_inline)) float lif_distance(float h, LifConsts c) {
  return (h - c.v_threshold) + 0.0f;
}

}  // namespace cpu
}  // namespace spikeops
