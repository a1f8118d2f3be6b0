"""``linear_batch_norm``: Linear followed by BatchNorm1d that keeps almost nothing for backward.

``z = BN(x W^T + b)`` on ``[*, C_in]`` with BatchNorm statistics over every leading position
(Spikformer's ``BN(Linear(x))`` on ``[T, B, N, C]``). Unfused, autograd keeps the Linear's input
*and* the BatchNorm's fp32 input ``y = x W^T + b``. Here the Linear's input is kept compactly
(:func:`spikeops.ops.compact.compact`: 1 bit per spike, a byte per small integer) and ``y`` is
recomputed from it in backward with the same kernel, so the gradients are those of the unfused
layers while ``y`` (4 bytes per output element) is never stored. The cost is one extra matmul in
backward. Running statistics are updated exactly as ``nn.BatchNorm1d`` updates them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from spikeops.ops.compact import compact, restore


class _LinearBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps):
        y = F.linear(x, weight, bias)
        out, save_mean, save_invstd = torch.ops.aten.native_batch_norm(
            y.reshape(-1, y.shape[-1]), bn_weight, bn_bias, running_mean, running_var, training, momentum, eps)
        saved_x, ctx.meta = compact(x, -1)
        ctx.save_for_backward(saved_x, weight, bias, bn_weight, running_mean, running_var, save_mean, save_invstd)
        ctx.training, ctx.eps, ctx.x_shape = training, eps, x.shape
        return out.view(y.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        saved_x, weight, bias, bn_weight, running_mean, running_var, save_mean, save_invstd = ctx.saved_tensors
        x2d = restore(saved_x, ctx.meta).reshape(-1, weight.shape[1])
        y = F.linear(x2d, weight, bias)  # the forward's BatchNorm input, recomputed
        needs = ctx.needs_input_grad
        grad_y, grad_bn_w, grad_bn_b = torch.ops.aten.native_batch_norm_backward(
            grad.reshape(-1, grad.shape[-1]), y, bn_weight, running_mean, running_var, save_mean, save_invstd,
            ctx.training, ctx.eps, [needs[0] or needs[1] or needs[2], needs[3], needs[4]])
        grad_x = grad_y.mm(weight).view(ctx.x_shape) if needs[0] else None
        grad_w = grad_y.t().mm(x2d) if needs[1] else None
        grad_b = grad_y.sum(0) if bias is not None and needs[2] else None
        return grad_x, grad_w, grad_b, grad_bn_w, grad_bn_b, None, None, None, None, None


def linear_batch_norm(x: torch.Tensor, linear: nn.Linear, bn: nn.BatchNorm1d) -> torch.Tensor:
    """``bn(linear(x))`` on ``[*, C_in]`` -> ``[*, C_out]`` (BN over all leading positions), keeping
    only a compact copy of ``x`` for backward. Same outputs, running-stat updates and gradients as
    the two modules called in turn (which is what runs without grad or under autocast)."""
    if not (torch.is_grad_enabled() and (x.requires_grad or linear.weight.requires_grad)) or \
            torch.is_autocast_enabled(x.device.type):
        y = linear(x)
        return bn(y.reshape(-1, y.shape[-1])).view(y.shape)
    # nn.BatchNorm's bookkeeping (momentum=None: cumulative average)
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    training = bn.training or bn.running_mean is None
    return _compiler_disabled_apply(x, linear.weight, linear.bias, bn.weight, bn.bias,
                                    bn.running_mean if not bn.training or bn.track_running_stats else None,
                                    bn.running_var if not bn.training or bn.track_running_stats else None,
                                    training, factor, bn.eps)


@torch.compiler.disable(reason="spikeops: the saved form of the input depends on its values")
def _compiler_disabled_apply(*args):
    return _LinearBatchNorm.apply(*args)
