// Token attention (QKFormer) / MSSA (MSViT) on the CPU (semantics: spikeops/reference.py,
// token_attention). For q, k (and p) spikes [T, BH, N, d]:
//   S[t, bh, n] = sum_c q[t, bh, n, c] (+ sum_c p[t, bh, n, c])        exact integer counts
//   A = LIF(S) over t  (decay_input, hard reset 0, detach_reset, sigmoid surrogate)
//   out[t, bh, n, c] = A[t, bh, n] * k[t, bh, n, c]
// Backward, walking t = T-1 .. 0 per token with the neuron's H saved by forward:
//   dA = sum_c dout * k;  dS = LIF backward(dA);  dk = A * dout;  dq = dp = dS (broadcast over c).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <optional>

#include "../ops.h"
#include "lif_math.h"

namespace spikeops {
namespace cpu {

std::tuple<at::Tensor, at::Tensor, bool> token_attention_forward(
    const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& p, double v_threshold,
    double tau, bool save_h) {
  TORCH_CHECK(q.dim() == 4 && q.is_contiguous() && k.sizes() == q.sizes() && k.is_contiguous() &&
                  k.scalar_type() == q.scalar_type(),
              "token_attention_forward: q, k must be contiguous [T, BH, N, d] of one dtype");
  TORCH_CHECK(!p || (p->sizes() == q.sizes() && p->is_contiguous() && p->scalar_type() == q.scalar_type()),
              "token_attention_forward: p must match q");
  const int64_t T = q.size(0), BH = q.size(1), N = q.size(2), d = q.size(3);
  auto out = at::empty_like(q);
  auto h = at::empty(save_h ? std::vector<int64_t>{T, BH, N} : std::vector<int64_t>{0}, q.options().dtype(at::kFloat));
  const LifConsts c{static_cast<float>(tau), static_cast<float>(v_threshold), 0.0f};
  std::atomic<bool> bad_any{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "token_attention_forward", [&] {
    const scalar_t* qp = q.const_data_ptr<scalar_t>();
    const scalar_t* kp = k.const_data_ptr<scalar_t>();
    const scalar_t* pp = p ? p->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    float* hp = save_h ? h.mutable_data_ptr<float>() : nullptr;
    at::parallel_for(0, BH * N, 64, [&](int64_t begin, int64_t end) {
      bool bad = false;
      for (int64_t token = begin; token < end; ++token) {  // token = bh * N + n
        const int64_t bh = token / N, n = token % N;
        float v = 0.0f;
        for (int64_t t = 0; t < T; ++t) {
          const int64_t row = ((t * BH + bh) * N + n) * d;
          float s = 0.0f;
          for (int64_t j = 0; j < d; ++j) {
            const float x = static_cast<float>(qp[row + j]), kx = static_cast<float>(kp[row + j]);
            bad |= ((x != 0.0f) & (x != 1.0f)) | ((kx != 0.0f) & (kx != 1.0f));
            s += x;
          }
          if (pp) {
            float sp = 0.0f;
            for (int64_t j = 0; j < d; ++j) {
              const float x = static_cast<float>(pp[row + j]);
              bad |= (x != 0.0f) & (x != 1.0f);
              sp += x;
            }
            s += sp;
          }
          const float hv = lif_charge<true>(v, s, c);
          const bool fire = lif_fire(hv, c);
          v = lif_reset<true>(hv, fire, c);
          if (hp) hp[(t * BH + bh) * N + n] = hv;
          for (int64_t j = 0; j < d; ++j) op[row + j] = fire ? kp[row + j] : static_cast<scalar_t>(0.0f);
        }
      }
      if (bad) bad_any.store(true, std::memory_order_relaxed);
    });
  });
  return {out, h, !bad_any.load()};
}

std::tuple<at::Tensor, at::Tensor> token_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& k, const at::Tensor& h, double v_threshold, double tau) {
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.is_contiguous() && k.sizes() == grad_out.sizes() && k.is_contiguous() &&
                  k.scalar_type() == grad_out.scalar_type(),
              "token_attention_backward: grad_out and k must be contiguous [T, BH, N, d] of one dtype");
  const int64_t T = grad_out.size(0), BH = grad_out.size(1), N = grad_out.size(2), d = grad_out.size(3);
  TORCH_CHECK(h.dim() == 3 && h.size(0) == T && h.size(1) == BH && h.size(2) == N && h.scalar_type() == at::kFloat &&
                  h.is_contiguous(),
              "token_attention_backward: h must be contiguous fp32 [T, BH, N]");
  auto grad_s = at::empty({T, BH, N}, h.options());
  auto grad_k = at::empty_like(grad_out);
  const LifConsts c{static_cast<float>(tau), static_cast<float>(v_threshold), 0.0f};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "token_attention_backward", [&] {
    const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* kp = k.const_data_ptr<scalar_t>();
    const float* hp = h.const_data_ptr<float>();
    float* gsp = grad_s.mutable_data_ptr<float>();
    scalar_t* gkp = grad_k.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, BH * N, 64, [&](int64_t begin, int64_t end) {
      for (int64_t token = begin; token < end; ++token) {
        const int64_t bh = token / N, n = token % N;
        float gv = 0.0f;
        for (int64_t t = T - 1; t >= 0; --t) {
          const int64_t row = ((t * BH + bh) * N + n) * d, idx = (t * BH + bh) * N + n;
          const float hv = hp[idx];
          const bool fire = lif_fire(hv, c);
          float ga = 0.0f;
          for (int64_t j = 0; j < d; ++j) {
            const float g = static_cast<float>(gp[row + j]);
            ga += g * static_cast<float>(kp[row + j]);
            gkp[row + j] = static_cast<scalar_t>(fire ? g : 0.0f);
          }
          const float d = lif_distance(hv, c);
          gsp[idx] = lif_grad_step<true, true>(d, surrogate_grad<kSigmoid>(d, 4.0f), ga, gv, c, true);
        }
      }
    });
  });
  return {grad_s, grad_k};
}

}  // namespace cpu
}  // namespace spikeops
