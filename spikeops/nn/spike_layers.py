"""``SpikeLinear``, ``SpikeConv1d``, ``SpikeConv2d``: torch layers that save their input compactly.

Each computes exactly what its torch parent computes (same constructor, parameters and
state_dict; forward output and gradients equal), but the input it keeps for the weight gradient
is stored by :func:`spikeops.ops.compact.compact`: bit-packed along the channel/feature dim
when it holds only 0/1 (1/32 of fp32), as uint8 when it holds only integers 0..255 such as the
residual sums of Spikformer blocks (1/4), else as is. Backward restores it exactly and runs the
same torch kernels the parent's autograd runs, so fp32 gradients are bitwise equal.

Without grad (inference, or no tensor requiring grad) the parent's forward runs untouched.
Under autocast the inputs are cast as autocast casts them for ``linear``/``conv``. Double
backward is not supported. Under ``torch.compile`` (``torch.compiler.is_compiling()``) the
parent's forward runs too: the compact saved form depends on the input's values, which a graph
cannot branch on, so a compiled layer has no graph break (``fullgraph=True`` works) and the same
outputs and gradients, but the standard memory (autograd keeps the input as it is).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from spikeops.ops.compact import compact, memory_format, restore
from spikeops.ops.known_counts import same_counts
from spikeops.ops.max_pool import max_pool2d, max_pool2d_backward_saved
from spikeops.ops.pack import word_rows


class _LinearOp(NamedTuple):
    """``y = x @ W.T + b`` on ``[..., C_in]``; backward as autograd's ``addmm`` on the flattened input."""

    channel_dim: int = -1

    def forward(self, x, weight, bias):
        return F.linear(x, weight, bias)

    def backward(self, grad, x, x_like, weight, needs):
        grad2d = grad.reshape(-1, grad.shape[-1])
        grad_x = grad2d.mm(weight).view(x_like[0]) if needs[0] else None
        grad_w = grad2d.t().mm(x.reshape(-1, x.shape[-1])) if needs[1] else None
        grad_b = grad2d.sum(0) if needs[2] else None
        return grad_x, grad_w, grad_b


class _ConvOp(NamedTuple):
    """``aten.convolution`` on batched ``[N, C_in, *spatial]`` input with numeric padding;
    backward is ``aten.convolution_backward``, the call autograd makes for it."""

    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int
    channel_dim: int = 1

    def forward(self, x, weight, bias):
        zeros = [0] * len(self.stride)
        return torch.convolution(x, weight, bias, self.stride, self.padding, self.dilation, False, zeros, self.groups)

    def backward(self, grad, x, x_like, weight, needs):
        if x is None:  # not saved (no weight grad): grad_input needs the input's shape and layout only
            x = torch.empty(x_like[0], dtype=grad.dtype, device=grad.device, memory_format=x_like[1])
        bias_sizes = [weight.shape[0]] if needs[2] else None
        zeros = [0] * len(self.stride)
        return torch.ops.aten.convolution_backward(grad, x, weight, bias_sizes, self.stride, self.padding,
                                                   self.dilation, False, zeros, self.groups, list(needs))


def _compact_input(x: torch.Tensor, channel_dim: int):
    """:func:`compact` of ``x`` along ``channel_dim``, unless that dim is not innermost in memory:
    then a contiguous ``x`` is packed as the ``[R, n]`` view whose rows are its smallest trailing
    block of a whole number of 64-bit words (``[N, C, L]`` with 64 | L: rows of L). That takes no
    more bits (rows need no padding) and no transposing copy in forward (packing along C does one,
    and unpacking another in backward, each several times the cost of the pack kernel).
    :func:`restore` then returns that ``[R, n]`` view: callers ``.view`` it back to ``x``'s shape."""
    if channel_dim % x.dim() != x.dim() - 1 and x.is_contiguous() and x.numel() > 0:
        rows = word_rows(x)
        if rows is not None:
            return compact(rows, -1)
    return compact(x, channel_dim)


class _CompactInputFunction(torch.autograd.Function):
    """``op.forward(x, weight, bias)``, saving ``x`` compactly (and only if the weight needs a grad)."""

    @staticmethod
    def forward(ctx, x, weight, bias, op):
        ctx.op, ctx.x_like = op, (x.shape, memory_format(x))
        saved, ctx.meta = _compact_input(x, op.channel_dim) if ctx.needs_input_grad[1] else (None, None)
        ctx.save_for_backward(saved, weight)
        return op.forward(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        saved, weight = ctx.saved_tensors
        x = None if saved is None else restore(saved, ctx.meta).view(ctx.x_like[0])
        needs = tuple(ctx.needs_input_grad[:3])
        return (*ctx.op.backward(grad, x, ctx.x_like, weight, needs), None)


def _autocast_inputs(*tensors):
    """Under autocast: cast as autocast casts the inputs of ``linear``/``conv`` (floating, not fp64,
    to the autocast dtype); the casts stay in the autograd graph as they would under autocast."""
    dtype = torch.get_autocast_dtype(tensors[0].device.type)
    return tuple(same_counts(t, t.to(dtype)) if t is not None and t.is_floating_point() and t.dtype != torch.float64
                 else t for t in tensors)


def _check_input(layer, input, channel_dim: int, expected: int, what: str) -> None:
    """TypeError / ValueError naming ``input`` (torch's own errors name mat1/mat2 or nothing)."""
    name = type(layer).__name__
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{name}: input must be a torch.Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"{name}: input must be a floating tensor (the layer's weight is), got {input.dtype}")
    if input.dim() < -channel_dim or input.shape[channel_dim] != expected:
        raise ValueError(f"{name}: input must have {what}={expected} channels at dim {channel_dim}, "
                         f"got shape {tuple(input.shape)}")


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


@torch.compiler.disable(reason="spikeops: the saved form of the input depends on its values")
def _apply(op, x, weight, bias):
    """Run ``op`` through :class:`_CompactInputFunction`, with autocast applied as torch would.
    The autocast context is entered only under autocast: entering and leaving one cost ~36 us of
    a ~180 us ``SpikeLinear`` forward at a tiny shape (2-core CPU VM)."""
    if not torch.is_autocast_enabled(x.device.type):
        return _CompactInputFunction.apply(x, weight, bias, op)
    x, weight, bias = _autocast_inputs(x, weight, bias)
    with torch.autocast(x.device.type, enabled=False):
        return _CompactInputFunction.apply(x, weight, bias, op)


class SpikeLinear(nn.Linear):
    """:class:`torch.nn.Linear` that saves its input as bits / uint8 when it can (see module doc);
    under ``torch.compile`` it is plain ``nn.Linear`` (no graph break, standard memory).

    Shapes: input ``[*, in_features]`` (e.g. ``[T, B, N, C]``) -> output ``[*, out_features]``.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        _check_input(self, input, -1, self.in_features, "in_features")
        if not _needs_grad(input, self.weight, self.bias) or torch.compiler.is_compiling():
            return super().forward(input)
        return _apply(_LinearOp(), input, self.weight, self.bias)


class _SpikeConvNd:
    """The ``_conv_forward`` of :class:`SpikeConv1d`/:class:`SpikeConv2d`: torch's, with the
    convolution itself routed through :class:`_CompactInputFunction` (torch's own under
    ``torch.compile``: no graph break, standard memory)."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        nd = weight.dim() - 2
        if input.dim() not in (nd + 1, nd + 2):
            raise ValueError(f"{type(self).__name__}: input must be {nd + 1}-d (unbatched) or {nd + 2}-d "
                             f"[N, C_in, ...], got shape {tuple(input.shape)}")
        _check_input(self, input, -nd - 1, self.in_channels, "in_channels")
        if not _needs_grad(input, weight, bias) or torch.compiler.is_compiling():
            return super()._conv_forward(input, weight, bias)
        unbatched = input.dim() == nd + 1
        x = input.unsqueeze(0) if unbatched else input
        x, padding = self._explicit_padding(x, weight)
        op = _ConvOp(tuple(self.stride), padding, tuple(self.dilation), self.groups)
        out = _apply(op, x, weight, bias)
        return out.squeeze(0) if unbatched else out

    def _explicit_padding(self, x, weight):
        """(input padded as torch pads it before the convolution, symmetric numeric padding)."""
        nd = weight.dim() - 2
        if self.padding_mode != "zeros":  # as nn.ConvNd._conv_forward
            return F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode), (0,) * nd
        if self.padding == "valid":
            return x, (0,) * nd
        if self.padding != "same":
            return x, tuple(self.padding)
        # "same" as aten's _convolution_same: symmetric part as padding, the extra one on the right padded here
        total = [d * (k - 1) for d, k in zip(self.dilation, weight.shape[2:])]
        extra = [t % 2 for t in total]
        if any(extra):
            pad_nd = [p for e in reversed(extra) for p in (0, e)]
            x = F.pad(x, pad_nd)
        return x, tuple(t // 2 for t in total)


class SpikeConv1d(_SpikeConvNd, nn.Conv1d):
    """:class:`torch.nn.Conv1d` that saves its input as bits (along C) / uint8 when it can.

    Shapes: input ``[N, C_in, L]`` or ``[C_in, L]`` -> output ``[N, C_out, L_out]`` or ``[C_out, L_out]``.
    """


class SpikeConv2d(_SpikeConvNd, nn.Conv2d):
    """:class:`torch.nn.Conv2d` that saves its input as bits (along C) / uint8 when it can.

    Shapes: input ``[N, C_in, H, W]`` or ``[C_in, H, W]`` -> output ``[N, C_out, H_out, W_out]``
    or ``[C_out, H_out, W_out]``.
    """


class _CompactMaxPool2d(torch.autograd.Function):
    """``max_pool2d`` saving its input compactly; backward finds the argmax from it (ATen's
    tie-break: the first maximum in the window; :mod:`spikeops.ops.max_pool`) instead of keeping
    the int64 indices (8 bytes per output) and the fp32 input."""

    @staticmethod
    def forward(ctx, x, args):
        ctx.args, ctx.shape = args, x.shape
        saved, ctx.meta = _compact_input(x, 1)
        ctx.save_for_backward(saved)
        return same_counts(x, max_pool2d(x, args))  # maxima of spikes are spikes

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (saved,) = ctx.saved_tensors
        return max_pool2d_backward_saved(grad, saved, ctx.meta, ctx.shape, ctx.args), None


class SpikeMaxPool2d(nn.MaxPool2d):
    """:class:`torch.nn.MaxPool2d` that saves its (spike) input as bits / uint8 for backward and
    recomputes the argmax there: same outputs and gradients. ``return_indices`` is not supported.
    Without grad it runs the same kernels (:mod:`spikeops.ops.max_pool`, ATen's where they do not
    apply). Under ``torch.compile`` it is plain ``nn.MaxPool2d`` (no graph break, standard memory).

    Shapes: input ``[N, C, H, W]`` -> ``[N, C, H_out, W_out]``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.return_indices:
            raise ValueError("SpikeMaxPool2d: return_indices=True is not supported; use nn.MaxPool2d")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"SpikeMaxPool2d: input must be a torch.Tensor, got {type(input).__name__}")
        if input.dim() not in (3, 4):
            raise ValueError(f"SpikeMaxPool2d: input must be 3-d [C, H, W] or 4-d [N, C, H, W], got shape "
                             f"{tuple(input.shape)}")
        if input.dim() != 4 or torch.compiler.is_compiling():
            return super().forward(input)
        pair = nn.modules.utils._pair
        args = (pair(self.kernel_size), pair(self.stride if self.stride is not None else self.kernel_size),
                pair(self.padding), pair(self.dilation), bool(self.ceil_mode))
        if not _needs_grad(input):  # inference: the kernels of spikeops.ops.max_pool where they apply
            return same_counts(input, max_pool2d(input, args))
        return _compiler_disabled_pool(input, args)


@torch.compiler.disable(reason="spikeops: the saved form of the input depends on its values")
def _compiler_disabled_pool(x, args):
    return _CompactMaxPool2d.apply(x, args)
