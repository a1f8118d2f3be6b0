// Token attention (QKFormer) / MSSA (MSViT) on the CPU (semantics: spikeops/reference.py,
// token_attention). For q, k (and p) spikes [T, BH, N, d]:
//   S[t, bh, n] = sum_c q[t, bh, n, c] (+ sum_c p[t, bh, n, c])        exact integer counts
//   A = LIF(S) over t  (decay_input, hard reset 0, detach_reset, sigmoid surrogate)
//   out[t, bh, n, c] = A[t, bh, n] * k[t, bh, n, c]
// Backward, walking t = T-1 .. 0 per token with the neuron's H and K's bits saved by forward:
//   dA = sum_c dout * k;  dS = LIF backward(dA);  dk = A * dout;  dq = dp = dS (broadcast over c).
// The sums are popcounts of the rows packed with bits.h (which also checks the values are 0/1);
// K's packed rows are written by forward and read by backward (1 bit per spike kept).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <optional>
#include <vector>

#include "../ops.h"
#include "bits.h"
#include "lif_math.h"

namespace spikeops {
namespace cpu {
namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SPIKEOPS_TOKEN_CLONES __attribute__((target_clones("arch=haswell", "default")))
#else
#define SPIKEOPS_TOKEN_CLONES
#endif

// Forward over a run of `rows` consecutive tokens at one step (float rows of d values):
// S = popcount(q row bits) (+ popcount(p row bits)), one LIF step per token (vmem), out row =
// k row where the token fires, else 0; the k row bits go to k_words. Returns true if a value
// was not 0/1.
SPIKEOPS_TOKEN_CLONES
bool token_rows_forward(const float* q, const float* p, const float* k, int64_t rows, int64_t d, LifConsts c,
                        float* vmem, float* h_out, uint64_t* k_words, float* out) {
  const int64_t Wd = (d + 63) / 64;
  uint64_t bits[16];
  bool bad = false;
  for (int64_t r = 0; r < rows; ++r) {
    int64_t count = 0;
    for (const float* x : {q, p}) {
      if (!x) continue;
      for (int64_t w0 = 0; w0 < Wd; w0 += 16) {  // popcount of the packed row, 16 words at a time
        const int64_t nw = std::min<int64_t>(16, Wd - w0), n = std::min<int64_t>(nw * 64, d - w0 * 64);
        bad |= pack_bits(x + r * d + w0 * 64, n, bits);
        for (int64_t w = 0; w < nw; ++w) count += __builtin_popcountll(bits[w]);
      }
    }
    bad |= pack_bits(k + r * d, d, k_words + r * Wd);
    const float hv = lif_charge<true>(vmem[r], static_cast<float>(count), c);
    const bool fire = lif_fire(hv, c);
    vmem[r] = lif_reset<true>(hv, fire, c);
    if (h_out) h_out[r] = hv;
    float* o = out + r * d;
    if (fire) std::copy(k + r * d, k + (r + 1) * d, o); else std::fill(o, o + d, 0.0f);
  }
  return bad;
}

// Backward over `rows` tokens at one step: dA = sum of dout over k's spikes (from k_words),
// dk row = dout where the token fired, dS = LIF backward (gv carries dL/dV to step t-1).
SPIKEOPS_TOKEN_CLONES
void token_rows_backward(const float* g, const uint64_t* k_words, const float* h, int64_t rows, int64_t d,
                         LifConsts c, float* gv, float* grad_s, float* grad_k) {
  const int64_t Wd = (d + 63) / 64;
  for (int64_t r = 0; r < rows; ++r) {
    const float* gr = g + r * d;
    float ga = 0.0f;
    for_each_bit(k_words + r * Wd, Wd, [&](int64_t j) { ga += gr[j]; });
    const float dist = lif_distance(h[r], c);
    float* gk = grad_k + r * d;
    if (!__builtin_signbit(dist)) std::copy(gr, gr + d, gk); else std::fill(gk, gk + d, 0.0f);
    grad_s[r] = lif_grad_step<true, true>(dist, surrogate_grad<kSigmoid>(dist, 4.0f), ga, gv[r], c, true);
  }
}

constexpr int64_t kTokens = 256;  // tokens per task chunk

template <typename scalar_t>
const float* rows_as_float(const scalar_t* src, int64_t count, std::vector<float>& buf) {
  buf.resize(count);
  for (int64_t i = 0; i < count; ++i) buf[i] = static_cast<float>(src[i]);
  return buf.data();
}

const float* rows_as_float(const float* src, int64_t, std::vector<float>&) { return src; }

template <typename scalar_t>
float* rows_out(scalar_t*, int64_t count, std::vector<float>& buf) {
  buf.resize(count);
  return buf.data();
}

float* rows_out(float* dst, int64_t, std::vector<float>&) { return dst; }

template <typename scalar_t>
void store_rows(scalar_t* dst, const float* src, int64_t count) {
  for (int64_t i = 0; i < count; ++i) dst[i] = static_cast<scalar_t>(src[i]);
}

void store_rows(float*, const float*, int64_t) {}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, bool> token_attention_forward(
    const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& p, double v_threshold,
    double tau, bool save) {
  TORCH_CHECK(q.dim() == 4 && q.is_contiguous() && k.sizes() == q.sizes() && k.is_contiguous() &&
                  k.scalar_type() == q.scalar_type(),
              "token_attention_forward: q, k must be contiguous [T, BH, N, d] of one dtype");
  TORCH_CHECK(!p || (p->sizes() == q.sizes() && p->is_contiguous() && p->scalar_type() == q.scalar_type()),
              "token_attention_forward: p must match q");
  const int64_t T = q.size(0), R = q.size(1) * q.size(2), d = q.size(3), Wd = (d + 63) / 64;
  auto out = at::empty_like(q);
  auto h = at::empty(save ? std::vector<int64_t>{T, q.size(1), q.size(2)} : std::vector<int64_t>{0},
                     q.options().dtype(at::kFloat));
  auto k_words = at::empty({T * R, Wd}, q.options().dtype(at::kLong));  // filled by the kernel, kept if save
  const LifConsts c{static_cast<float>(tau), static_cast<float>(v_threshold), 0.0f};
  std::atomic<bool> bad_any{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "token_attention_forward", [&] {
    const scalar_t* qp = q.const_data_ptr<scalar_t>();
    const scalar_t* kp = k.const_data_ptr<scalar_t>();
    const scalar_t* pp = p ? p->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    float* hp = save ? h.mutable_data_ptr<float>() : nullptr;
    uint64_t* kw = reinterpret_cast<uint64_t*>(k_words.mutable_data_ptr<int64_t>());
    at::parallel_for(0, (R + kTokens - 1) / kTokens, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> qb, kb, pb, ob, vmem(kTokens);
      bool bad = false;
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        const int64_t r0 = chunk * kTokens, rows = std::min(kTokens, R - r0);
        std::fill(vmem.begin(), vmem.end(), 0.0f);
        for (int64_t t = 0; t < T; ++t) {
          const int64_t row0 = t * R + r0, off = row0 * d, count = rows * d;
          float* o = rows_out(op + off, count, ob);
          bad |= token_rows_forward(rows_as_float(qp + off, count, qb), pp ? rows_as_float(pp + off, count, pb) : nullptr,
                                    rows_as_float(kp + off, count, kb), rows, d, c, vmem.data(),
                                    hp ? hp + row0 : nullptr, kw + row0 * Wd, o);
          store_rows(op + off, o, count);
        }
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
  const int64_t R = BH * N, Wd = (d + 63) / 64;
  TORCH_CHECK(k_words.dim() == 2 && k_words.size(0) == T * R && k_words.size(1) == Wd && k_words.is_contiguous() &&
                  k_words.scalar_type() == at::kLong,
              "token_attention_backward: k_words must be contiguous int64 [T*BH*N, ceil(d/64)]");
  TORCH_CHECK(h.dim() == 3 && h.size(0) == T && h.size(1) == BH && h.size(2) == N && h.scalar_type() == at::kFloat &&
                  h.is_contiguous(),
              "token_attention_backward: h must be contiguous fp32 [T, BH, N]");
  auto grad_s = at::empty({T, BH, N}, h.options());
  auto grad_k = at::empty_like(grad_out);
  const LifConsts c{static_cast<float>(tau), static_cast<float>(v_threshold), 0.0f};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "token_attention_backward", [&] {
    const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
    const uint64_t* kw = reinterpret_cast<const uint64_t*>(k_words.const_data_ptr<int64_t>());
    const float* hp = h.const_data_ptr<float>();
    float* gsp = grad_s.mutable_data_ptr<float>();
    scalar_t* gkp = grad_k.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, (R + kTokens - 1) / kTokens, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> gb, gkb, gv(kTokens);
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        const int64_t r0 = chunk * kTokens, rows = std::min(kTokens, R - r0);
        std::fill(gv.begin(), gv.end(), 0.0f);
        for (int64_t t = T - 1; t >= 0; --t) {
          const int64_t row0 = t * R + r0, off = row0 * d, count = rows * d;
          float* gk = rows_out(gkp + off, count, gkb);
          token_rows_backward(rows_as_float(gp + off, count, gb), kw + row0 * Wd, hp + row0, rows, d, c, gv.data(),
                              gsp + row0, gk);
          store_rows(gkp + off, gk, count);
        }
      }
    });
  });
  return {grad_s, grad_k};
}

}  // namespace cpu
}  // namespace spikeops
