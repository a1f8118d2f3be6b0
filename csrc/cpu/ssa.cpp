// Fused Spiking Self-Attention forward on the CPU (semantics: spikeops/reference.py, ssa).
//
//   Y_t = scale * Q_t (K_t^T V_t)          (exact integer counts of 0/1 products, then one fp32 multiply)
//   S   = LIF(Y) over t                    (decay_input, hard reset to 0, threshold v_threshold)
//
// q, k, v, out: [T, BH, N, d] contiguous. The threads take the (batch, head)s one at a time
// (dynamic_for.h) and walk t = 0..T-1 keeping the attention neuron's potential [N, d]. Each step
//   1. packs the rows of q, k, v along d (bits.h; this also checks the values are 0/1); the packed
//      rows are the 1-bit copy kept for backward, written in place when saved;
//   2. forms K^T V [d, d]: K's columns packed along N (64 x 64 bit transposes of the rows, 64 x 32
//      for d <= 32), then row c of K^T V = the sum of the V rows (as 0/1 lanes) over the spikes of
//      K's column c; with AVX-512 VPOPCNTDQ, VBMI and GFNI, V's columns packed too (the transposes
//      with GFNI) and K^T V [c, c'] = popcount(K's column c AND V's column c');
//   3. forms Y[n] = the sum of the K^T V rows over the spikes of Q[n], and steps the neuron.
// The sums are exact integer lanes, int16 when every count fits (N d <= 32767: K^T V <= N,
// Y <= d N), else int32, accumulated in registers over blocks of up to 4 vectors of columns (int16
// lanes: AVX-512 or AVX2 intrinsics where the CPU has them, picked at run time; else GCC vector code).
// While step 3 runs, the next step's q, k, v rows are prefetched (reading them bounds the op).
//
// Backward (ssa_backward), from the packed q, k, v that forward saved and dL/dS, per (batch, head):
// steps 2-3 again over t = 0..T-1, keeping H [T, N, d] and (K^T V)^T [T, d, d] as floats; then
// t = T-1..0: G = scale * LIF backward (sigmoid surrogate, alpha 4, detach_reset; lif_math.h),
//   dQ = G (K^T V)^T          dense [N, d] x [d, d]
//   dA = Q^T G                 the G rows summed over Q's spikes      (dA = dL/d(K^T V) [d, d])
//   dK = V dA^T, dV = K dA     the dA^T / dA rows summed over V's / K's spikes
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cmath>
#include <atomic>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../ops.h"
#include "bits.h"
#include "cpu_features.h"
#include "dynamic_for.h"
#include "float_staging.h"
#include "lif_math.h"
#include "simd_variants.h"

namespace spikeops {
namespace cpu {
namespace {

inline int64_t words_for(int64_t bits) { return (bits + 63) / 64; }

// Rows of a table summed over the set bits of a bit row of n bits (sum_lanes_avx2): n, or 65 when the
// bits fit one word, the rows from n on being zero: an empty word's lowest bit reads as 64.
inline int64_t table_rows(int64_t n) { return n > 64 ? n : 65; }

// How many bits sum_lanes_avx2 takes from a one-word bit row without a data-dependent branch: a quarter
// of the n bits (spike rates of ~25% and below need no other branch).
inline int64_t unrolled_bits(int64_t n) { return (std::min<int64_t>(n, 64) + 3) / 4; }

// Backward's float rows: d floats zero-padded to whole blocks of kFloatBlock (4 AVX2 vectors).
constexpr int64_t kFloatBlock = 32;
inline int64_t padded(int64_t d) { return (d + kFloatBlock - 1) / kFloatBlock * kFloatBlock; }

// Per-thread buffers of one (batch, head) for kVecs vectors of Count lanes per column block.
template <typename Count, int kVecs>
struct Work;

// Calls f(Count{}, std::integral_constant<int, kVecs>{}) with the lane type and block width for N x d.
template <typename F>
void with_layout(int64_t N, int64_t d, F&& f);

// Step 2 above: w.kv = K^T V from the packed rows of K and V [N, Wd].
template <typename Count, int kVecs>
void key_value_counts(const uint64_t* kb, const uint64_t* vb, Work<Count, kVecs>& w);

// Step 3 above, after key_value_counts: one neuron step (potential w.vmem) on Y = Q (K^T V),
// writing the spikes to out [N, d], or with kKeepH the neuron's H instead. next[3]: inputs
// (rows of row_bytes) to prefetch meanwhile, or nullptr.
template <bool kKeepH, typename Count, int kVecs>
void attention_neuron_step(const uint64_t* qb, float scale, LifConsts c, Work<Count, kVecs>& w,
                           const char* const* next, int64_t row_bytes, float* out);

// Backward of one (batch, head) over all steps (see the top of the file): bits[3] the packed q,
// k, v rows [N, Wd] of step 0 (step t: + t * step_words); grad and the outputs dq, dk, dv: the
// [N, d] tiles of step 0 (step t: + t * step_stride), in one dtype (computed in fp32, fp16/bf16/fp64
// tiles staged through w's float tiles and rounded once).
template <typename scalar_t, typename Count, int kVecs>
void ssa_backward_item(const uint64_t* const* bits, int64_t T, int64_t step_words, const scalar_t* grad,
                       int64_t step_stride, float scale, LifConsts c, Work<Count, kVecs>& w, scalar_t* dq,
                       scalar_t* dk, scalar_t* dv);

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, bool> ssa_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
    double v_threshold, double tau, bool save_packed) {
  TORCH_CHECK(q.dim() == 4 && q.is_contiguous() && k.sizes() == q.sizes() && v.sizes() == q.sizes() &&
                  k.is_contiguous() && v.is_contiguous() && k.scalar_type() == q.scalar_type() &&
                  v.scalar_type() == q.scalar_type(),
              "ssa_forward: q, k, v must be contiguous [T, BH, N, d] of one dtype");
  const int64_t T = q.size(0), BH = q.size(1), N = q.size(2), d = q.size(3), Wd = words_for(d);
  auto out = at::empty_like(q);
  auto word_shape = save_packed ? std::vector<int64_t>{T, BH, N, Wd} : std::vector<int64_t>{0};
  auto opts = q.options().dtype(at::kLong);
  at::Tensor qw = at::empty(word_shape, opts), kw = at::empty(word_shape, opts), vw = at::empty(word_shape, opts);
  std::atomic<bool> bad_any{false};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "ssa_forward", [&] {
    const scalar_t* inputs[3] = {q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
                                 v.const_data_ptr<scalar_t>()};
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    uint64_t* saved[3] = {nullptr, nullptr, nullptr};
    if (save_packed) {
      const at::Tensor* words[3] = {&qw, &kw, &vw};
      for (int i = 0; i < 3; ++i) saved[i] = reinterpret_cast<uint64_t*>(words[i]->mutable_data_ptr<int64_t>());
    }
    const LifConsts lif{static_cast<float>(tau), static_cast<float>(v_threshold), 0.0f};
    with_layout(N, d, [&](auto count, auto vecs) {
      using W = Work<decltype(count), decltype(vecs)::value>;
      for_each_item(BH, [&] { return W(N, d); }, [&](W& w, int64_t bh, int64_t next_bh) {
        std::fill(w.vmem.begin(), w.vmem.end(), 0.0f);
        bool bad = false;
        for (int64_t t = 0; t < T; ++t) {
          const int64_t tile = t * BH + bh, off = tile * N * d;
          // the step this thread takes next: t + 1, or t = 0 of its next (batch, head)
          const int64_t next_tile = t + 1 < T ? tile + BH : next_bh;
          const char* next[3] = {nullptr, nullptr, nullptr};
          uint64_t* bits[3];
          for (int i = 0; i < 3; ++i) {
            if (next_tile >= 0) next[i] = reinterpret_cast<const char*>(inputs[i] + next_tile * N * d);
            bits[i] = save_packed ? saved[i] + tile * N * Wd : w.packed[i].data();
          }
          // step 1: pack (and check) the rows of q, k, v
          bad |= pack_rows(as_float(inputs[0] + off, N * d, w.q), N, d, bits[0]) |
                  pack_rows(as_float(inputs[1] + off, N * d, w.k), N, d, bits[1]) |
                  pack_rows(as_float(inputs[2] + off, N * d, w.v), N, d, bits[2]);
          key_value_counts(bits[1], bits[2], w);
          attention_neuron_step<false>(bits[0], static_cast<float>(scale), lif, w, next_tile >= 0 ? next : nullptr,
                                       d * static_cast<int64_t>(sizeof(scalar_t)), float_out(op + off, N * d, w.spikes));
          store_floats(op + off, w.spikes.data(), N * d);
        }
        if (bad) bad_any.store(true, std::memory_order_relaxed);
      });
    });
  });
  return {out, qw, kw, vw, !bad_any.load()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ssa_backward(
    const at::Tensor& grad, const at::Tensor& qw, const at::Tensor& kw, const at::Tensor& vw, double scale,
    double v_threshold, double tau) {
  TORCH_CHECK(grad.dim() == 4 && grad.is_contiguous(), "ssa_backward: grad must be a contiguous [T, BH, N, d]");
  const int64_t T = grad.size(0), BH = grad.size(1), N = grad.size(2), d = grad.size(3), Wd = words_for(d);
  for (const at::Tensor* words : {&qw, &kw, &vw}) {
    TORCH_CHECK(words->sizes() == at::IntArrayRef({T, BH, N, Wd}) && words->is_contiguous() &&
                    words->scalar_type() == at::kLong,
                "ssa_backward: the saved words must be contiguous int64 [T, BH, N, ceil(d / 64)]");
  }
  at::Tensor dq = at::empty_like(grad), dk = at::empty_like(grad), dv = at::empty_like(grad);
  const uint64_t* words[3] = {reinterpret_cast<const uint64_t*>(qw.const_data_ptr<int64_t>()),
                              reinterpret_cast<const uint64_t*>(kw.const_data_ptr<int64_t>()),
                              reinterpret_cast<const uint64_t*>(vw.const_data_ptr<int64_t>())};
  const LifConsts lif{static_cast<float>(tau), static_cast<float>(v_threshold), 0.0f};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "ssa_backward", [&] {
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    scalar_t *dqp = dq.mutable_data_ptr<scalar_t>(), *dkp = dk.mutable_data_ptr<scalar_t>(),
             *dvp = dv.mutable_data_ptr<scalar_t>();
    with_layout(N, d, [&](auto count, auto vecs) {
      using W = Work<decltype(count), decltype(vecs)::value>;
      for_each_item(BH, [&] { return W(N, d, T); }, [&](W& w, int64_t bh, int64_t) {
        const uint64_t* bits[3] = {words[0] + bh * N * Wd, words[1] + bh * N * Wd, words[2] + bh * N * Wd};
        const int64_t off = bh * N * d;
        ssa_backward_item(bits, T, BH * N * Wd, gp + off, BH * N * d, static_cast<float>(scale), lif, w, dqp + off,
                          dkp + off, dvp + off);
      });
    });
  });
  return {dq, dk, dv};
}

namespace {

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define SPIKEOPS_SSA_AVX2 1  // the int16-lane sums and neuron below with AVX2 intrinsics, picked at run time
#else
#define SPIKEOPS_SSA_AVX2 0
#endif

// One 32-byte vector of Count lanes (GCC vector extension: one AVX2 register in the x86-64-v4 and
// AVX2 variants of simd_variants.h, two SSE2 halves in the baseline one).
template <typename Count>
struct Lanes {
  static constexpr int64_t kWidth = 32 / sizeof(Count);
  typedef Count Vec __attribute__((vector_size(32)));
};

template <typename Count, int kVecs>
struct Work {
  static constexpr int64_t kCols = kVecs * Lanes<Count>::kWidth;  // columns per block
  // steps: > 0 for backward (H and (K^T V)^T of every step, G, dA, dA^T, dL/dV)
  Work(int64_t N, int64_t d, int64_t steps = 0)
      : N(N), d(d), blocks((d + kCols - 1) / kCols), vl_rows(table_rows(N)), kv_rows(table_rows(d)),
        vmem(N * d), kcol(d * words_for(N)), vcol(blocks * kCols * words_for(N)), vlanes(blocks * vl_rows * kCols),
        kv(blocks * kv_rows * kCols),
        h(steps * N * d), kv_t(steps * d * padded(d)),
        g(steps ? N * padded(d) : 0), da(steps ? d * padded(d) : 0), da_t(steps ? d * padded(d) : 0),
        gv(steps ? N * d : 0), qcol(steps ? d * words_for(N) : 0) {
    if (!steps)
      for (auto& p : packed) p.resize(N * words_for(d));
  }
  int64_t N, d, blocks, vl_rows, kv_rows;  // the tables' rows per block (table_rows)
  std::vector<float> vmem;            // attention neuron potential [N, d]
  std::vector<uint64_t> packed[3];    // q, k, v rows packed along d [N, Wd] (when not saved)
  std::vector<uint64_t> kcol;         // K's columns packed along N [d, WN]
  std::vector<uint64_t> vcol;         // V's, in key_value_counts_popcount's order [blocks * kCols, WN]
  std::vector<Count> vlanes;          // V rows as 0/1 lanes [blocks, vl_rows, kCols]
  std::vector<Count> kv;              // K^T V [blocks, kv_rows, kCols]
  std::vector<float> q, k, v, spikes; // float copies of fp16/bf16/fp64 tiles [N, d]
  // backward; rows of d floats zero-padded to padded(d) where marked *
  std::vector<float> h, kv_t;         // H [T, N, d], (K^T V)^T* [T, d, d]
  std::vector<float> g, da, da_t, gv; // G* [N, d], dA*, dA^T* [d, d], dL/dV [N, d]
  std::vector<uint64_t> qcol;         // Q's columns packed along N [d, WN]
};

template <typename F>
void with_layout(int64_t N, int64_t d, F&& f) {
  auto with_vecs = [&](auto count) {
    const int64_t vecs = (d + Lanes<decltype(count)>::kWidth - 1) / Lanes<decltype(count)>::kWidth;
    switch (std::min<int64_t>(vecs, 4)) {
      case 1: return f(count, std::integral_constant<int, 1>{});
      case 2: return f(count, std::integral_constant<int, 2>{});
      case 3: return f(count, std::integral_constant<int, 3>{});
      default: return f(count, std::integral_constant<int, 4>{});
    }
  };
  if (N * d <= 32767) with_vecs(int16_t{}); else with_vecs(int32_t{});
}

// The swap rounds j = kHalf, kHalf / 2, ..., 1 of a 64 x 64 bit transpose (Hacker's Delight 7-3)
// over a[0, 2 kHalf), the masks m_j holding j ones then j zeros. transpose_rounds<32>: the whole
// transpose, a[i] bit j <-> a[j] bit i. transpose_rounds<16> finishes one of a 64 x 32 matrix (bits
// 32..63 of every row zero) whose first round is done by storing row r + 32 in the high half of
// row r (r < 32): the first round does just that, and leaves rows 32..63 zero.
template <int kHalf>
inline void transpose_rounds(uint64_t* a) {
  uint64_t m = ~0ull / ((1ull << kHalf) + 1);
  for (int j = kHalf; j != 0; j >>= 1, m ^= m << j) {
    for (int r = 0; r < 2 * kHalf; r = ((r | j) + 1) & ~j) {
      const uint64_t t = ((a[r] >> j) ^ a[r | j]) & m;
      a[r | j] ^= t;
      a[r] ^= t << j;
    }
  }
}

// acc = the sum of the rows rows[i * kCols, (i + 1) * kCols) over the set bits i of the W words.
template <int kVecs, typename Count, typename Vec = typename Lanes<Count>::Vec>
inline __attribute__((always_inline)) void sum_rows(const uint64_t* bits, int64_t W, const Count* rows, Vec* acc) {
  constexpr int64_t kWidth = Lanes<Count>::kWidth, kCols = kVecs * kWidth;
  for (int i = 0; i < kVecs; ++i) acc[i] = Vec{};
  for_each_bit(bits, W, [&](int64_t b) {
    for (int i = 0; i < kVecs; ++i) {
      Vec row;
      __builtin_memcpy(&row, rows + b * kCols + i * kWidth, sizeof(row));
      acc[i] += row;
    }
  });
}

// The neuron over n columns of one row: H = V + (scale * y - V) / tau, spike, hard reset; o
// gets the spikes, or with kKeepH H.
template <bool kKeepH>
inline void lif_row(const float* y, int64_t n, float scale, LifConsts c, float* vm, float* o) {
  for (int64_t j = 0; j < n; ++j) {
    const float h = lif_charge<true>(vm[j], y[j] * scale, c);
    const bool fire = lif_fire(h, c);
    vm[j] = lif_reset<true>(h, fire, c);
    o[j] = kKeepH ? h : (fire ? 1.0f : 0.0f);
  }
}

// lif_row for 8 columns at once, their inputs y already floats. The 32-byte vectors are single
// AVX2 registers in the x86-64-v4 and AVX2 variants (GCC splits wider vector-extension types poorly: a
// convert + store of 16 lanes went through the stack, lane by lane).
typedef float Floats8 __attribute__((vector_size(32)));
typedef int32_t Ints8 __attribute__((vector_size(32)));
typedef int16_t Shorts8 __attribute__((vector_size(16)));

// Prefetches row n of the next step's q, k, v (next[3], rows of row_bytes) into L2, line by line
// across the three; nothing for next = nullptr (the last step, or backward).
inline __attribute__((always_inline)) void prefetch_rows(const char* const* next, int64_t n, int64_t row_bytes) {
  if (!next) return;
  const char* const row[3] = {next[0] + n * row_bytes, next[1] + n * row_bytes, next[2] + n * row_bytes};
  for (int64_t off = 0; off < row_bytes; off += 64)
    for (int i = 0; i < 3; ++i) __builtin_prefetch(row[i] + off, 0, 1);
}

// lif_row for 8 columns at once, their inputs y already floats; the attention neuron resets to
// v_reset = 0 (c.v_reset is 0). kMulTau: multiply by 1 / tau instead of dividing by tau, exact
// when tau is a power of two (x * 2^-k rounds as x / 2^k; a vector divide costs ~4 adds).
template <bool kKeepH, bool kMulTau>
inline __attribute__((always_inline)) void lif8(Floats8 y, float scale, LifConsts c, float inv_tau, float* vm,
                                                float* o) {
  const Floats8 x = y * scale;
  Floats8 v;
  __builtin_memcpy(&v, vm, sizeof(v));
  const Floats8 h = v + (kMulTau ? (x - v) * inv_tau : (x - v) / c.tau);  // lif_charge<true>
  const Ints8 fire = (h - c.v_threshold) >= 0.0f;                         // lif_fire
  const Floats8 zero = Floats8{}, one = zero + 1.0f;
  const Floats8 reset = fire ? 0.0f + 0.0f * h : h;  // lif_reset<true>
  const Floats8 spikes = fire ? one : zero;
  __builtin_memcpy(vm, &reset, sizeof(reset));
  __builtin_memcpy(o, kKeepH ? &h : &spikes, sizeof(spikes));
}

// lif_row for the kWidth columns whose inputs are the Count lanes y.
template <bool kKeepH, bool kMulTau, typename Count>
inline __attribute__((always_inline)) void lif_lanes(typename Lanes<Count>::Vec y, float scale, LifConsts c,
                                                     float inv_tau, float* vm, float* o) {
  if constexpr (sizeof(Count) == 2) {  // 16 int16 lanes: two halves of 8
    Shorts8 half[2];
    __builtin_memcpy(half, &y, sizeof(half));
    lif8<kKeepH, kMulTau>(__builtin_convertvector(half[0], Floats8), scale, c, inv_tau, vm, o);
    lif8<kKeepH, kMulTau>(__builtin_convertvector(half[1], Floats8), scale, c, inv_tau, vm + 8, o + 8);
  } else {
    lif8<kKeepH, kMulTau>(__builtin_convertvector(y, Floats8), scale, c, inv_tau, vm, o);
  }
}

#if SPIKEOPS_SSA_AVX2
// The sums for int16 lanes with AVX2 intrinsics, and their conversion to the floats lif8 takes,
// taken where avx2_enabled() (the generic code above, compiled for AVX2, keeps the counts on the
// stack and converts them in 128-bit halves): the same counts, spikes and H.

// sum_rows for int16 lanes. One word (rows then has table_rows rows): its lowest `unrolled` bits
// are taken in a counted loop, an empty word's lowest bit (tzcnt 64) adding the zero row 64, and
// only further bits branch on the data: the exit of a loop over the set bits is mispredicted on
// most rows, this loop's on few.
template <int kVecs>
__attribute__((target("avx2,bmi"), always_inline)) inline void sum_lanes_avx2(const uint64_t* bits, int64_t W,
                                                                              int64_t unrolled, const int16_t* rows,
                                                                              __m256i* acc) {
  constexpr int64_t kCols = 16 * kVecs;
  auto add = [acc](const int16_t* row) __attribute__((target("avx2"), always_inline)) {
    for (int i = 0; i < kVecs; ++i)
      acc[i] = _mm256_add_epi16(acc[i], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 16 * i)));
  };
  for (int i = 0; i < kVecs; ++i) acc[i] = _mm256_setzero_si256();
  if (W == 1) {
    uint64_t m = bits[0];
    for (int64_t r = 0; r < unrolled; ++r, m = _blsr_u64(m)) add(rows + _tzcnt_u64(m) * kCols);
    for (; m; m &= m - 1) add(rows + __builtin_ctzll(m) * kCols);
  } else {
    for (int64_t word = 0; word < W; ++word)
      for (uint64_t m = bits[word]; m; m &= m - 1) add(rows + (word * 64 + __builtin_ctzll(m)) * kCols);
  }
}

// The sums of key_value_counts (after the V lanes and K's columns).
template <int kVecs>
__attribute__((target("avx2,bmi"))) void key_value_sums_avx2(Work<int16_t, kVecs>& w) {
  constexpr int64_t kCols = Work<int16_t, kVecs>::kCols;
  const int64_t d = w.d, WN = words_for(w.N), unrolled = unrolled_bits(w.N);
  for (int64_t b = 0; b < w.blocks; ++b) {
    for (int64_t ch = 0; ch < d; ++ch) {
      __m256i acc[kVecs];
      sum_lanes_avx2<kVecs>(w.kcol.data() + ch * WN, WN, unrolled, w.vlanes.data() + b * w.vl_rows * kCols, acc);
      for (int i = 0; i < kVecs; ++i)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(w.kv.data() + (b * w.kv_rows + ch) * kCols + 16 * i), acc[i]);
    }
  }
}

template <bool kKeepH, bool kMulTau, int kVecs>
__attribute__((target("avx2,bmi"))) void attention_neuron_rows_avx2(const uint64_t* qb, float scale, LifConsts c,
                                                                     float inv_tau, Work<int16_t, kVecs>& w,
                                                                     const char* const* next, int64_t row_bytes,
                                                                     float* out) {
  constexpr int64_t kCols = Work<int16_t, kVecs>::kCols;
  const int64_t N = w.N, d = w.d, Wd = words_for(d), unrolled = unrolled_bits(d);
  for (int64_t n = 0; n < N; ++n) {
    prefetch_rows(next, n, row_bytes);
    for (int64_t b = 0; b < w.blocks; ++b) {
      __m256i acc[kVecs];
      sum_lanes_avx2<kVecs>(qb + n * Wd, Wd, unrolled, w.kv.data() + b * w.kv_rows * kCols, acc);
      for (int i = 0; i < kVecs; ++i) {  // y is exact below 2^24, as the reference's fp32 products
        const int64_t j = b * kCols + 16 * i;
        float* vm = w.vmem.data() + n * d + j;
        float* o = out + n * d + j;
        if (j + 16 <= d) {
          const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(acc[i])));
          const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(acc[i], 1)));
          lif8<kKeepH, kMulTau>(lo, scale, c, inv_tau, vm, o);
          lif8<kKeepH, kMulTau>(hi, scale, c, inv_tau, vm + 8, o + 8);
        } else if (j < d) {  // the last columns, when 16 does not divide d
          int16_t counts[16];
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(counts), acc[i]);
          float y[16];
          for (int64_t l = 0; l < 16; ++l) y[l] = static_cast<float>(counts[l]);
          lif_row<kKeepH>(y, d - j, scale, c, vm, o);
        }
      }
    }
  }
}
#endif

#if SPIKEOPS_SSA_AVX2
#define SPIKEOPS_AVX512_BITOPS __attribute__((target("avx512f,avx512bw,avx512vbmi,avx512vpopcntdq,gfni,bmi")))

// transpose_rounds<32>(a) with AVX-512 VBMI and GFNI (a[i] bit j <-> a[j] bit i, all 64 words read
// before the first is written): 8 x 8 blocks of bits are 8 x 8 blocks of bytes. (1) Within each
// vector of 8 rows, a byte permute gathers byte j of the rows into word j (rows in reverse byte
// order); (2) GFNI's affine transform with the matrix of the rows transposes each word's 8 x 8
// bits (result byte k, bit i = bit k of matrix byte 7 - i); (3) an 8 x 8 transpose of the words
// across the 8 vectors and (4) the byte permute of (1) again put byte g of column c's word in place.
SPIKEOPS_AVX512_BITOPS inline void transpose64_avx512(uint64_t* a) {
  alignas(64) static constexpr uint8_t kGather[64] = {  // out byte 8 j + 7 - k = in byte 8 k + j
      56, 48, 40, 32, 24, 16, 8, 0, 57, 49, 41, 33, 25, 17, 9, 1, 58, 50, 42, 34, 26, 18, 10, 2,
      59, 51, 43, 35, 27, 19, 11, 3, 60, 52, 44, 36, 28, 20, 12, 4, 61, 53, 45, 37, 29, 21, 13, 5,
      62, 54, 46, 38, 30, 22, 14, 6, 63, 55, 47, 39, 31, 23, 15, 7};
  alignas(64) static constexpr uint8_t kTranspose[64] = {  // out byte 8 k + g = in byte 8 g + k
      0, 8, 16, 24, 32, 40, 48, 56, 1, 9, 17, 25, 33, 41, 49, 57, 2, 10, 18, 26, 34, 42, 50, 58,
      3, 11, 19, 27, 35, 43, 51, 59, 4, 12, 20, 28, 36, 44, 52, 60, 5, 13, 21, 29, 37, 45, 53, 61,
      6, 14, 22, 30, 38, 46, 54, 62, 7, 15, 23, 31, 39, 47, 55, 63};
  const __m512i gather = _mm512_load_si512(kGather), transpose = _mm512_load_si512(kTranspose);
  const __m512i unit = _mm512_set1_epi64(0x8040201008040201ll);  // byte k = 1 << k
  __m512i r[8], t[8];
  for (int g = 0; g < 8; ++g)  // (1), (2): r[g] word j byte k = column 8 j + k, bit i = row 8 g + i
    r[g] = _mm512_gf2p8affine_epi64_epi8(unit, _mm512_permutexvar_epi8(gather, _mm512_loadu_si512(a + 8 * g)), 0);
  for (int g = 0; g < 8; g += 2) {  // (3): t[j] word g = r[g] word j
    t[g] = _mm512_unpacklo_epi64(r[g], r[g + 1]);
    t[g + 1] = _mm512_unpackhi_epi64(r[g], r[g + 1]);
  }
  for (int h = 0; h < 8; h += 4) {
    for (int p = 0; p < 2; ++p) {
      r[h + p] = _mm512_shuffle_i64x2(t[h + p], t[h + p + 2], 0x88);
      r[h + p + 2] = _mm512_shuffle_i64x2(t[h + p], t[h + p + 2], 0xDD);
    }
  }
  for (int p = 0; p < 4; ++p) {
    t[p] = _mm512_shuffle_i64x2(r[p], r[p + 4], 0x88);
    t[p + 4] = _mm512_shuffle_i64x2(r[p], r[p + 4], 0xDD);
  }
  for (int j = 0; j < 8; ++j) _mm512_storeu_si512(a + 8 * j, _mm512_permutexvar_epi8(transpose, t[j]));
}
#endif

// The columns of the 0/1 matrix whose rows [N, ceil(d / 64)] are packed in rows, packed along N
// (64 x 64 bit transposes, transpose64_avx512 where avx512_bitops_enabled(); else 64 x 32 ones for
// d <= 32): word rb of column i goes to cols[slot(i, rb)].
template <typename Slot>
inline void columns(const uint64_t* rows, int64_t N, int64_t d, uint64_t* cols, Slot slot) {
  const int64_t Wd = words_for(d), WN = words_for(N);
#if SPIKEOPS_SSA_AVX2
  const bool gfni = avx512_bitops_enabled();  // whole 64 x 64 transposes, with GFNI
#else
  const bool gfni = false;
#endif
  if (d <= 32 && !gfni) {  // 64 x 32 blocks (a row's bits from d on are zero): half the swaps
    for (int64_t rb = 0; rb < WN; ++rb) {
      uint64_t a[32];
      for (int64_t i = 0; i < 32; ++i) {
        const int64_t r = rb * 64 + i;
        a[i] = (r < N ? rows[r] : 0) | (r + 32 < N ? rows[r + 32] << 32 : 0);
      }
      transpose_rounds<16>(a);
      for (int64_t i = 0; i < d; ++i) cols[slot(i, rb)] = a[i];
    }
    return;
  }
  for (int64_t rb = 0; rb < WN; ++rb) {
    for (int64_t cw = 0; cw < Wd; ++cw) {
      alignas(64) uint64_t a[64];
      for (int64_t i = 0; i < 64; ++i) a[i] = rb * 64 + i < N ? rows[(rb * 64 + i) * Wd + cw] : 0;
#if SPIKEOPS_SSA_AVX2
      if (gfni) transpose64_avx512(a);
      else
#endif
        transpose_rounds<32>(a);
      for (int64_t i = 0; i < 64 && cw * 64 + i < d; ++i) cols[slot(cw * 64 + i, rb)] = a[i];
    }
  }
}

// cols [d, ceil(N / 64)]: column i's words in a row.
inline void columns(const uint64_t* rows, int64_t N, int64_t d, uint64_t* cols) {
  const int64_t WN = words_for(N);
  columns(rows, N, d, cols, [WN](int64_t i, int64_t rb) { return i * WN + rb; });
}

#if SPIKEOPS_SSA_AVX2
// The same int16-lane sums and neuron with AVX-512, taken where avx512_enabled() and the block of
// columns is whole 64-byte vectors (kVecs even: kZ = kVecs / 2 vectors of 32 lanes per table row;
// tables laid out as above). Same counts, spikes and H: the neuron's arithmetic is lif8's, 16 lanes
// at a time, a lane mask covering the last columns when 16 does not divide d.
#define SPIKEOPS_AVX512 __attribute__((target("avx512f,avx512bw,bmi")))

// sum_lanes_avx2 with 32 lanes per vector.
template <int kZ>
SPIKEOPS_AVX512 inline __attribute__((always_inline)) void sum_lanes_avx512(const uint64_t* bits, int64_t W,
                                                                            int64_t unrolled, const int16_t* rows,
                                                                            __m512i* acc) {
  constexpr int64_t kCols = 32 * kZ;
  auto add = [acc](const int16_t* row) SPIKEOPS_AVX512 __attribute__((always_inline)) {
    for (int i = 0; i < kZ; ++i) acc[i] = _mm512_add_epi16(acc[i], _mm512_loadu_si512(row + 32 * i));
  };
  for (int i = 0; i < kZ; ++i) acc[i] = _mm512_setzero_si512();
  if (W == 1) {
    uint64_t m = bits[0];
    for (int64_t r = 0; r < unrolled; ++r, m = _blsr_u64(m)) add(rows + _tzcnt_u64(m) * kCols);
    for (; m; m &= m - 1) add(rows + __builtin_ctzll(m) * kCols);
  } else {
    for (int64_t word = 0; word < W; ++word)
      for (uint64_t m = bits[word]; m; m &= m - 1) add(rows + (word * 64 + __builtin_ctzll(m)) * kCols);
  }
}

// key_value_counts: V's rows as 0/1 lanes (a 32-bit chunk of a row is the mask of one vector),
// K's columns, the sums.
template <int kVecs>
SPIKEOPS_AVX512 void key_value_counts_avx512(const uint64_t* kb, const uint64_t* vb, Work<int16_t, kVecs>& w) {
  constexpr int kZ = kVecs / 2;
  constexpr int64_t kCols = Work<int16_t, kVecs>::kCols;
  const int64_t N = w.N, d = w.d, Wd = words_for(d), WN = words_for(N), unrolled = unrolled_bits(N);
  const __m512i ones = _mm512_set1_epi16(1);
  for (int64_t b = 0; b < w.blocks; ++b) {
    for (int64_t m = 0; m < N; ++m) {
      for (int i = 0; i < kZ; ++i) {
        const int64_t j = b * kCols + 32 * i;  // 32 divides 64: the chunk is in one word
        const __mmask32 chunk = j < d ? static_cast<__mmask32>(vb[m * Wd + j / 64] >> (j % 64)) : 0;
        _mm512_storeu_si512(w.vlanes.data() + (b * w.vl_rows + m) * kCols + 32 * i, _mm512_maskz_mov_epi16(chunk, ones));
      }
    }
  }
  columns(kb, N, d, w.kcol.data());
  for (int64_t b = 0; b < w.blocks; ++b) {
    for (int64_t ch = 0; ch < d; ++ch) {
      __m512i acc[kZ];
      sum_lanes_avx512<kZ>(w.kcol.data() + ch * WN, WN, unrolled, w.vlanes.data() + b * w.vl_rows * kCols, acc);
      for (int i = 0; i < kZ; ++i) _mm512_storeu_si512(w.kv.data() + (b * w.kv_rows + ch) * kCols + 32 * i, acc[i]);
    }
  }
}

// key_value_counts with VPOPCNTQ, where avx512_bitops_enabled(): K^T V [c, c'] = the popcount of
// (K's column c AND V's column c'), summed over the words along N, for all c' of a group of 32 at
// once. V's columns are stored so that the group's four vectors of 8 word counts, shifted by 0,
// 16, 32, 48 and OR-ed, are its 32 int16 lanes in column order: column 32 g + 4 l + i at
// w.vcol[((g WN + word) 4 + i) 8 + l] (counts <= N < 2^16). Columns from d on read as zero
// (w.vcol's slots for them stay 0).
template <int kVecs>
SPIKEOPS_AVX512_BITOPS void key_value_counts_popcount(const uint64_t* kb, const uint64_t* vb, Work<int16_t, kVecs>& w) {
  constexpr int kZ = kVecs / 2;
  constexpr int64_t kCols = Work<int16_t, kVecs>::kCols;
  const int64_t N = w.N, d = w.d, WN = words_for(N), groups = w.blocks * kZ;
  columns(kb, N, d, w.kcol.data());
  columns(vb, N, d, w.vcol.data(), [WN](int64_t i, int64_t rb) {
    return ((i / 32 * WN + rb) * 4 + i % 4) * 8 + i % 32 / 4;
  });
  for (int64_t g = 0; g < groups; ++g) {
    const uint64_t* vg = w.vcol.data() + g * WN * 32;
    int16_t* kv = w.kv.data() + (g / kZ * w.kv_rows) * kCols + g % kZ * 32;
    for (int64_t ch = 0; ch < d; ++ch) {
      __m512i counts[4] = {};
      for (int64_t word = 0; word < WN; ++word) {
        const __m512i k = _mm512_set1_epi64(static_cast<int64_t>(w.kcol[ch * WN + word]));
        for (int i = 0; i < 4; ++i)
          counts[i] = _mm512_add_epi64(counts[i], _mm512_popcnt_epi64(_mm512_and_si512(k, _mm512_loadu_si512(vg + (word * 4 + i) * 8))));
      }
      const __m512i row = _mm512_or_si512(_mm512_or_si512(counts[0], _mm512_slli_epi64(counts[1], 16)),
                                          _mm512_or_si512(_mm512_slli_epi64(counts[2], 32), _mm512_slli_epi64(counts[3], 48)));
      _mm512_storeu_si512(kv + ch * kCols, row);
    }
  }
}

// lif8 for the lanes of 16 columns: their potentials vm, their outputs o.
template <bool kKeepH, bool kMulTau>
SPIKEOPS_AVX512 inline __attribute__((always_inline)) void lif16(__m512 y, float scale, LifConsts c, float inv_tau,
                                                                 __mmask16 lanes, float* vm, float* o) {
  const __m512 zero = _mm512_setzero_ps();
  const __m512 x = _mm512_mul_ps(y, _mm512_set1_ps(scale));
  const __m512 v = _mm512_maskz_loadu_ps(lanes, vm);
  const __m512 dv = _mm512_sub_ps(x, v);
  const __m512 h = _mm512_add_ps(v, kMulTau ? _mm512_mul_ps(dv, _mm512_set1_ps(inv_tau))
                                            : _mm512_div_ps(dv, _mm512_set1_ps(c.tau)));
  const __mmask16 fire = _mm512_cmp_ps_mask(_mm512_sub_ps(h, _mm512_set1_ps(c.v_threshold)), zero, _CMP_GE_OQ);
  const __m512 reset = _mm512_mask_blend_ps(fire, h, _mm512_add_ps(zero, _mm512_mul_ps(zero, h)));
  _mm512_mask_storeu_ps(vm, lanes, reset);
  _mm512_mask_storeu_ps(o, lanes, kKeepH ? h : _mm512_maskz_mov_ps(fire, _mm512_set1_ps(1.0f)));
}

template <bool kKeepH, bool kMulTau, int kVecs>
SPIKEOPS_AVX512 void attention_neuron_rows_avx512(const uint64_t* qb, float scale, LifConsts c, float inv_tau,
                                                  Work<int16_t, kVecs>& w, const char* const* next, int64_t row_bytes,
                                                  float* out) {
  constexpr int kZ = kVecs / 2;
  constexpr int64_t kCols = Work<int16_t, kVecs>::kCols;
  const int64_t N = w.N, d = w.d, Wd = words_for(d), unrolled = unrolled_bits(d);
  const __mmask16 tail = static_cast<__mmask16>((1u << (d % 16)) - 1);  // the lanes of the last 16 columns
  auto lanes = [d, tail](int64_t j) { return j + 16 <= d ? __mmask16(0xFFFF) : tail; };
  for (int64_t n = 0; n < N; ++n) {
    prefetch_rows(next, n, row_bytes);
    for (int64_t b = 0; b < w.blocks; ++b) {
      __m512i acc[kZ];
      sum_lanes_avx512<kZ>(qb + n * Wd, Wd, unrolled, w.kv.data() + b * w.kv_rows * kCols, acc);
      for (int i = 0; i < kZ; ++i) {  // y is exact below 2^24, as the reference's fp32 products
        const int64_t j = b * kCols + 32 * i;
        float* vm = w.vmem.data() + n * d + j;
        float* o = out + n * d + j;
        if (j < d) {
          const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_castsi512_si256(acc[i])));
          lif16<kKeepH, kMulTau>(lo, scale, c, inv_tau, lanes(j), vm, o);
        }
        if (j + 16 < d) {
          const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(acc[i], 1)));
          lif16<kKeepH, kMulTau>(hi, scale, c, inv_tau, lanes(j + 16), vm + 16, o + 16);
        }
      }
    }
  }
}
#endif

template <typename Count, int kVecs>
static inline __attribute__((always_inline)) void
key_value_counts_body(const uint64_t* kb, const uint64_t* vb, Work<Count, kVecs>& w) {
  using Vec = typename Lanes<Count>::Vec;
  constexpr int64_t kWidth = Lanes<Count>::kWidth, kCols = Work<Count, kVecs>::kCols;
  const int64_t N = w.N, d = w.d, Wd = words_for(d), WN = words_for(N);
#if SPIKEOPS_SSA_AVX2
  if constexpr (std::is_same_v<Count, int16_t> && kVecs % 2 == 0) {
    if (avx512_enabled()) {
      return avx512_bitops_enabled() ? key_value_counts_popcount(kb, vb, w) : key_value_counts_avx512(kb, vb, w);
    }
  }
#endif
  Vec lane_bit;  // V's bits -> 0/1 lanes: each lane tests its bit of a broadcast chunk
  for (int64_t i = 0; i < kWidth; ++i) lane_bit[i] = static_cast<Count>(1u << i);
  for (int64_t b = 0; b < w.blocks; ++b) {
    for (int64_t m = 0; m < N; ++m) {
      for (int64_t i = 0; i < kVecs; ++i) {
        const int64_t j = b * kCols + i * kWidth;  // kWidth divides 64: the chunk is in one word
        const Count chunk = j < d ? static_cast<Count>(vb[m * Wd + j / 64] >> (j % 64)) : 0;
        const Vec lanes = -(((Vec{} + chunk) & lane_bit) != 0);
        __builtin_memcpy(w.vlanes.data() + (b * w.vl_rows + m) * kCols + i * kWidth, &lanes, sizeof(lanes));
      }
    }
  }
  columns(kb, N, d, w.kcol.data());
#if SPIKEOPS_SSA_AVX2
  if constexpr (std::is_same_v<Count, int16_t>) {
    if (avx2_enabled()) return key_value_sums_avx2(w);
  }
#endif
  for (int64_t b = 0; b < w.blocks; ++b) {
    for (int64_t ch = 0; ch < d; ++ch) {
      Vec acc[kVecs];
      sum_rows<kVecs>(w.kcol.data() + ch * WN, WN, w.vlanes.data() + b * w.vl_rows * kCols, acc);
      __builtin_memcpy(w.kv.data() + (b * w.kv_rows + ch) * kCols, acc, sizeof(acc));
    }
  }
}
SPIKEOPS_SIMD_VARIANTS_T((typename Count, int kVecs), (Count, kVecs), void, key_value_counts,
                         (const uint64_t* kb, const uint64_t* vb, Work<Count, kVecs>& w), (kb, vb, w))

// attention_neuron_step with the choice of 1 / tau made (see lif8).
template <bool kKeepH, bool kMulTau, typename Count, int kVecs>
static inline __attribute__((always_inline)) void
attention_neuron_rows_body(const uint64_t* qb, float scale, LifConsts c, float inv_tau, Work<Count, kVecs>& w,
                           const char* const* next, int64_t row_bytes, float* out) {
  using Vec = typename Lanes<Count>::Vec;
  constexpr int64_t kWidth = Lanes<Count>::kWidth, kCols = Work<Count, kVecs>::kCols;
  const int64_t N = w.N, d = w.d, Wd = words_for(d);
  for (int64_t n = 0; n < N; ++n) {
    prefetch_rows(next, n, row_bytes);
    for (int64_t b = 0; b < w.blocks; ++b) {
      Vec acc[kVecs];
      sum_rows<kVecs>(qb + n * Wd, Wd, w.kv.data() + b * w.kv_rows * kCols, acc);
      for (int i = 0; i < kVecs; ++i) {  // y is exact below 2^24, as the reference's fp32 products
        const int64_t j = b * kCols + i * kWidth;
        if (j + kWidth <= d) {
          lif_lanes<kKeepH, kMulTau, Count>(acc[i], scale, c, inv_tau, w.vmem.data() + n * d + j, out + n * d + j);
        } else if (j < d) {  // the last columns, when kWidth does not divide d
          float y[kWidth];
          for (int64_t l = 0; l < kWidth; ++l) y[l] = static_cast<float>(acc[i][l]);
          lif_row<kKeepH>(y, d - j, scale, c, w.vmem.data() + n * d + j, out + n * d + j);
        }
      }
    }
  }
}
SPIKEOPS_SIMD_VARIANTS_T((bool kKeepH, bool kMulTau, typename Count, int kVecs), (kKeepH, kMulTau, Count, kVecs),
                         void, attention_neuron_rows,
                         (const uint64_t* qb, float scale, LifConsts c, float inv_tau, Work<Count, kVecs>& w,
                          const char* const* next, int64_t row_bytes, float* out),
                         (qb, scale, c, inv_tau, w, next, row_bytes, out))

template <bool kKeepH, typename Count, int kVecs>
void attention_neuron_step(const uint64_t* qb, float scale, LifConsts c, Work<Count, kVecs>& w,
                           const char* const* next, int64_t row_bytes, float* out) {
  int exponent;
  const bool mul_tau = std::frexp(c.tau, &exponent) == 0.5f;  // tau a power of two
  const float inv_tau = mul_tau ? 1.0f / c.tau : 0.0f;
#if SPIKEOPS_SSA_AVX2
  if constexpr (std::is_same_v<Count, int16_t> && kVecs % 2 == 0) {
    if (avx512_enabled()) {
      if (mul_tau) attention_neuron_rows_avx512<kKeepH, true>(qb, scale, c, inv_tau, w, next, row_bytes, out);
      else attention_neuron_rows_avx512<kKeepH, false>(qb, scale, c, inv_tau, w, next, row_bytes, out);
      return;
    }
  }
  if constexpr (std::is_same_v<Count, int16_t>) {
    if (avx2_enabled()) {
      if (mul_tau) attention_neuron_rows_avx2<kKeepH, true>(qb, scale, c, inv_tau, w, next, row_bytes, out);
      else attention_neuron_rows_avx2<kKeepH, false>(qb, scale, c, inv_tau, w, next, row_bytes, out);
      return;
    }
  }
#endif
  if (mul_tau) attention_neuron_rows<kKeepH, true>(qb, scale, c, inv_tau, w, next, row_bytes, out);
  else attention_neuron_rows<kKeepH, false>(qb, scale, c, inv_tau, w, next, row_bytes, out);
}

// out[0, n) = acc[0, n) for the first min(n, kFloatBlock) columns (a copy of constant size on the
// common path keeps acc in registers).
inline __attribute__((always_inline)) void store_block(const Floats8* acc, int64_t n, float* out) {
  if (n >= kFloatBlock) {
    __builtin_memcpy(out, acc, sizeof(float) * kFloatBlock);
  } else {
    float last[kFloatBlock];
    __builtin_memcpy(last, acc, sizeof(last));
    std::copy(last, last + n, out);
  }
}

// out[0, d) = the sum of the rows rows[i, 0:d) over the set bits i of the W words: rows zero-padded
// to the stride ld (a multiple of kFloatBlock), summed a block of columns at a time in registers.
inline __attribute__((always_inline)) void sum_float_rows(const uint64_t* bits, int64_t W, const float* rows,
                                                          int64_t ld, int64_t d, float* out) {
  for (int64_t j0 = 0; j0 < d; j0 += kFloatBlock) {
    Floats8 acc[4] = {};
    for_each_bit(bits, W, [&](int64_t i) {
      for (int k = 0; k < 4; ++k) {
        Floats8 row;
        __builtin_memcpy(&row, rows + i * ld + j0 + 8 * k, sizeof(row));
        acc[k] += row;
      }
    });
    store_block(acc, d - j0, out + j0);
  }
}

template <typename scalar_t, typename Count, int kVecs>
static inline __attribute__((always_inline)) void
ssa_backward_item_body(const uint64_t* const* bits, int64_t T, int64_t step_words, const scalar_t* grad,
                       int64_t step_stride, float scale, LifConsts c, Work<Count, kVecs>& w, scalar_t* dq_out,
                       scalar_t* dk_out, scalar_t* dv_out) {
  constexpr int64_t kCols = Work<Count, kVecs>::kCols;
  const int64_t N = w.N, d = w.d, Wd = words_for(d), WN = words_for(N), ld = padded(d);
  std::fill(w.vmem.begin(), w.vmem.end(), 0.0f);
  for (int64_t t = 0; t < T; ++t) {  // the forward again: H and (K^T V)^T of each step
    const int64_t ws = t * step_words;
    key_value_counts(bits[1] + ws, bits[2] + ws, w);
    float* kv_t = w.kv_t.data() + t * d * ld;
    for (int64_t ch = 0; ch < d; ++ch)
      for (int64_t j = 0; j < d; ++j) kv_t[j * ld + ch] = static_cast<float>(w.kv[((j / kCols) * w.kv_rows + ch) * kCols + j % kCols]);
    attention_neuron_step<true>(bits[0] + ws, scale, c, w, nullptr, 0, w.h.data() + t * N * d);
  }
  float *g = w.g.data(), *gv = w.gv.data(), *da = w.da.data(), *da_t = w.da_t.data();
  std::fill(w.gv.begin(), w.gv.end(), 0.0f);
  for (int64_t t = T - 1; t >= 0; --t) {
    const int64_t ws = t * step_words, os = t * step_stride;
    const float *gs = as_float(grad + os, N * d, w.spikes), *h = w.h.data() + t * N * d,
                *kv_t = w.kv_t.data() + t * d * ld;
    // the step's [N, d] output tiles: in place for fp32, else float tiles rounded into place below
    float *dq = float_out(dq_out + os, N * d, w.q), *dk = float_out(dk_out + os, N * d, w.k),
          *dv = float_out(dv_out + os, N * d, w.v);
    for (int64_t n = 0; n < N; ++n) {  // G = scale * dL/dY (lif.cpp's backward step)
      for (int64_t j = 0; j < d; ++j) {
        const int64_t e = n * d + j;
        const float dist = lif_distance(h[e], c);
        g[n * ld + j] = scale * lif_grad_step<true, true>(dist, surrogate_grad<kSigmoid>(dist, 4.0f), gs[e], gv[e], c, true);
      }
    }
    for (int64_t n = 0; n < N; ++n) {  // dQ = G (K^T V)^T, a block of columns at a time in registers
      for (int64_t j0 = 0; j0 < d; j0 += kFloatBlock) {
        Floats8 acc[4] = {};
        for (int64_t j = 0; j < d; ++j) {
          const Floats8 gj = Floats8{} + g[n * ld + j];
          for (int k = 0; k < 4; ++k) {
            Floats8 row;
            __builtin_memcpy(&row, kv_t + j * ld + j0 + 8 * k, sizeof(row));
            acc[k] += gj * row;
          }
        }
        store_block(acc, d - j0, dq + n * d + j0);
      }
    }
    columns(bits[0] + ws, N, d, w.qcol.data());  // dA = Q^T G: row c sums the G rows at Q[:, c]'s spikes
    for (int64_t ch = 0; ch < d; ++ch) sum_float_rows(w.qcol.data() + ch * WN, WN, g, ld, ld, da + ch * ld);
    for (int64_t ch = 0; ch < d; ++ch)
      for (int64_t j = 0; j < d; ++j) da_t[j * ld + ch] = da[ch * ld + j];
    for (int64_t m = 0; m < N; ++m) {
      sum_float_rows(bits[2] + ws + m * Wd, Wd, da_t, ld, d, dk + m * d);  // dK = V dA^T
      sum_float_rows(bits[1] + ws + m * Wd, Wd, da, ld, d, dv + m * d);    // dV = K dA
    }
    store_floats(dq_out + os, dq, N * d);
    store_floats(dk_out + os, dk, N * d);
    store_floats(dv_out + os, dv, N * d);
  }
}
SPIKEOPS_SIMD_VARIANTS_T((typename scalar_t, typename Count, int kVecs), (scalar_t, Count, kVecs), void,
                         ssa_backward_item,
                         (const uint64_t* const* bits, int64_t T, int64_t step_words, const scalar_t* grad,
                          int64_t step_stride, float scale, LifConsts c, Work<Count, kVecs>& w, scalar_t* dq_out,
                          scalar_t* dk_out, scalar_t* dv_out),
                         (bits, T, step_words, grad, step_stride, scale, c, w, dq_out, dk_out, dv_out))

}  // namespace
}  // namespace cpu
}  // namespace spikeops
