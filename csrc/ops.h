// Declarations of the CPU kernels exported by spikeops._C (bound in csrc/module.cpp).
#pragma once
#include <ATen/core/Tensor.h>
#include <optional>
#include <tuple>

namespace spikeops {
namespace cpu {

// Surrogate-gradient ids shared with spikeops/ops/lif.py (SURROGATE_IDS).
enum Surrogate : int64_t { kSigmoid = 0, kATan = 1 };

// x: [T, N] contiguous fp32/fp16/bf16. Returns (spikes [T, N] in x's dtype, the state for
// backward [T, N] when save_h else an empty tensor): H in fp32, or with state_bf16 the
// distance H - v_threshold rounded to bf16 (-0 normalised to +0, so its sign bit is the spike).
std::tuple<at::Tensor, at::Tensor> lif_forward(
    const at::Tensor& x, double tau, double v_threshold, double v_reset,
    bool hard_reset, bool decay_input, bool save_h, bool state_bf16);

// grad_spikes: [T, N] (any float dtype), h: [T, N] state from lif_forward (fp32 or bf16).
// Returns grad_x [T, N] in grad_spikes' dtype.
at::Tensor lif_backward(
    const at::Tensor& grad_spikes, const at::Tensor& h, double tau, double v_threshold,
    double v_reset, bool hard_reset, bool decay_input, bool detach_reset,
    int64_t surrogate, double alpha);
// lif_backward(grad_spikes, H, ...) with H the fp32 state lif_forward(x) saves, recomputed per chunk
// of neurons from the forward's input x [T, N] (same values, same gradients) and never written out:
// for backward passes that keep x instead of H (batch_norm_lif).
at::Tensor lif_backward_from_input(
    const at::Tensor& grad_spikes, const at::Tensor& x, double tau, double v_threshold,
    double v_reset, bool hard_reset, bool decay_input, bool detach_reset,
    int64_t surrogate, double alpha);
// lif_backward_from_input(grad_spikes, Z, ...) with Z = BatchNorm(y) in training mode recomputed per
// chunk of neurons from the BatchNorm input y [T, M] (fp32 or bf16, grad_spikes' dtype) and the
// forward's batch statistics mean, invstd [C] (fp32), with weight and bias [C] (fp32): element i of
// a row is channel (i / inner) % C. Z is computed as ATen's CPU BatchNorm computes it (alpha =
// invstd * weight, beta = fma(-mean, alpha, bias), Z = fma(y, alpha, beta) rounded to y's dtype);
// the caller checks once that this equals ATen's output bit for bit (spikeops/ops/batch_norm_lif.py).
at::Tensor lif_backward_from_bn_input(
    const at::Tensor& grad_spikes, const at::Tensor& y, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& weight, const at::Tensor& bias, int64_t inner, double tau, double v_threshold,
    double v_reset, bool hard_reset, bool decay_input, bool detach_reset, int64_t surrogate, double alpha);
// The forward on BatchNorm's output computed from its input y [T, M] as above (training-mode batch
// statistics mean, invstd): the spikes [T, M] in y's dtype, no state; Z is never written.
at::Tensor lif_forward_from_bn_input(
    const at::Tensor& y, const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& weight,
    const at::Tensor& bias, int64_t inner, double tau, double v_threshold, double v_reset, bool hard_reset,
    bool decay_input);

// The backward of LIF(BatchNorm(y)) in training mode through both layers: lif_backward_from_bn_input's
// dL/dZ, with BatchNorm's channel sums taken from it chunk by chunk, then BatchNorm's backward
// (csrc/cpu/batch_norm.h: ATen's formula, other sums) -> (dL/dy [T, M] in y's dtype, dL/dweight,
// dL/dbias [C] fp32, undefined unless grad_affine).
std::tuple<at::Tensor, at::Tensor, at::Tensor> lif_backward_through_bn(
    const at::Tensor& grad_spikes, const at::Tensor& y, const at::Tensor& mean, const at::Tensor& invstd,
    const at::Tensor& weight, const at::Tensor& bias, int64_t inner, bool grad_affine, double tau,
    double v_threshold, double v_reset, bool hard_reset, bool decay_input, bool detach_reset, int64_t surrogate,
    double alpha);

// x: [R, n] contiguous 0./1. floats -> (int64 words [R, ceil(n/64)], all values were 0 or 1).
// Bit j of word w holds x[r, 64w + j]; padding bits are 0. The check is skipped when !check.
std::tuple<at::Tensor, bool> pack_spikes(const at::Tensor& x, bool check);

// words: [R, W] contiguous int64 -> [R, n] 0./1. of dtype.
at::Tensor unpack_spikes(const at::Tensor& words, int64_t n, at::ScalarType dtype);

// x [any shape] contiguous fp32/fp16/bf16 -> (uint8 copy, whether every value is an integer in
// [0, 255]): the uint8 form compact() keeps of small counts (compact.cpp).
std::tuple<at::Tensor, bool> to_counts(const at::Tensor& x);

// a_words [Bt, M, W], bt_words [Bt, N, W]: 0/1 matrices packed along K -> int32 [Bt, M, N] = A @ B.
at::Tensor spike_matmul_packed(const at::Tensor& a_words, const at::Tensor& bt_words);

// Fused SSA forward: q, k, v [T, BH, N, d] contiguous 0/1 -> (spikes [T, BH, N, d] = LIF(scale * Q K^T V),
// q, k, v packed along d [T, BH, N, ceil(d/64)] when save_packed (else empty), all inputs were 0/1).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, bool> ssa_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
    double v_threshold, double tau, bool save_packed);

// Fused SSA backward: grad [T, BH, N, d] contiguous (any float dtype), q, k, v words from ssa_forward
// -> (dq, dk, dv) [T, BH, N, d] in grad's dtype, computed in fp32 and rounded once (the attention
// neuron: sigmoid surrogate alpha 4, detach_reset).
std::tuple<at::Tensor, at::Tensor, at::Tensor> ssa_backward(
    const at::Tensor& grad, const at::Tensor& q_words, const at::Tensor& k_words, const at::Tensor& v_words,
    double scale, double v_threshold, double tau);

// Token attention: q, k (, p) [T, BH, N, d] contiguous 0/1 -> (out = LIF(sum_c q (+ sum_c p)) * k,
// the attention neuron's H [T, BH, N] fp32 and k packed along d [T*BH*N, ceil(d/64)] int64 when
// save (else empty), all inputs were 0/1).
std::tuple<at::Tensor, at::Tensor, at::Tensor, bool> token_attention_forward(
    const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& p, double v_threshold,
    double tau, bool save);

// grad_out [T, BH, N, d], k_words, h from forward -> (dL/dS [T, BH, N] fp32 (= dL/dq = dL/dp
// broadcast over d), dL/dk [T, BH, N, d]).
std::tuple<at::Tensor, at::Tensor> token_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& k_words, const at::Tensor& h, double v_threshold, double tau);

// The same in the channels-first layout: q, k (, p) [T, BH, d, N] contiguous (any float dtype) -> (out
// [T, BH, d, N], H [T, BH, N] fp32 and k packed along N [T*BH*d, ceil(N/64)] int64 when save,
// all inputs were 0/1); backward: grad_out [T, BH, d, N] -> (dL/dS [T, BH, N], dL/dk [T, BH, d, N]).
std::tuple<at::Tensor, at::Tensor, at::Tensor, bool> token_attention_cf_forward(
    const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& p, double v_threshold,
    double tau, bool save);
std::tuple<at::Tensor, at::Tensor> token_attention_cf_backward(
    const at::Tensor& grad_out, const at::Tensor& k_words, const at::Tensor& h, double v_threshold, double tau);

// csrc/cpu/max_pool.cpp: max pooling of [N, C, H, W], contiguous or channels-last (dilation 1, floor
// output size); the backward finds the argmax itself (ATen's tie-break), for gradients equal to
// max_pool2d_with_indices_backward's.
at::Tensor max_pool2d_forward(const at::Tensor& x, int64_t kH, int64_t kW, int64_t sH, int64_t sW, int64_t pH,
                              int64_t pW);
at::Tensor max_pool2d_backward(const at::Tensor& grad_out, const at::Tensor& x, int64_t kH, int64_t kW, int64_t sH,
                               int64_t sW, int64_t pH, int64_t pW);
// The backward for 0/1 input given as words: int64, the N C H W input's bits in flat order.
at::Tensor max_pool2d_backward_bits(const at::Tensor& grad_out, const at::Tensor& words, int64_t H, int64_t W,
                                    int64_t kH, int64_t kW, int64_t sH, int64_t sW, int64_t pH, int64_t pW);

// Masked (block-sparse) convolution, csrc/cpu/masked_conv.cpp. blocks: contiguous int32 [nb, 3]
// (n, by, bx) of the visible bh x bw blocks, in torch.nonzero order.
// x [N, C, H, W] contiguous -> the visible blocks [nb, C, bh, bw], channels last (= pixel-major
// [P, C], pixel p = (b * bh + py) * bw + px).
at::Tensor masked_gather(const at::Tensor& x, const at::Tensor& blocks, int64_t bh, int64_t bw);
// src [nb, C, bh, bw] channels last -> [N, C, H, W]: the blocks at their places, exactly 0 elsewhere.
at::Tensor masked_scatter(const at::Tensor& src, const at::Tensor& blocks, int64_t N, int64_t H, int64_t W);
// conv2d(x, weight, bias, stride, padding) at the visible blocks of the [N, C_out, Ho, Wo] output, 0 elsewhere.
at::Tensor masked_conv2d_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 const at::Tensor& blocks, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t bh,
                                 int64_t bw, int64_t Ho, int64_t Wo);
// -> (dx [N, C, H, W], dW, db); each an empty tensor when not needed (x may be empty when !need_w).
std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_conv2d_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& blocks, int64_t sh,
    int64_t sw, int64_t ph, int64_t pw, int64_t bh, int64_t bw, int64_t H, int64_t W, bool need_x, bool need_w,
    bool need_b);

}  // namespace cpu
}  // namespace spikeops
