r"""2-d max pooling whose backward finds the argmax from the input: ``max_pool2d`` / ``max_pool2d_backward``.

For ``x`` ``[N, C, H, W]`` and ``args = (kernel, stride, padding, dilation, ceil_mode)`` (pairs,
as ``aten.max_pool2d`` takes them):

.. math::

    \mathrm{out}_{n,c,i,j} = \max_{(y, x) \in \mathrm{window}(i, j)} x_{n,c,y,x}, \qquad
    \partial x_{n,c,\arg\max} \mathrel{+}= \partial\mathrm{out}_{n,c,i,j}

with ATen's argmax (the first maximum in row-major window order; NaN wins). ``max_pool2d_backward``
takes the input instead of the int64 indices (8 bytes per output), so a layer can keep its spike
input as bits (``spikeops.nn.SpikeMaxPool2d``); ``max_pool2d_backward_saved`` takes those bits
as they are (channels-last input's are unpacked first). Gradients are bitwise equal to
``max_pool2d_with_indices_backward``'s. The C++ backend has kernels for contiguous and for
channels-last input, dilation 1 and floor output size (ATen's CPU max_pool2d runs at a few GB/s on
[N, C, H, W]; channels-last [64, 192, 32, 32] bf16 on the 2-core VM, one run: ours 3.0 ms forward
and 9.2 ms backward, ATen's 9.0 ms and 18.4 ms); anything else, and the other backends, run ATen's
ops (on CUDA, cuDNN's pooling).
"""
from __future__ import annotations

import torch

from spikeops import backend as _backend
from spikeops.ops.compact import CompactMeta, memory_format, restore

Args = tuple  # (kernel, stride, padding, dilation, ceil_mode), each pair a tuple of 2 ints


def _geometry(args: Args):
    """(kH, kW, sH, sW, pH, pW) for the geometries the C++ kernels take (dilation 1, floor output
    size), else None."""
    kernel, stride, padding, dilation, ceil_mode = args
    return (*kernel, *stride, *padding) if tuple(dilation) == (1, 1) and not ceil_mode else None


def _kernel_args(x: torch.Tensor, args: Args, *others: torch.Tensor):
    """(backend, _geometry(args)) when the C++ kernels cover this call, else None."""
    geometry, chosen = _geometry(args), _backend.resolve(x)
    covered = (geometry is not None and x.dim() == 4 and _layout(x) is not None
               and all(t.dtype == x.dtype for t in others)
               and _backend.has_kernel("max_pool", "max_pool2d_forward", chosen))
    return (chosen, geometry) if covered else None


def _layout(x: torch.Tensor):
    """The memory format of a 4-d ``x`` the kernels take (contiguous, else channels-last), or None."""
    fmt = memory_format(x)
    return fmt if x.is_contiguous(memory_format=fmt) else None


def max_pool2d(x: torch.Tensor, args: Args) -> torch.Tensor:
    """``aten.max_pool2d(x, *args)``: ``[N, C, H, W]`` -> ``[N, C, H_out, W_out]`` (in x's layout)."""
    fast = _kernel_args(x, args)
    if fast is None:
        return torch.ops.aten.max_pool2d(x, *args)
    return _backend.kernel("max_pool", "max_pool2d_forward", fast[0])(x, *fast[1])


def max_pool2d_backward(grad: torch.Tensor, x: torch.Tensor, args: Args) -> torch.Tensor:
    """dL/dx ``[N, C, H, W]`` of ``max_pool2d(x, args)`` from dL/dout ``[N, C, H_out, W_out]``."""
    fast = _kernel_args(x, args, grad)
    if fast is None:
        _, indices = torch.ops.aten.max_pool2d_with_indices(x, *args)
        return torch.ops.aten.max_pool2d_with_indices_backward(grad, x, *args, indices)
    return _backend.kernel("max_pool", "max_pool2d_backward", fast[0])(grad.contiguous(memory_format=_layout(x)), x,
                                                                       *fast[1])


def max_pool2d_backward_saved(grad: torch.Tensor, saved: torch.Tensor, meta: CompactMeta, shape: torch.Size,
                              args: Args) -> torch.Tensor:
    """:func:`max_pool2d_backward` from the input ``[N, C, H, W]`` as :func:`spikeops.ops.compact.compact`
    saved it: spikes packed in their flat order (a contiguous input packed as ``[R, n]`` rows, 64 | n)
    go to the C++ kernel as they are (the argmax is the window's first set bit; no unpacking);
    anything else is restored first."""
    geometry, chosen = _geometry(args), _backend.resolve(grad)
    flat_bits = meta.kind == "bits" and len(meta.shape) == 2 and meta.shape[1] % 64 == 0
    if (flat_bits and geometry is not None and geometry[1] <= 64
            and _backend.has_kernel("max_pool", "max_pool2d_backward_bits", chosen)):
        fn = _backend.kernel("max_pool", "max_pool2d_backward_bits", chosen)
        return fn(grad.contiguous(), saved, shape[2], shape[3], *geometry)
    return max_pool2d_backward(grad, restore(saved, meta).view(shape), args)
