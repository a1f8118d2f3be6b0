r"""BatchNorm followed by a LIF neuron that keeps one float per neuron for backward: ``batch_norm_lif``.

``S = LIF(BN(Y))`` where ``Y`` is ``[T*B, C, ...]`` (BatchNorm over every position but the channel
dim 1, statistics shared across time steps) or ``[T*B*N, C]``; the LIF runs over the leading T.

Unfused, autograd keeps BatchNorm's input ``Y`` (fp32) *and* the neuron's membrane state ``H``
(fp32): 8 bytes per neuron per step. Here only ``Y`` is kept. Backward recomputes ``Z = BN(Y)`` with
the same kernel (cuDNN's where ``nn.BatchNorm`` would use it, else ATen's) and the same batch
statistics (bit-identical to the forward's ``Z``), reruns the LIF forward steps on it for ``H``
alone, and then runs the LIF and BatchNorm backward kernels, so the gradients are those of the two
layers called in turn (but see the C++ training path below). The LIF part is
``lif_backward_from_input``: on the C++ backend one kernel (``H`` recomputed a chunk of neurons at a
time, never written), on Triton its state kernel, then its backward kernel. The extra work is one
BatchNorm forward and one LIF forward pass: no matmul or conv. On the C++ backend in training mode
not even the BatchNorm forward: ``lif_backward_from_bn_input`` computes ``Z`` from ``Y`` and the
forward's batch statistics inside the LIF kernel, with ATen's formula (two FMAs, checked bit for bit
against ATen once per dtype). There one C++ call (``lif_backward_through_bn``) also does BatchNorm's
backward: it sums dL/dZ and dL/dZ (Y - mean) per channel while each chunk of dL/dZ is in cache, then
computes dL/dY with ATen's formula from those sums, reading Y and dL/dZ once more where ATen's
backward reads them twice (one layer's forward+backward: 0.81-0.99x the time, BENCHMARKS.md stop
24). Its sums are fp32 lanes and fp64 totals, not ATen's: dL/dY, dL/dweight and dL/dbias equal those
of the two layers called in turn up to rounding (tests: within twice ATen's own error of the float64
result); everywhere else bit for bit.

The C++ training forward (fp32 running statistics) does not write ``Z`` either: ATen's
``batch_norm_update_stats`` computes the batch statistics and updates the running ones with the
kernel its BatchNorm uses, without BatchNorm's output pass, and ``lif_forward_from_bn_input``
computes ``Z`` from ``Y`` inside the LIF kernel as the backward does (statistics, running
statistics and spikes checked bit for bit against ATen's BatchNorm once per dtype).

On CPU, channels-last ``Y`` ``[T*B, C, H, W]`` runs fused as its ``[T*B*H*W, C]`` view (ATen's
BatchNorm computes the same on both) and the spikes come back channels-last.

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
        if training and _stats_in_kernel(y, weight, running_mean, running_var, eps, backend):
            # C++: ATen's statistics without its output pass; the LIF kernel computes Z from y
            mean, invstd = _batch_stats(y, running_mean, running_var, momentum, eps)
            spikes = _lif_forward_from_bn_input(y.view(T, -1), mean, invstd, weight, bias, y[0, 0].numel(), lif_args)
            ctx.bn_stats = (mean, invstd)
        else:
            z, mean, invstd, reserve, impl = _batch_norm(y, weight, bias, running_mean, running_var, training,
                                                         momentum, eps)
            spikes, _ = _lif_forward(z.view(T, -1), *lif_args, False, False, backend)
            # C++, training: backward computes Z from y and these statistics inside its LIF kernel, and
            # BatchNorm's backward after it (lif_backward_through_bn)
            ctx.bn_stats = (mean, invstd) if training and _affine_in_kernel(y, mean, impl, backend) else None
        stats = (None, None) if training else (running_mean.clone(), running_var.clone())
        ctx.save_for_backward(y, weight, bias, *stats)
        ctx.training, ctx.eps, ctx.T, ctx.lif_args, ctx.backend = training, eps, T, lif_args, backend
        # batch statistics do not read the running ones, but whether they are given (and their dtype)
        # picks ATen's kernel: e.g. fp32 running stats with bf16 y and no weight give fp32 statistics,
        # none give bf16 ones and another Z
        ctx.running_like = None if not training or running_mean is None else \
            dict(size=running_mean.shape, dtype=running_mean.dtype, device=running_mean.device)
        return spikes.view(y.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_spikes):
        y, weight, bias, running_mean, running_var = ctx.saved_tensors
        args = ctx.lif_args
        grad_spikes = grad_spikes.contiguous().view(ctx.T, -1)
        needs = ctx.needs_input_grad
        if ctx.bn_stats is not None:
            # one C++ call through both layers: BatchNorm's backward from sums taken while dL/dZ is in cache
            mean, invstd = ctx.bn_stats
            affine = weight is not None and (needs[1] or needs[2])
            dy, dw, db = _lif_backward_through_bn(grad_spikes, y, mean, invstd, weight, bias, affine, *args)
            return (dy.view(y.shape) if needs[0] else None, dw if affine and needs[1] else None,
                    db if affine and needs[2] else None, None, None, None, None, None, None, None, None)
        # the forward's BN output, bit for bit: same kernel, same input, same statistics source
        # (training: stand-in running statistics of the forward's dtype and device, momentum 0)
        if ctx.running_like is not None:
            running_mean, running_var = torch.zeros(**ctx.running_like), torch.ones(**ctx.running_like)
        z, mean, invstd, reserve, impl = _batch_norm(y, weight, bias, running_mean, running_var, ctx.training,
                                                     0.0, ctx.eps)
        # H, recomputed from Z (C++: inside the backward kernel, a chunk of neurons at a time); Z is
        # dropped as soon as it is used (a tensor the size of y, alive at this layer's peak otherwise)
        grad_z = _lif_backward_from_input(grad_spikes, z.view(ctx.T, -1), *args, ctx.backend).view(y.shape)
        del z
        mask = [needs[0], needs[1], needs[2]]
        if ctx.training:  # cuDNN's backward where cuDNN ran the forward, as autograd does for nn.BatchNorm
            grads = torch.ops.aten._batch_norm_impl_index_backward(impl, y, grad_z, weight, running_mean, running_var,
                                                                    mean, invstd, True, ctx.eps, mask, reserve)
        else:  # frozen statistics: autograd uses the native backward for every implementation
            grads = torch.ops.aten.native_batch_norm_backward(grad_z, y, weight, running_mean, running_var, mean,
                                                              invstd, False, ctx.eps, mask)
        return *grads, None, None, None, None, None, None, None, None


def _affine_args(weight, bias, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm's weight and bias as the kernels take them: fp32 [C], ones / zeros without affine."""
    return (torch.ones(channels) if weight is None else weight.detach().float(),
            torch.zeros(channels) if bias is None else bias.detach().float())


def _lif_backward_through_bn(grad_spikes, y, mean, invstd, weight, bias, affine: bool, *lif_args):
    """(dL/dy [T, M], dL/dweight, dL/dbias) of ``LIF(BN(y))`` in training mode from dL/dS ``grad_spikes``
    [T, M]: the C++ kernel of ``_lif_backward_from_bn_input``, which also sums dL/dZ and dL/dZ (y - mean)
    per channel a chunk of neurons at a time, then BatchNorm's backward from those sums (ATen's
    formula; its sums differ from ATen's in rounding only): y and dL/dZ are read once more, not twice."""
    weight, bias = _affine_args(weight, bias, y.shape[1])
    return _backend.kernel("lif", "lif_backward_through_bn", "cpp")(
        grad_spikes, y.view(grad_spikes.shape), mean, invstd, weight, bias, y[0, 0].numel(), affine, *lif_args)


def _lif_backward_from_bn_input(grad_spikes, y, mean, invstd, weight, bias, *lif_args):
    """``_lif_backward_from_input(grad_spikes, BN(y))`` for a training-mode ATen BatchNorm with batch
    statistics ``mean``, ``invstd``: the C++ kernel computes BN(y) itself, a chunk of neurons at a
    time, instead of a BatchNorm forward run again (its statistics, a tensor the size of y written
    and read). ``grad_spikes`` [T, M]; y [T*B, C, ...] or [T*B*N, C]."""
    weight, bias = _affine_args(weight, bias, y.shape[1])
    inner = y[0, 0].numel()  # positions per (row, channel): element i of a row is channel (i // inner) % C
    return _backend.kernel("lif", "lif_backward_from_bn_input", "cpp")(
        grad_spikes, y.view(grad_spikes.shape), mean, invstd, weight, bias, inner, *lif_args)


def _lif_forward_from_bn_input(y, mean, invstd, weight, bias, inner: int, lif_args):
    """Spikes [T, M] of ``LIF(BN(y))`` for y [T, M] and training-mode batch statistics: the C++
    kernel computes Z from y as the backward's does, a chunk of neurons at a time (Z never written)."""
    weight, bias = _affine_args(weight, bias, mean.numel())
    return _backend.kernel("lif", "lif_forward_from_bn_input", "cpp")(y, mean, invstd, weight, bias, inner,
                                                                      *lif_args[:5])


def _batch_stats(y, running_mean, running_var, momentum, eps):
    """(mean, invstd) [C] of training-mode ATen BatchNorm on ``y``, with the running statistics updated
    as it updates them: ``batch_norm_update_stats`` runs the same statistics kernel without the output
    pass; invstd is ``1 / sqrt(var + eps)`` in float64, rounded to fp32, as ATen computes it from
    that var (checked once per dtype, :func:`_stats_in_kernel`)."""
    mean, var = torch.ops.aten.batch_norm_update_stats(y, running_mean, running_var, momentum)
    return mean, (1.0 / (var.double() + eps).sqrt()).float()


_STATS_MATCH_ATEN: dict = {}


def _stats_in_kernel(y, weight, running_mean, running_var, eps, backend) -> bool:
    """Whether a training forward may skip ATen's BatchNorm output: the C++ backend with the kernel,
    fp32/bf16 ``y`` on CPU, fp32 running statistics and weight (ATen then computes fp32 batch
    statistics, as :func:`_batch_stats` does), ``eps > 0``, and on this torch the kernel's Z found
    equal to ATen's (:func:`_affine_in_kernel`) and :func:`_batch_stats` equal to ATen's statistics
    and running statistics (checked once per dtype, :func:`_kernel_forward_matches_aten`)."""
    if backend != "cpp" or y.device.type != "cpu" or y.dtype not in (torch.float32, torch.bfloat16) or eps <= 0 \
            or running_mean is None or running_var is None or running_mean.dtype != torch.float32 \
            or running_var.dtype != torch.float32 or (weight is not None and weight.dtype != torch.float32) \
            or not _backend.has_kernel("lif", "lif_forward_from_bn_input", "cpp"):
        return False
    if not _affine_in_kernel(y, running_mean, 0, backend):  # (the batch statistics are fp32 as the running ones)
        return False
    if y.dtype not in _STATS_MATCH_ATEN:
        _STATS_MATCH_ATEN[y.dtype] = _kernel_forward_matches_aten(y.dtype)
    return _STATS_MATCH_ATEN[y.dtype]


def _kernel_forward_matches_aten(dtype: torch.dtype) -> bool:
    """:func:`_batch_stats` and the forward kernel give ATen's statistics, running statistics and
    LIF(ATen's output), bit for bit, on ATen's CPU layouts ([N, C, L], [N, C] rows, [N, C, H, W])."""
    g = torch.Generator().manual_seed(1)
    lif_args = (2.0, 0.5, 0.0, True, True)
    for shape in ((6, 5, 37), (74, 19), (8, 6, 5, 3)):
        y = (torch.randn(shape, generator=g) * 3 + 0.5).to(dtype)
        weight, bias = torch.randn(shape[1], generator=g) + 1, torch.randn(shape[1], generator=g)
        running = torch.randn(shape[1], generator=g), torch.rand(shape[1], generator=g) + 0.5
        ours_running, aten_running = [r.clone() for r in running], [r.clone() for r in running]
        with torch.no_grad():
            z, mean, invstd, _, _ = _batch_norm(y, weight, bias, *aten_running, True, 0.1, 1e-5)
            mean2, invstd2 = _batch_stats(y, *ours_running, 0.1, 1e-5)
            expected, _ = _backend.kernel("lif", "lif_forward", "cpp")(z.view(2, -1), *lif_args, False, False)
            spikes = _lif_forward_from_bn_input(y.view(2, -1), mean2, invstd2, weight, bias, y[0, 0].numel(),
                                                lif_args)
        if not (torch.equal(mean, mean2) and torch.equal(invstd, invstd2) and torch.equal(spikes, expected)
                and all(torch.equal(a, b) for a, b in zip(aten_running, ours_running))):
            return False
    return True


_AFFINE_MATCHES_ATEN: dict = {}


def _affine_in_kernel(y, mean, impl, backend) -> bool:
    """Whether backward may compute BN(y) inside the C++ LIF kernel: a C++ backend that has it, an
    fp32/bf16 ``y`` with fp32 statistics from ATen's native BatchNorm (``impl`` 0), and this
    torch's BatchNorm found to compute what the kernel computes, bit for bit (checked once per
    dtype: ATen's formula, two FMAs, is how its CPU kernels are compiled, not a documented contract;
    where it differs the backward runs the BatchNorm forward again, as on the other backends)."""
    if backend != "cpp" or impl != 0 or mean.dtype != torch.float32 or y.dtype not in (torch.float32, torch.bfloat16) \
            or not _backend.has_kernel("lif", "lif_backward_through_bn", "cpp"):
        return False
    if y.dtype not in _AFFINE_MATCHES_ATEN:
        _AFFINE_MATCHES_ATEN[y.dtype] = _kernel_affine_matches_aten(y.dtype)
    return _AFFINE_MATCHES_ATEN[y.dtype]


def _kernel_affine_matches_aten(dtype: torch.dtype) -> bool:
    """The kernel's gradients from y equal those from ATen's BN output, bit for bit, on both of
    ATen's CPU layouts (channels at dim 1 of [N, C, L], and [N, C] rows), every SIMD remainder."""
    g = torch.Generator().manual_seed(0)
    lif_args = (2.0, 0.5, 0.0, True, True, False, SURROGATE_IDS["sigmoid"], 4.0)
    for shape in ((6, 5, 37), (74, 19)):
        y = (torch.randn(shape, generator=g) * 3 + 0.5).to(dtype)
        weight, bias = torch.randn(shape[1], generator=g) + 1, torch.randn(shape[1], generator=g)
        grad = torch.randn(shape, generator=g).to(dtype).view(2, -1)
        with torch.no_grad():
            z, mean, invstd, _, _ = _batch_norm(y, weight, bias, None, None, True, 0.0, 1e-5)
        expected = _backend.kernel("lif", "lif_backward_from_input", "cpp")(grad, z.view(2, -1), *lif_args)
        if not torch.equal(_lif_backward_from_bn_input(grad, y, mean, invstd, weight, bias, *lif_args), expected):
            return False
    return True


def _batch_norm(y, weight, bias, running_mean, running_var, training, momentum, eps):
    """(z, save_mean, save_invstd, reserve, impl): the BatchNorm forward ``F.batch_norm`` runs,
    cuDNN's where cuDNN takes the input (CUDA, fp32/fp16, 3+ dims) and is enabled, else ATen's."""
    return torch.ops.aten._batch_norm_impl_index(y, weight, bias, running_mean, running_var, training, momentum, eps,
                                                 torch.backends.cudnn.enabled)


def batch_norm_lif(y: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm, lif: nn.Module, T: int) -> torch.Tensor:
    """``lif(bn(y).view(T, ...)).view(y.shape)`` keeping only ``y`` for backward (see module doc).

    Args:
        y: ``[T*B, C, ...]`` or ``[T*B*N, C]`` (time-major: the first T-th of the rows is t = 0),
            contiguous; on CPU also channels-last ``[T*B, C, H, W]`` (the spikes are returned
            channels-last too). Other layouts run the two modules in turn.
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
    rows = None if y.is_contiguous() else _channels_last_rows(y)
    laid_out = y.is_contiguous() or rows is not None
    if not needs_grad or not plain_bn or chosen == "torch" or torch.compiler.is_compiling() or \
            lif.state_dtype != torch.float32 or y.dtype not in FUSED_DTYPES or not laid_out:
        z = bn(y)
        return lif(z.view(T, z.shape[0] // T, *z.shape[1:])).view(z.shape)
    if rows is not None:  # [T*B*H*W, C] spikes -> y's shape and channels-last layout
        spikes = _fused_apply(rows, bn, lif, T, chosen)
        return mark_counts(spikes.view(y.shape[0], *y.shape[2:], y.shape[1]).movedim(-1, 1))
    return _fused_apply(y, bn, lif, T, chosen)


def _channels_last_rows(y: torch.Tensor):
    """The ``[T*B*H*W, C]`` view of a channels-last CPU ``y`` ``[T*B, C, H, W]`` (C innermost in
    memory), else None. On CPU, ATen's BatchNorm computes the same statistics and output, bit for
    bit, on that view as on ``y`` (both take its channels-last kernels), and the fused kernels take
    it as their ``[rows, C]`` layout. (On CUDA the view would switch cuDNN's BatchNorm for ATen's.)"""
    if y.device.type != "cpu" or y.dim() != 4 or not y.is_contiguous(memory_format=torch.channels_last):
        return None
    return y.movedim(1, -1).reshape(-1, y.shape[1])


def _fused_apply(y, bn, lif, T, chosen):
    """The fused path of :func:`batch_norm_lif` on a contiguous ``y``: nn.BatchNorm's bookkeeping,
    then :class:`_BatchNormLIF`."""
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
