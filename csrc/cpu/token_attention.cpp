// Token attention (QKFormer) / MSSA (MSViT) on the CPU (semantics: spikeops/reference.py,
// token_attention). For q, k (and p) spikes [T, BH, N, d]:
//   S[t, bh, n] = sum_c q[t, bh, n, c] (+ sum_c p[t, bh, n, c])        exact integer counts
//   A = LIF(S) over t  (decay_input, hard reset 0, detach_reset, sigmoid surrogate)
//   out[t, bh, n, c] = A[t, bh, n] * k[t, bh, n, c]
// Backward, walking t = T-1 .. 0 per token with the neuron's H and K's bits saved by forward:
//   dA = sum_c dout * k;  dS = LIF backward(dA);  dk = A * dout;  dq = dp = dS (broadcast over c).
// The threads take runs of kTokens consecutive tokens (rows) one at a time (dynamic_for.h) and walk
// t over each. A step goes over its rows in blocks of kBlock, every array of a block in one go
// (the memory system then streams the arrays in parallel; array after array over all the rows,
// it streams one at a time, ~1.5x slower): a block's q (and p, and k) values are packed as one
// run of bits (bits.h, which also checks the values are 0/1), S per token is a difference of
// prefix popcounts of that run, k's row words (kept for backward) are cut out of it, the neuron
// steps the block's tokens (a loop over tokens that vectorises), then out = A * k row by row.
// Backward likewise: dA is a masked sum of the dout row, the LIF backward runs over the block's
// tokens, then dk = A * dout.
//
// The channels-first layout [T, BH, d, N] (a module's [T, B, C, N] activations, a head's d
// channels before its tokens; token_attention_cf_*): the same math with the sums over c running
// down the d rows of a (t, bh) block, eight tokens per vector. The threads take (bh, run of
// kCfTokens tokens) items and walk t over each; k is kept packed along N (its contiguous dim). A
// step's output is written while the next step's sums are taken (forward: step t + 1's q and p;
// backward: step t - 1's dA), so that more arrays stream at once.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <atomic>
#include <optional>
#include <vector>

#include "../ops.h"
#include "bits.h"
#include "dynamic_for.h"
#include "float_staging.h"
#include "lif_math.h"
#include "simd_variants.h"

namespace spikeops {
namespace cpu {
namespace {

constexpr int64_t kTokens = 1024;  // tokens per task chunk (their neuron state is kept over t)
constexpr int64_t kBlock = 8;      // tokens per pass over the arrays

inline int64_t words_for(int64_t bits) { return (bits + 63) / 64; }

// Per-thread buffers of one chunk.
struct Scratch {
  explicit Scratch(int64_t d)
      : bits(words_for(kBlock * d)), prefix(words_for(kBlock * d) + 1), count(kTokens), state(kTokens),
        h(kTokens), a(kTokens), grad_a(kTokens) {}
  std::vector<uint64_t> bits;       // one block's q, p or k values as a run of bits
  std::vector<int32_t> prefix;      // set bits before each word of the run
  std::vector<int32_t> count;       // S
  std::vector<float> state;         // V (forward), dL/dV (backward)
  std::vector<float> h, a, grad_a;  // H when not kept, A, dL/dA
  std::vector<float> in[3], out;    // float copies of fp16/bf16/fp64 rows
};

// Forward over `rows` consecutive tokens at one step: counts of q (and p), one LIF step per
// token (state: V, carried over t), H into h, k's bits into k_words, out = A * k. Returns true
// if a value was not 0/1.
bool token_rows_forward(const float* q, const float* p, const float* k, int64_t rows, int64_t d, float tau,
                        float v_threshold, Scratch& s, float* h, uint64_t* k_words, float* out);

// Backward over `rows` tokens at one step: dA from dout and k_words, dS = LIF backward (state:
// dL/dV carried to step t - 1), dk = A * dout.
void token_rows_backward(const float* g, const uint64_t* k_words, const float* h, int64_t rows, int64_t d, float tau,
                         float v_threshold, Scratch& s, float* grad_s, float* grad_k);

// What a backward gets from its forward: k's words [rows, W] int64 and H [T, BH, N] fp32, contiguous.
inline void check_saved(const char* op, const at::Tensor& k_words, int64_t rows, int64_t W, const char* words_shape,
                        const at::Tensor& h, int64_t T, int64_t BH, int64_t N) {
  TORCH_CHECK(k_words.dim() == 2 && k_words.size(0) == rows && k_words.size(1) == W && k_words.is_contiguous() &&
                  k_words.scalar_type() == at::kLong,
              op, ": k_words must be contiguous int64 ", words_shape);
  TORCH_CHECK(h.dim() == 3 && h.size(0) == T && h.size(1) == BH && h.size(2) == N && h.scalar_type() == at::kFloat &&
                  h.is_contiguous(),
              op, ": h must be contiguous fp32 [T, BH, N]");
}

// What a forward gets: q, k (and p) contiguous 4-d tensors of one shape and dtype in `layout`.
inline void check_inputs(const char* op, const char* layout, const at::Tensor& q, const at::Tensor& k,
                         const std::optional<at::Tensor>& p) {
  TORCH_CHECK(q.dim() == 4 && q.is_contiguous() && k.sizes() == q.sizes() && k.is_contiguous() &&
                  k.scalar_type() == q.scalar_type(),
              op, ": q, k must be contiguous ", layout, " of one dtype");
  TORCH_CHECK(!p || (p->sizes() == q.sizes() && p->is_contiguous() && p->scalar_type() == q.scalar_type()),
              op, ": p must match q");
}

// The typed data of a forward, either layout: q, k, p (null without p) and out, H (null unless
// kept), k's words.
template <typename scalar_t>
struct ForwardData {
  ForwardData(const at::Tensor& q_, const at::Tensor& k_, const std::optional<at::Tensor>& p_, at::Tensor& out_,
              at::Tensor& h_, bool save, at::Tensor& k_words_)
      : q(q_.const_data_ptr<scalar_t>()), k(k_.const_data_ptr<scalar_t>()),
        p(p_ ? p_->const_data_ptr<scalar_t>() : nullptr), out(out_.mutable_data_ptr<scalar_t>()),
        h(save ? h_.mutable_data_ptr<float>() : nullptr),
        k_words(reinterpret_cast<uint64_t*>(k_words_.mutable_data_ptr<int64_t>())) {}
  const scalar_t *q, *k, *p;
  scalar_t* out;
  float* h;
  uint64_t* k_words;
};

// The typed data of a backward, either layout: dL/dout, k's words, H in; dL/dS, dL/dk out.
template <typename scalar_t>
struct BackwardData {
  BackwardData(const at::Tensor& grad_out_, const at::Tensor& k_words_, const at::Tensor& h_, at::Tensor& grad_s_,
               at::Tensor& grad_k_)
      : grad_out(grad_out_.const_data_ptr<scalar_t>()),
        k_words(reinterpret_cast<const uint64_t*>(k_words_.const_data_ptr<int64_t>())),
        h(h_.const_data_ptr<float>()), grad_s(grad_s_.mutable_data_ptr<float>()),
        grad_k(grad_k_.mutable_data_ptr<scalar_t>()) {}
  const scalar_t* grad_out;
  const uint64_t* k_words;
  const float* h;
  float* grad_s;
  scalar_t* grad_k;
};

constexpr int64_t kCfTokens = 1024;  // tokens per item in the [d, N] layout: whole words of k's bits, whole pages of a row

// Per-thread state of one [d, N]-layout item: the neuron's V (forward) or dL/dV (backward), H
// when it is not kept, and the tokens' sums: this step's, and the ones of the step processed next
// (accumulated meanwhile).
struct CfScratch {
  float state[kCfTokens], h[kCfTokens], sum[kCfTokens], next[kCfTokens], a[kCfTokens];
  std::vector<float> in[3], out;  // float copies of fp16/bf16/fp64 blocks
};

// A [d, L] block of an item's step, rows N apart in the tensor: fp32 blocks are used in place
// (rows N apart), other dtypes through float copies with rows L apart (block_stride says which).
template <typename scalar_t>
int64_t block_stride(int64_t N, int64_t L) {
  return std::is_same_v<scalar_t, float> ? N : L;
}

template <typename scalar_t>
const float* block_as_float(const scalar_t* src, int64_t d, int64_t L, int64_t N, std::vector<float>& buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return src;
  } else {
    buf.resize(d * L);
    for (int64_t r = 0; r < d; ++r) as_float_into(src + r * N, L, buf.data() + r * L);
    return buf.data();
  }
}

template <typename scalar_t>
float* block_out(scalar_t* dst, int64_t d, int64_t L, std::vector<float>& buf) {
  return float_out(dst, d * L, buf);  // fp32: in place (rows N apart); else a [d, L] buffer
}

template <typename scalar_t>
void store_block(scalar_t* dst, const float* src, int64_t d, int64_t L, int64_t N) {
  for (int64_t r = 0; r < d; ++r) store_floats(dst + r * N, src + r * L, L);  // nothing to do for fp32
}

// s.sum = the sums over the d rows of q (and p) for tokens [n0, n0 + L) of one (t, bh) block [d, N]
// (q, p point at (row 0, column n0)). Returns true if a value was not 0/1.
bool cf_sums(const float* q, const float* p, int64_t d, int64_t ld, int64_t L, CfScratch& s);

// One step over those tokens, given s.sum: the neuron (H into h), k's bits into k_words (row 0's
// word n0 / 64, rows of Wn words), out = A * k; meanwhile the next step's sums of qn (and pn)
// into s.sum (qn = nullptr: the last step), so that q, p, k and out stream in parallel (array
// after array, each streamed alone: the forward took 1.6-1.9x the time of torch.addcmul over the
// same four arrays). Returns true if a value was not 0/1.
bool cf_step_forward(const float* qn, const float* pn, const float* k, int64_t d, int64_t ld, int64_t L, float tau,
                     float v_threshold, CfScratch& s, float* h, uint64_t* k_words, int64_t Wn, float* out);

// s.sum = dA = sum_c dout k for those tokens of one step (g: dout at (row 0, column n0)).
void cf_grad_sums(const float* g, const uint64_t* k_words, int64_t Wn, int64_t d, int64_t ld, int64_t L,
                  CfScratch& s);

// Backward of one step over those tokens, given s.sum = dA: dS = LIF backward (state: dL/dV carried
// to step t - 1), dk = A * dout; meanwhile the previous step's dA from gn and kn_words into s.sum
// (gn = nullptr: step 0), so that two dout blocks stream in parallel, as in forward.
void cf_step_backward(const float* gn, const uint64_t* kn_words, const float* g, int64_t Wn, const float* h, int64_t d,
                      int64_t ld, int64_t L, float tau, float v_threshold, CfScratch& s, float* grad_s, float* grad_k);

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, bool> token_attention_forward(
    const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& p, double v_threshold,
    double tau, bool save) {
  check_inputs("token_attention_forward", "[T, BH, N, d]", q, k, p);
  const int64_t T = q.size(0), R = q.size(1) * q.size(2), d = q.size(3), Wd = words_for(d);
  auto out = at::empty_like(q);
  auto h = at::empty(save ? std::vector<int64_t>{T, q.size(1), q.size(2)} : std::vector<int64_t>{0},
                     q.options().dtype(at::kFloat));
  auto k_words = at::empty({T * R, Wd}, q.options().dtype(at::kLong));  // filled by the kernel, kept if save
  std::atomic<bool> bad_any{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "token_attention_forward", [&] {
    const ForwardData<scalar_t> x(q, k, p, out, h, save, k_words);
    for_each_item((R + kTokens - 1) / kTokens, [&] { return Scratch(d); }, [&](Scratch& s, int64_t chunk, int64_t) {
      const int64_t r0 = chunk * kTokens, rows = std::min(kTokens, R - r0);
      std::fill(s.state.begin(), s.state.end(), 0.0f);
      bool bad = false;
      for (int64_t t = 0; t < T; ++t) {
        const int64_t row0 = t * R + r0, off = row0 * d, count = rows * d;
        float* o = float_out(x.out + off, count, s.out);
        bad |= token_rows_forward(as_float(x.q + off, count, s.in[0]),
                                  x.p ? as_float(x.p + off, count, s.in[1]) : nullptr,
                                  as_float(x.k + off, count, s.in[2]), rows, d, static_cast<float>(tau),
                                  static_cast<float>(v_threshold), s, x.h ? x.h + row0 : s.h.data(),
                                  x.k_words + row0 * Wd, o);
        store_floats(x.out + off, o, count);
      }
      if (bad) bad_any.store(true, std::memory_order_relaxed);
    });
  });
  if (!save) k_words = at::empty({0}, q.options().dtype(at::kLong));
  return {out, h, k_words, !bad_any.load()};
}

std::tuple<at::Tensor, at::Tensor> token_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& k_words, const at::Tensor& h, double v_threshold, double tau) {
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.is_contiguous(), "token_attention_backward: grad_out must be contiguous [T, BH, N, d]");
  const int64_t T = grad_out.size(0), BH = grad_out.size(1), N = grad_out.size(2), d = grad_out.size(3);
  const int64_t R = BH * N, Wd = words_for(d);
  check_saved("token_attention_backward", k_words, T * R, Wd, "[T*BH*N, ceil(d/64)]", h, T, BH, N);
  auto grad_s = at::empty({T, BH, N}, h.options());
  auto grad_k = at::empty_like(grad_out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "token_attention_backward", [&] {
    const BackwardData<scalar_t> x(grad_out, k_words, h, grad_s, grad_k);
    for_each_item((R + kTokens - 1) / kTokens, [&] { return Scratch(d); }, [&](Scratch& s, int64_t chunk, int64_t) {
      const int64_t r0 = chunk * kTokens, rows = std::min(kTokens, R - r0);
      std::fill(s.state.begin(), s.state.end(), 0.0f);
      for (int64_t t = T - 1; t >= 0; --t) {
        const int64_t row0 = t * R + r0, off = row0 * d, count = rows * d;
        float* gk = float_out(x.grad_k + off, count, s.out);
        token_rows_backward(as_float(x.grad_out + off, count, s.in[0]), x.k_words + row0 * Wd, x.h + row0, rows, d,
                            static_cast<float>(tau), static_cast<float>(v_threshold), s, x.grad_s + row0, gk);
        store_floats(x.grad_k + off, gk, count);
      }
    });
  });
  return {grad_s, grad_k};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, bool> token_attention_cf_forward(
    const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& p, double v_threshold,
    double tau, bool save) {
  check_inputs("token_attention_cf_forward", "[T, BH, d, N]", q, k, p);
  const int64_t T = q.size(0), BH = q.size(1), d = q.size(2), N = q.size(3), Wn = words_for(N);
  const int64_t chunks = (N + kCfTokens - 1) / kCfTokens;
  auto out = at::empty_like(q);
  auto h = at::empty(save ? std::vector<int64_t>{T, BH, N} : std::vector<int64_t>{0}, q.options().dtype(at::kFloat));
  auto k_words = at::empty({T * BH * d, Wn}, q.options().dtype(at::kLong));  // filled by the kernel, kept if save
  std::atomic<bool> bad_any{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "token_attention_cf_forward", [&] {
    const ForwardData<scalar_t> x(q, k, p, out, h, save, k_words);
    for_each_item(BH * chunks, [] { return CfScratch(); }, [&](CfScratch& s, int64_t item, int64_t) {
      const int64_t bh = item / chunks, n0 = (item % chunks) * kCfTokens, L = std::min(kCfTokens, N - n0);
      const int64_t ld = block_stride<scalar_t>(N, L);
      std::fill(s.state, s.state + L, 0.0f);
      auto qp = [&](int64_t t, int i) {  // step t's q (i = 0) or p (i = 1) block as floats
        const scalar_t* src = i == 0 ? x.q : x.p;
        return src ? block_as_float(src + (t * BH + bh) * d * N + n0, d, L, N, s.in[i]) : nullptr;
      };
      bool bad = cf_sums(qp(0, 0), qp(0, 1), d, ld, L, s);
      for (int64_t t = 0; t < T; ++t) {
        const int64_t block = t * BH + bh, off = block * d * N + n0;
        const bool last = t + 1 == T;
        float* o = block_out(x.out + off, d, L, s.out);
        bad |= cf_step_forward(last ? nullptr : qp(t + 1, 0), last ? nullptr : qp(t + 1, 1),
                               block_as_float(x.k + off, d, L, N, s.in[2]), d, ld, L, static_cast<float>(tau),
                               static_cast<float>(v_threshold), s, x.h ? x.h + block * N + n0 : s.h,
                               x.k_words + block * d * Wn + n0 / 64, Wn, o);
        store_block(x.out + off, o, d, L, N);
      }
      if (bad) bad_any.store(true, std::memory_order_relaxed);
    });
  });
  if (!save) k_words = at::empty({0}, q.options().dtype(at::kLong));
  return {out, h, k_words, !bad_any.load()};
}

std::tuple<at::Tensor, at::Tensor> token_attention_cf_backward(
    const at::Tensor& grad_out, const at::Tensor& k_words, const at::Tensor& h, double v_threshold, double tau) {
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.is_contiguous(),
              "token_attention_cf_backward: grad_out must be contiguous [T, BH, d, N]");
  const int64_t T = grad_out.size(0), BH = grad_out.size(1), d = grad_out.size(2), N = grad_out.size(3);
  const int64_t Wn = words_for(N), chunks = (N + kCfTokens - 1) / kCfTokens;
  check_saved("token_attention_cf_backward", k_words, T * BH * d, Wn, "[T*BH*d, ceil(N/64)]", h, T, BH, N);
  auto grad_s = at::empty({T, BH, N}, h.options());
  auto grad_k = at::empty_like(grad_out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "token_attention_cf_backward", [&] {
    const BackwardData<scalar_t> x(grad_out, k_words, h, grad_s, grad_k);
    for_each_item(BH * chunks, [] { return CfScratch(); }, [&](CfScratch& s, int64_t item, int64_t) {
      const int64_t bh = item / chunks, n0 = (item % chunks) * kCfTokens, L = std::min(kCfTokens, N - n0);
      const int64_t ld = block_stride<scalar_t>(N, L);
      std::fill(s.state, s.state + L, 0.0f);
      // step t's dout block as floats (into s.in[t % 2]: the current and the previous step's are in use)
      auto grad_block = [&](int64_t t) {
        return block_as_float(x.grad_out + (t * BH + bh) * d * N + n0, d, L, N, s.in[t % 2]);
      };
      auto words = [&](int64_t t) { return x.k_words + (t * BH + bh) * d * Wn + n0 / 64; };
      const float* g = grad_block(T - 1);
      cf_grad_sums(g, words(T - 1), Wn, d, ld, L, s);
      for (int64_t t = T - 1; t >= 0; --t) {
        const int64_t block = t * BH + bh, off = block * d * N + n0;
        const float* gn = t > 0 ? grad_block(t - 1) : nullptr;
        float* gk = block_out(x.grad_k + off, d, L, s.out);
        cf_step_backward(gn, t > 0 ? words(t - 1) : nullptr, g, Wn, x.h + block * N + n0, d, ld, L,
                         static_cast<float>(tau), static_cast<float>(v_threshold), s, x.grad_s + block * N + n0, gk);
        store_block(x.grad_k + off, gk, d, L, N);
        g = gn;
      }
    });
  });
  return {grad_s, grad_k};
}

namespace {

typedef float Floats __attribute__((vector_size(32)));
typedef int32_t Ints __attribute__((vector_size(32)));

// All-ones lanes where bits j .. j + 7 of a run of words are set (j a multiple of 8): each lane
// tests its bit of a broadcast byte.
inline __attribute__((always_inline)) Ints bit_lanes(const uint64_t* words, int64_t j) {
  const Ints lane_bit = {1, 2, 4, 8, 16, 32, 64, 128};
  return ((Ints{} + static_cast<int32_t>(words[j / 64] >> (j % 64))) & lane_bit) != 0;
}

// The sum of g[j] over the set bits j of the row's words: eight lanes at a time, masked by the
// bits, then the lanes and a scalar tail.
inline __attribute__((always_inline)) float masked_sum(const float* g, const uint64_t* words, int64_t d) {
  Floats acc = {};
  int64_t j = 0;
  for (; j + 8 <= d; j += 8) {
    const Ints lane = bit_lanes(words, j);
    Floats x;
    __builtin_memcpy(&x, g + j, sizeof(x));
    acc += reinterpret_cast<Floats>(reinterpret_cast<Ints>(x) & lane);
  }
  float sum = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; j < d; ++j) {
    if ((words[j / 64] >> (j % 64)) & 1) sum += g[j];
  }
  return sum;
}

// Packs x [n, d] as one run of n d bits into s.bits and adds each row's set bits to count.
inline __attribute__((always_inline)) bool add_row_counts(const float* x, int64_t n, int64_t d, Scratch& s,
                                                          int32_t* count) {
  const bool bad = pack_rows(x, 1, n * d, s.bits.data());
  const int64_t W = words_for(n * d);
  s.prefix[0] = 0;
  for (int64_t w = 0; w < W; ++w) s.prefix[w + 1] = s.prefix[w] + __builtin_popcountll(s.bits[w]);
  int32_t before = 0;  // set bits before row r
  for (int64_t r = 0; r < n; ++r) {
    const int64_t end = (r + 1) * d, w = end / 64, b = end % 64;
    const int32_t upto = s.prefix[w] + (b ? __builtin_popcountll(s.bits[w] << (64 - b)) : 0);
    count[r] += upto - before;
    before = upto;
  }
  return bad;
}

// Bits [pos, pos + len) of a run of bits (len <= 64).
inline __attribute__((always_inline)) uint64_t cut_bits(const uint64_t* run, int64_t pos, int64_t len) {
  const uint64_t* w = run + pos / 64;
  const int64_t b = pos % 64;
  uint64_t bits = w[0] >> b;
  if (b + len > 64) bits |= w[1] << (64 - b);
  return len == 64 ? bits : bits & ((uint64_t{1} << len) - 1);
}

static inline __attribute__((always_inline)) bool
token_rows_forward_body(const float* q, const float* p, const float* k, int64_t rows, int64_t d, float tau,
                        float v_threshold, Scratch& s, float* h, uint64_t* k_words, float* out) {
  const LifConsts c{tau, v_threshold, 0.0f};  // v_reset 0 known here: "V - v_reset" folds away
  const int64_t Wd = words_for(d);
  bool bad = false;
  for (int64_t r0 = 0; r0 < rows; r0 += kBlock) {
    const int64_t n = std::min(kBlock, rows - r0);
    int32_t* count = s.count.data() + r0;
    std::fill(count, count + n, 0);
    bad |= add_row_counts(q + r0 * d, n, d, s, count);
    if (p) bad |= add_row_counts(p + r0 * d, n, d, s, count);
    bad |= pack_rows(k + r0 * d, 1, n * d, s.bits.data());
    for (int64_t r = 0; r < n; ++r) {
      for (int64_t w = 0; w < Wd; ++w)
        k_words[(r0 + r) * Wd + w] = cut_bits(s.bits.data(), r * d + 64 * w, std::min<int64_t>(64, d - 64 * w));
    }
    float* vm = s.state.data() + r0;
    float* a = s.a.data() + r0;
    for (int64_t r = 0; r < n; ++r) {
      const float hv = lif_charge<true>(vm[r], static_cast<float>(count[r]), c);
      const bool fire = lif_fire(hv, c);
      vm[r] = lif_reset<true>(hv, fire, c);
      h[r0 + r] = hv;
      a[r] = fire ? 1.0f : 0.0f;
    }
    for (int64_t r = 0; r < n; ++r) {  // the reference's A * k (-0 included)
      const float ar = a[r], *kr = k + (r0 + r) * d;
      float* o = out + (r0 + r) * d;
      for (int64_t j = 0; j < d; ++j) o[j] = ar * kr[j];
    }
  }
  return bad;
}
SPIKEOPS_SIMD_VARIANTS(, bool, token_rows_forward,
                       (const float* q, const float* p, const float* k, int64_t rows, int64_t d, float tau,
                        float v_threshold, Scratch& s, float* h, uint64_t* k_words, float* out),
                       (q, p, k, rows, d, tau, v_threshold, s, h, k_words, out))

static inline __attribute__((always_inline)) void
token_rows_backward_body(const float* g, const uint64_t* k_words, const float* h, int64_t rows, int64_t d, float tau,
                         float v_threshold, Scratch& s, float* grad_s, float* grad_k) {
  const LifConsts c{tau, v_threshold, 0.0f};
  const int64_t Wd = words_for(d);
  float* gv = s.state.data();
  for (int64_t r0 = 0; r0 < rows; r0 += kBlock) {
    const int64_t end = std::min(r0 + kBlock, rows);
    for (int64_t r = r0; r < end; ++r) s.grad_a[r] = masked_sum(g + r * d, k_words + r * Wd, d);
    for (int64_t r = r0; r < end; ++r) {
      const float dist = lif_distance(h[r], c);
      s.a[r] = __builtin_signbit(dist) ? 0.0f : 1.0f;
      grad_s[r] = lif_grad_step<true, true>(dist, surrogate_grad<kSigmoid>(dist, 4.0f), s.grad_a[r], gv[r], c, true);
    }
    for (int64_t r = r0; r < end; ++r) {  // the reference's dout * A
      const float ar = s.a[r];
      for (int64_t j = 0; j < d; ++j) grad_k[r * d + j] = ar * g[r * d + j];
    }
  }
}
SPIKEOPS_SIMD_VARIANTS(, void, token_rows_backward,
                       (const float* g, const uint64_t* k_words, const float* h, int64_t rows, int64_t d, float tau,
                        float v_threshold, Scratch& s, float* grad_s, float* grad_k),
                       (g, k_words, h, rows, d, tau, v_threshold, s, grad_s, grad_k))

// acc[i] += x[i] (+ y[i] where y) for the L values of a row; true if one is not 0/1.
inline __attribute__((always_inline)) bool add_rows(const float* x, const float* y, int64_t L, float* acc) {
  int bad = 0;
  if (y) {
    for (int64_t i = 0; i < L; ++i) {
      acc[i] += x[i] + y[i];  // counts of 0/1 values: exact in fp32
      bad |= ((x[i] != 0.0f) & (x[i] != 1.0f)) | ((y[i] != 0.0f) & (y[i] != 1.0f));
    }
  } else {
    for (int64_t i = 0; i < L; ++i) {
      acc[i] += x[i];
      bad |= (x[i] != 0.0f) & (x[i] != 1.0f);
    }
  }
  return bad;
}

static inline __attribute__((always_inline)) bool
cf_sums_body(const float* q, const float* p, int64_t d, int64_t ld, int64_t L, CfScratch& s) {
  bool bad = false;
  std::fill(s.sum, s.sum + L, 0.0f);
  for (int64_t r = 0; r < d; ++r) bad |= add_rows(q + r * ld, p ? p + r * ld : nullptr, L, s.sum);
  return bad;
}
SPIKEOPS_SIMD_VARIANTS(, bool, cf_sums,
                       (const float* q, const float* p, int64_t d, int64_t ld, int64_t L, CfScratch& s),
                       (q, p, d, ld, L, s))

static inline __attribute__((always_inline)) bool
cf_step_forward_body(const float* qn, const float* pn, const float* k, int64_t d, int64_t ld, int64_t L, float tau,
                     float v_threshold, CfScratch& s, float* h, uint64_t* k_words, int64_t Wn, float* out) {
  const LifConsts c{tau, v_threshold, 0.0f};
  bool bad = false;
  for (int64_t i = 0; i < L; ++i) {
    const float hv = lif_charge<true>(s.state[i], s.sum[i], c);
    const bool fire = lif_fire(hv, c);
    s.state[i] = lif_reset<true>(hv, fire, c);
    h[i] = hv;
    s.a[i] = fire ? 1.0f : 0.0f;
  }
  if (qn) std::fill(s.next, s.next + L, 0.0f);
  for (int64_t r = 0; r < d; ++r) {
    const float* kr = k + r * ld;
    bad |= pack_rows(kr, 1, L, k_words + r * Wn);
    float* o = out + r * ld;
    for (int64_t i = 0; i < L; ++i) o[i] = s.a[i] * kr[i];  // the reference's A * k (-0 included)
    if (qn) bad |= add_rows(qn + r * ld, pn ? pn + r * ld : nullptr, L, s.next);
  }
  if (qn) std::copy(s.next, s.next + L, s.sum);
  return bad;
}
SPIKEOPS_SIMD_VARIANTS(, bool, cf_step_forward,
                       (const float* qn, const float* pn, const float* k, int64_t d, int64_t ld, int64_t L, float tau,
                        float v_threshold, CfScratch& s, float* h, uint64_t* k_words, int64_t Wn, float* out),
                       (qn, pn, k, d, ld, L, tau, v_threshold, s, h, k_words, Wn, out))

// acc[i] += g[i] where bit i of the row's words is set, for the L values of a row (eight tokens a
// vector; dout * k for 0/1 k).
inline __attribute__((always_inline)) void add_masked_row(const float* g, const uint64_t* w, int64_t L, float* acc) {
  int64_t i = 0;
  for (; i + 8 <= L; i += 8) {
    const Ints lane = bit_lanes(w, i);
    Floats x, a;
    __builtin_memcpy(&x, g + i, sizeof(x));
    __builtin_memcpy(&a, acc + i, sizeof(a));
    a += reinterpret_cast<Floats>(reinterpret_cast<Ints>(x) & lane);
    __builtin_memcpy(acc + i, &a, sizeof(a));
  }
  for (; i < L; ++i) {
    if ((w[i / 64] >> (i % 64)) & 1) acc[i] += g[i];
  }
}

static inline __attribute__((always_inline)) void
cf_grad_sums_body(const float* g, const uint64_t* k_words, int64_t Wn, int64_t d, int64_t ld, int64_t L, CfScratch& s) {
  std::fill(s.sum, s.sum + L, 0.0f);
  for (int64_t r = 0; r < d; ++r) add_masked_row(g + r * ld, k_words + r * Wn, L, s.sum);
}
SPIKEOPS_SIMD_VARIANTS(, void, cf_grad_sums,
                       (const float* g, const uint64_t* k_words, int64_t Wn, int64_t d, int64_t ld, int64_t L,
                        CfScratch& s), (g, k_words, Wn, d, ld, L, s))

static inline __attribute__((always_inline)) void
cf_step_backward_body(const float* gn, const uint64_t* kn_words, const float* g, int64_t Wn, const float* h,
                      int64_t d, int64_t ld, int64_t L, float tau, float v_threshold, CfScratch& s, float* grad_s,
                      float* grad_k) {
  const LifConsts c{tau, v_threshold, 0.0f};
  for (int64_t i = 0; i < L; ++i) {
    const float dist = lif_distance(h[i], c);
    s.a[i] = __builtin_signbit(dist) ? 0.0f : 1.0f;
    grad_s[i] = lif_grad_step<true, true>(dist, surrogate_grad<kSigmoid>(dist, 4.0f), s.sum[i], s.state[i], c, true);
  }
  if (gn) std::fill(s.next, s.next + L, 0.0f);
  for (int64_t r = 0; r < d; ++r) {  // the reference's dout * A
    const float* gr = g + r * ld;
    float* gk = grad_k + r * ld;
    for (int64_t i = 0; i < L; ++i) gk[i] = s.a[i] * gr[i];
    if (gn) add_masked_row(gn + r * ld, kn_words + r * Wn, L, s.next);
  }
  if (gn) std::copy(s.next, s.next + L, s.sum);
}
SPIKEOPS_SIMD_VARIANTS(, void, cf_step_backward,
                       (const float* gn, const uint64_t* kn_words, const float* g, int64_t Wn, const float* h,
                        int64_t d, int64_t ld, int64_t L, float tau, float v_threshold, CfScratch& s, float* grad_s,
                        float* grad_k), (gn, kn_words, g, Wn, h, d, ld, L, tau, v_threshold, s, grad_s, grad_k))

}  // namespace
}  // namespace cpu
}  // namespace spikeops
