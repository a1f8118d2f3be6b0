// One LIF step, shared by every kernel that runs the neuron (lif.cpp, ssa.cpp). The order of
// operations is the reference's (spikeops/reference.py) so that spikes match bit for bit.
#pragma once

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

// hard: V = fire ? r : H;  soft: V = fire ? H - v_threshold : H
template <bool kHard>
static inline __attribute__((always_inline)) float lif_reset(float h, bool fire, LifConsts c) {
  return kHard ? (fire ? c.v_reset : h) : (fire ? h - c.v_threshold : h);
}

}  // namespace cpu
}  // namespace spikeops
