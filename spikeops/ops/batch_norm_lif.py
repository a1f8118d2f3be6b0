r"""BatchNorm followed by a LIF neuron that keeps one float per neuron for backward: ``batch_norm_lif``.

``S = LIF(BN(Y))`` where ``Y`` is ``[T*B, C, ...]`` (BatchNorm over every position but the channel
dim 1, statistics shared across time steps) or ``[T*B*N, C]``; the LIF runs over the leading T.

Unfused, autograd keeps BatchNorm's input ``Y`` (fp32) *and* the neuron's membrane state
``H`` (fp32): 8 bytes per neuron per step. Here only ``Y`` is kept. Backward recomputes
``Z = BN(Y)`` with the same kernel (cuDNN's where ``nn.BatchNorm`` would use it, else ATen's) and
the same batch statistics (bit-identical to the forward's ``Z``), reruns the LIF forward steps on
it for ``H`` alone, and then runs the LIF and BatchNorm backward kernels, so the gradients are
those of the two layers called in turn. The LIF part is ``lif_backward_from_input``: on the C++
backend one kernel (``H`` recomputed a chunk of neurons at a time, never written), on Triton its
state kernel, then its backward kernel. The extra work is one BatchNorm forward and one LIF forward
pass: no matmul or conv.

Running statistics are updated exactly as ``nn.BatchNorm*d`` updates them (momentum, or the
cumulative average for ``momentum=None``).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from spikeops import backend as _backend
from spikeops._validation import check_float_tensor
from spikeops.ops.known_counts import mark_counts
from spikeops.ops.lif import SURROGATE_IDS, _lif_backward_from_input, _lif_forward

FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class _BatchNormLIF(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, weight, bias, running_mean, running_var, training, momentum, eps, T, lif_args, backend):
        z = _batch_norm(y, weight, bias, running_mean, running_var, training, momentum, eps)[0]
        spikes, _ = _lif_forward(z.view(T, -1), *lif_args, False, False, backend)
        stats = (None, None) if training else (running_mean.clone(), running_var.clone())
        ctx.save_for_backward(y, weight, bias, *stats)
        ctx.training, ctx.eps, ctx.T, ctx.lif_args, ctx.backend = training, eps, T, lif_args, backend
        return spikes.view(y.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_spikes):
        y, weight, bias, running_mean, running_var = ctx.saved_tensors
        # the forward's BN output, bit for bit: same kernel, same input, same statistics source
        # (momentum 0: the running statistics are not updated twice)
        z, mean, invstd, reserve, impl = _batch_norm(y, weight, bias, running_mean, running_var, ctx.training, 0.0,
                                                     ctx.eps)
        args = ctx.lif_args
        grad_spikes = grad_spikes.contiguous().view(ctx.T, -1)
        # H, recomputed from Z (C++: inside the backward kernel, a chunk of neurons at a time); Z is
        # dropped as soon as it is used (a tensor the size of y, alive at this layer's peak otherwise)
        grad_z = _lif_backward_from_input(grad_spikes, z.view(ctx.T, -1), *args, ctx.backend).view(y.shape)
        del z
        needs = ctx.needs_input_grad
        mask = [needs[0], needs[1], needs[2]]
        if ctx.training:  # cuDNN's backward where cuDNN ran the forward, as autograd does for nn.BatchNorm
            grads = torch.ops.aten._batch_norm_impl_index_backward(impl, y, grad_z, weight, running_mean, running_var,
                                                                    mean, invstd, True, ctx.eps, mask, reserve)
        else:  # frozen statistics: autograd uses the native backward for every implementation
            grads = torch.ops.aten.native_batch_norm_backward(grad_z, y, weight, running_mean, running_var, mean,
                                                              invstd, False, ctx.eps, mask)
        return *grads, None, None, None, None, None, None, None, None


def _batch_norm(y, weight, bias, running_mean, running_var, training, momentum, eps):
    """(z, save_mean, save_invstd, reserve, impl): the BatchNorm forward ``F.batch_norm`` runs,
    cuDNN's where cuDNN takes the input (CUDA, fp32/fp16, 3+ dims) and is enabled, else ATen's."""
    return torch.ops.aten._batch_norm_impl_index(y, weight, bias, running_mean, running_var, training, momentum, eps,
                                                 torch.backends.cudnn.enabled)


def batch_norm_lif(y: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm, lif: nn.Module, T: int) -> torch.Tensor:
    """``lif(bn(y).view(T, ...)).view(y.shape)`` keeping only ``y`` for backward (see module doc).

    Args:
        y: ``[T*B, C, ...]`` or ``[T*B*N, C]`` (time-major: the first T-th of the rows is t = 0).
        bn: the ``nn.BatchNorm1d``/``2d`` whose parameters and running statistics are used/updated.
        lif: a :class:`spikeops.nn.LIF` (its settings; fp32 state only); any other neuron module
            (e.g. SpikingJelly's LIFNode) is called as is.
        T: time steps.

    Returns spikes shaped like ``y`` in its dtype. ``y`` may be fp16/bf16 (e.g. a Linear's output
    under autocast): BatchNorm then computes as nn.BatchNorm does on such input (fp32 statistics
    and parameters, output in y's dtype) and only the half-precision ``y`` is kept. Falls back to
    the two modules called in turn when the fused path does not apply (no grad needed, the "torch"
    backend, float64, bf16 state, or a BatchNorm subclass such as
    :class:`spikeops.nn.MaskedBatchNorm2d` whose forward differs).
    Under ``torch.compile`` it is always ``lif(bn(y))`` (no graph break, same results, but the
    standard memory: autograd keeps the BN input and the neuron's state).
    """
    check_float_tensor("y", y)
    if isinstance(T, bool) or not isinstance(T, (int, torch.SymInt)):
        raise TypeError(f"batch_norm_lif: T must be an int (time steps), got {type(T).__name__}")
    if T < 1 or y.dim() < 2 or y.shape[0] % T:
        raise ValueError(f"batch_norm_lif: y must be [T*B, C, ...] with T={T} dividing its first dim, got {tuple(y.shape)}")
    if y.numel() == 0:
        raise ValueError(f"batch_norm_lif: y is empty (shape {tuple(y.shape)}); every dimension must be >= 1")
    if isinstance(bn, nn.modules.batchnorm._BatchNorm) and y.shape[1] != bn.num_features:
        # checked here: the fused path calls aten's kernel directly, which does not check it
        raise ValueError(f"batch_norm_lif: y has C={y.shape[1]} channels (dim 1) but bn has "
                         f"num_features={bn.num_features}")
    from spikeops.nn.lif import LIF  # the module holds the neuron's settings

    needs_grad = torch.is_grad_enabled() and (y.requires_grad or (bn.weight is not None and bn.weight.requires_grad))
    chosen = _backend.resolve(y, lif.backend) if isinstance(lif, LIF) else "torch"  # e.g. a SpikingJelly LIFNode
    plain_bn = type(bn) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)  # e.g. not MaskedBatchNorm2d
    if not needs_grad or not plain_bn or chosen == "torch" or torch.compiler.is_compiling() or \
            lif.state_dtype != torch.float32 or y.dtype not in FUSED_DTYPES or not y.is_contiguous():
        z = bn(y)
        return lif(z.view(T, z.shape[0] // T, *z.shape[1:])).view(z.shape)
    factor = 0.0 if bn.momentum is None else bn.momentum  # nn.BatchNorm's bookkeeping
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    training = bn.training or bn.running_mean is None
    use_stats = not bn.training or bn.track_running_stats
    lif_args = (lif.tau, lif.v_threshold, 0.0 if lif.v_reset is None else lif.v_reset, lif.v_reset is not None,
                lif.decay_input, lif.detach_reset, SURROGATE_IDS[lif.surrogate], lif.alpha)
    stats = (bn.running_mean, bn.running_var) if use_stats else (None, None)
    spikes = _compiler_disabled_apply(y, bn.weight, bn.bias, *stats, training, factor, bn.eps, T, lif_args, chosen)
    return mark_counts(spikes)


@torch.compiler.disable(reason="spikeops: fused BatchNorm+LIF autograd function")
def _compiler_disabled_apply(*args):
    return _BatchNormLIF.apply(*args)
