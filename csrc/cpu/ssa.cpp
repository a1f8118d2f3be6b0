// Fused Spiking Self-Attention forward on the CPU (semantics: spikeops/reference.py, ssa).
//
//   Y_t = scale * Q_t K_t^T V_t            (exact integer product of 0/1 matrices, then fp32 scale)
//   S   = LIF(Y) over t                    (decay_input, hard reset to 0, threshold v_threshold)
//
// q, k, v, out: [T, BH, N, d] contiguous. One task per (batch, head) walks t = 0..T-1 keeping the
// attention neuron's membrane potential [N, d] in a local buffer. Each row of q, k, v is packed
// along d once (bits.h; this also checks the values are 0/1); the products then only touch spikes:
// when N > d (no N x N map), K^T V [d, d] adds each token's V row into the rows of its K spikes,
// and Y[n] = Q[n] (K^T V) adds the K^T V rows of Q[n]'s spikes; when N <= d, Q K^T comes from
// AND + popcount of the packed rows and Y[n] = sum_m (Q K^T)[n, m] V[m]. All sums are exact
// integers in fp32 (< 2^24). The packed rows are also the 1-bit copy kept for backward.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../ops.h"
#include "bits.h"
#include "lif_math.h"
#include "popcount.h"

namespace spikeops {
namespace cpu {
namespace {

inline int64_t words_for(int64_t bits) { return (bits + 63) / 64; }

inline void add_row(float* __restrict acc, const float* __restrict row, int64_t d) {
  for (int64_t j = 0; j < d; ++j) acc[j] += row[j];
}

inline void axpy_row(float* __restrict acc, float a, const float* __restrict row, int64_t d) {
  for (int64_t j = 0; j < d; ++j) acc[j] += a * row[j];
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SPIKEOPS_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SPIKEOPS_SIMD_CLONES
#endif

// Per-thread work space for one (batch, head).
struct Work {
  std::vector<float> q, k, v;         // [N, d] float copies of fp16/bf16 inputs
  std::vector<uint64_t> qb, kb, vb;   // rows packed along d [N, Wd]
  std::vector<float> kv;              // K^T V [d, d] (exact integers in float)
  std::vector<int32_t> qk;            // Q K^T [N, N]
  std::vector<float> y;               // one row of Y [d]
  std::vector<float> vmem;            // attention neuron potential [N, d]
  std::vector<float> spikes;          // [N, d] float spikes for non-fp32 outputs
};

// One (batch, head) at one step, all in float: packs q, k, v rows (returns true if a value was
// not 0/1), forms Y = Q K^T V by the cheaper association, steps the attention neuron (vmem) and
// writes 0./1. into s_out [N, d].
SPIKEOPS_SIMD_CLONES
bool ssa_tile(const float* q, const float* k, const float* v, int64_t N, int64_t d, bool kv_first, float scale,
              LifConsts c, Work& w, float* s_out) {
  const int64_t Wd = words_for(d);
  bool bad = false;
  for (int64_t n = 0; n < N; ++n) {
    bad |= pack_bits(q + n * d, d, w.qb.data() + n * Wd);
    bad |= pack_bits(k + n * d, d, w.kb.data() + n * Wd);
    bad |= pack_bits(v + n * d, d, w.vb.data() + n * Wd);
  }
  if (kv_first) {  // K^T V [d, d]: every token adds its V row into the rows of its K spikes
    std::fill(w.kv.begin(), w.kv.end(), 0.0f);
    for (int64_t n = 0; n < N; ++n)
      for_each_bit(w.kb.data() + n * Wd, Wd, [&](int64_t ch) { add_row(w.kv.data() + ch * d, v + n * d, d); });
  } else {  // Q K^T [N, N] by AND + popcount of the packed rows
    for (int64_t n = 0; n < N; ++n) popcount_row(w.qb.data() + n * Wd, w.kb.data(), N, Wd, w.qk.data() + n * N);
  }
  float* y = w.y.data();
  for (int64_t n = 0; n < N; ++n) {
    std::fill(y, y + d, 0.0f);
    if (kv_first) {  // Y[n] = the sum of the K^T V rows of Q[n]'s spikes
      for_each_bit(w.qb.data() + n * Wd, Wd, [&](int64_t ch) { add_row(y, w.kv.data() + ch * d, d); });
    } else {  // Y[n] = sum_m (Q K^T)[n, m] V[m]
      const int32_t* a = w.qk.data() + n * N;
      for (int64_t m = 0; m < N; ++m)
        if (a[m]) axpy_row(y, static_cast<float>(a[m]), v + m * d, d);
    }
    float* vm = w.vmem.data() + n * d;
    float* o = s_out + n * d;
    for (int64_t j = 0; j < d; ++j) {
      const float h = lif_charge<true>(vm[j], y[j] * scale, c);
      const bool fire = lif_fire(h, c);
      vm[j] = lif_reset<true>(h, fire, c);
      o[j] = fire ? 1.0f : 0.0f;
    }
  }
  return bad;
}

template <typename scalar_t>
inline const float* tile_as_float(const scalar_t* src, std::vector<float>& buf) {
  for (size_t i = 0; i < buf.size(); ++i) buf[i] = static_cast<float>(src[i]);
  return buf.data();
}

inline const float* tile_as_float(const float* src, std::vector<float>&) { return src; }

template <typename scalar_t>
inline float* spikes_out(scalar_t*, std::vector<float>& buf) { return buf.data(); }

inline float* spikes_out(float* dst, std::vector<float>&) { return dst; }

template <typename scalar_t>
inline void store_spikes(scalar_t* dst, const std::vector<float>& buf) {
  for (size_t i = 0; i < buf.size(); ++i) dst[i] = static_cast<scalar_t>(buf[i]);
}

inline void store_spikes(float*, const std::vector<float>&) {}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, bool> ssa_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
    double v_threshold, double tau, bool save_packed) {
  TORCH_CHECK(q.dim() == 4 && q.is_contiguous() && k.sizes() == q.sizes() && v.sizes() == q.sizes() &&
                  k.is_contiguous() && v.is_contiguous() && k.scalar_type() == q.scalar_type() &&
                  v.scalar_type() == q.scalar_type(),
              "ssa_forward: q, k, v must be contiguous [T, BH, N, d] of one dtype");
  const int64_t T = q.size(0), BH = q.size(1), N = q.size(2), d = q.size(3), Wd = words_for(d);
  const bool kv_first = N > d;
  auto out = at::empty_like(q);
  auto word_shape = save_packed ? std::vector<int64_t>{T, BH, N, Wd} : std::vector<int64_t>{0};
  auto opts = q.options().dtype(at::kLong);
  at::Tensor qw = at::empty(word_shape, opts), kw = at::empty(word_shape, opts), vw = at::empty(word_shape, opts);
  const LifConsts c{static_cast<float>(tau), static_cast<float>(v_threshold), 0.0f};
  const float sc = static_cast<float>(scale);
  std::atomic<bool> bad_any{false};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "ssa_forward", [&] {
    const scalar_t* qp = q.const_data_ptr<scalar_t>();
    const scalar_t* kp = k.const_data_ptr<scalar_t>();
    const scalar_t* vp = v.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    uint64_t* words[3] = {nullptr, nullptr, nullptr};
    if (save_packed) {
      words[0] = reinterpret_cast<uint64_t*>(qw.mutable_data_ptr<int64_t>());
      words[1] = reinterpret_cast<uint64_t*>(kw.mutable_data_ptr<int64_t>());
      words[2] = reinterpret_cast<uint64_t*>(vw.mutable_data_ptr<int64_t>());
    }
    at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
      Work w;
      for (auto* b : {&w.q, &w.k, &w.v, &w.vmem, &w.spikes}) b->resize(N * d);
      for (auto* b : {&w.qb, &w.kb, &w.vb}) b->resize(N * Wd);
      w.y.resize(d);
      if (kv_first) w.kv.resize(d * d); else w.qk.resize(N * N);
      bool bad = false;
      for (int64_t bh = begin; bh < end; ++bh) {
        std::fill(w.vmem.begin(), w.vmem.end(), 0.0f);
        for (int64_t t = 0; t < T; ++t) {
          const int64_t off = (t * BH + bh) * N * d, woff = (t * BH + bh) * N * Wd;
          bad |= ssa_tile(tile_as_float(qp + off, w.q), tile_as_float(kp + off, w.k), tile_as_float(vp + off, w.v),
                          N, d, kv_first, sc, c, w, spikes_out(op + off, w.spikes));
          store_spikes(op + off, w.spikes);
          if (save_packed) {  // the packed rows are the 1-bit copy kept for backward
            std::copy(w.qb.begin(), w.qb.end(), words[0] + woff);
            std::copy(w.kb.begin(), w.kb.end(), words[1] + woff);
            std::copy(w.vb.begin(), w.vb.end(), words[2] + woff);
          }
        }
      }
      if (bad) bad_any.store(true, std::memory_order_relaxed);
    });
  });
  return {out, qw, kw, vw, !bad_any.load()};
}

}  // namespace cpu
}  // namespace spikeops
