// Fused Spiking Self-Attention forward on the CPU (semantics: spikeops/reference.py, ssa).
//
//   Y_t = scale * Q_t K_t^T V_t            (exact integer product of 0/1 matrices, then fp32 scale)
//   S   = LIF(Y) over t                    (decay_input, hard reset to 0, threshold v_threshold)
//
// q, k, v, out: [T, BH, N, d] contiguous. One task per (batch, head) walks t = 0..T-1 keeping the
// attention neuron's membrane potential [N, d] in a local buffer. The product never forms an N x N
// float map when d < N: K^T V is a d x d integer matrix from AND + popcount over K's and V's
// columns packed along N, and Q (K^T V) adds the rows of K^T V selected by Q's spikes. When
// N <= d, (Q K^T) V is used: Q K^T from AND + popcount over rows packed along d.
// Optionally q, k, v are also written packed along d (1 bit each) for the backward pass.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <cstdint>
#include <vector>

#include "../ops.h"
#include "lif_math.h"
#include "popcount.h"

namespace spikeops {
namespace cpu {
namespace {

inline int64_t words_for(int64_t bits) { return (bits + 63) / 64; }

// Reads an [N, d] tile of 0/1 values into floats, flagging anything else.
template <typename scalar_t>
inline void load_tile(const scalar_t* src, float* dst, int64_t count, bool& bad) {
  for (int64_t i = 0; i < count; ++i) {
    const float x = static_cast<float>(src[i]);
    bad |= (x != 0.0f) & (x != 1.0f);
    dst[i] = x;
  }
}

// Packs each row of a [rows, cols] 0/1 tile along cols: out [rows, words_for(cols)].
inline void pack_rows(const float* tile, int64_t rows, int64_t cols, uint64_t* out) {
  const int64_t W = words_for(cols);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t w = 0; w < W; ++w) out[r * W + w] = 0;
    for (int64_t c = 0; c < cols; ++c)
      out[r * W + c / 64] |= static_cast<uint64_t>(tile[r * cols + c] != 0.0f) << (c % 64);
  }
}

// Packs each column of a [rows, cols] 0/1 tile along rows: out [cols, words_for(rows)].
inline void pack_cols(const float* tile, int64_t rows, int64_t cols, uint64_t* out) {
  const int64_t W = words_for(rows);
  std::fill(out, out + cols * W, 0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      out[c * W + r / 64] |= static_cast<uint64_t>(tile[r * cols + c] != 0.0f) << (r % 64);
}

struct Tiles {
  std::vector<float> q, k, v;             // [N, d]
  std::vector<uint64_t> a_bits, b_bits;   // packed operands of the popcount product
  std::vector<int32_t> prod;              // K^T V [d, d] or Q K^T [N, N]
  std::vector<int32_t> acc;               // one output row [d]
  std::vector<float> vmem;                // attention neuron potential [N, d]
};

// Y row n of Q K^T V (int32) into acc, by the cheaper association.
inline void attention_row(const Tiles& s, int64_t n, int64_t N, int64_t d, bool kv_first, int32_t* acc) {
  std::fill(acc, acc + d, 0);
  if (kv_first) {  // sum of the rows of K^T V where Q[n, c] = 1
    const float* qrow = s.q.data() + n * d;
    for (int64_t c = 0; c < d; ++c) {
      if (qrow[c] == 0.0f) continue;
      const int32_t* kv = s.prod.data() + c * d;
      for (int64_t j = 0; j < d; ++j) acc[j] += kv[j];
    }
  } else {  // sum over m of (Q K^T)[n, m] * V[m, :]
    const int32_t* arow = s.prod.data() + n * N;
    for (int64_t m = 0; m < N; ++m) {
      const int32_t a = arow[m];
      if (a == 0) continue;
      const float* vrow = s.v.data() + m * d;
      for (int64_t j = 0; j < d; ++j) acc[j] += vrow[j] != 0.0f ? a : 0;
    }
  }
}

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
    at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
      Tiles s;
      s.q.resize(N * d), s.k.resize(N * d), s.v.resize(N * d), s.acc.resize(d), s.vmem.resize(N * d);
      const int64_t Wn = words_for(N);
      s.a_bits.resize(kv_first ? d * Wn : N * Wd), s.b_bits.resize(kv_first ? d * Wn : N * Wd);
      s.prod.resize(kv_first ? d * d : N * N);
      bool bad = false;
      for (int64_t bh = begin; bh < end; ++bh) {
        std::fill(s.vmem.begin(), s.vmem.end(), 0.0f);
        for (int64_t t = 0; t < T; ++t) {
          const int64_t off = (t * BH + bh) * N * d;
          load_tile(qp + off, s.q.data(), N * d, bad);
          load_tile(kp + off, s.k.data(), N * d, bad);
          load_tile(vp + off, s.v.data(), N * d, bad);
          if (save_packed) {
            const int64_t woff = (t * BH + bh) * N * Wd;
            pack_rows(s.q.data(), N, d, reinterpret_cast<uint64_t*>(qw.mutable_data_ptr<int64_t>()) + woff);
            pack_rows(s.k.data(), N, d, reinterpret_cast<uint64_t*>(kw.mutable_data_ptr<int64_t>()) + woff);
            pack_rows(s.v.data(), N, d, reinterpret_cast<uint64_t*>(vw.mutable_data_ptr<int64_t>()) + woff);
          }
          if (kv_first) {  // K^T V [d, d] from K's and V's columns packed along N
            pack_cols(s.k.data(), N, d, s.a_bits.data());
            pack_cols(s.v.data(), N, d, s.b_bits.data());
            for (int64_t i = 0; i < d; ++i)
              popcount_row(s.a_bits.data() + i * Wn, s.b_bits.data(), d, Wn, s.prod.data() + i * d);
          } else {  // Q K^T [N, N] from Q's and K's rows packed along d
            pack_rows(s.q.data(), N, d, s.a_bits.data());
            pack_rows(s.k.data(), N, d, s.b_bits.data());
            for (int64_t i = 0; i < N; ++i)
              popcount_row(s.a_bits.data() + i * Wd, s.b_bits.data(), N, Wd, s.prod.data() + i * N);
          }
          for (int64_t n = 0; n < N; ++n) {
            attention_row(s, n, N, d, kv_first, s.acc.data());
            float* vm = s.vmem.data() + n * d;
            scalar_t* o = op + off + n * d;
            for (int64_t j = 0; j < d; ++j) {
              const float y = static_cast<float>(s.acc[j]) * sc;
              const float h = lif_charge<true>(vm[j], y, c);
              const bool fire = lif_fire(h, c);
              vm[j] = lif_reset<true>(h, fire, c);
              o[j] = static_cast<scalar_t>(fire ? 1.0f : 0.0f);
            }
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
