r"""Masked (block-sparse) convolution for masked pre-training: ``spikeops.masked_conv2d``.

For ``x`` ``[N, C, H, W]`` (time folded into N), ``weight`` ``[C_out, C, kh, kw]`` and a mask
``[N_m, 1, h, w]`` (bool, True = visible) whose cells tile the output ``[N, C_out, Ho, Wo]`` in
blocks of :math:`b_h \times b_w = (H_o/h) \times (W_o/w)` pixels:

.. math::

    \mathrm{out} = \mathrm{conv2d}(x, W, b) \odot \mathrm{up}(M), \qquad
    \mathrm{up}(M)_{n, y, x} = M_{n \bmod N_m,\; \lfloor y / b_h \rfloor,\; \lfloor x / b_w \rfloor}

(the reference, :func:`spikeops.reference.masked_conv2d_reference`). Masked output positions are
exactly 0; the mask batch ``N_m`` divides N and is repeated over time (``n = t * N_m + b``).

How the kernels skip the masked blocks. The visible blocks are listed once
(``torch.nonzero(mask)`` -> ``[nb, 3]`` of (n, by, bx)); P = nb * b_h * b_w visible output
pixels, K = C * kh * kw. Every product runs on the visible blocks only and the output is written
once: computed values in visible blocks, exactly 0 in masked ones.

* ``cpp`` (``csrc/cpu/masked_conv.cpp``; OpenMP gather/scatter in C++, the products in torch's
  own CPU kernels), two paths picked by block size:

  - window (blocks of >= 16 pixels, e.g. the 8x8 / 4x4 blocks of the 112 / 56 SCS grids): each
    visible block's input window, halo included (3x3/pad 1: (b_h+2) x (b_w+2), zero outside the
    image; 2x2/stride 2: the 2b_h x 2b_w input block, no halo), is gathered into a channels-last
    batch ``[nb, C, WH, WW]``; torch's convolution (oneDNN) on it gives exactly the visible
    outputs ``[nb, C_out, b_h, b_w]``, which are scattered into the output. Backward:
    ``aten.convolution_backward`` on the same windows; the window gradients are added back into
    dx (neighbouring halos overlap and add up).
  - pixel (small blocks, and non-overlapping kernels such as 2x2/stride 2): im2col of the visible
    pixels ``cols [P, K]`` and one GEMM ``W.view(C_out, K) @ cols^T`` (``at::mm``: the BLAS torch
    links), in chunks of >= 1024 pixels / ~16 MB. Backward: ``G [C_out, P]`` = grad_out at the
    visible pixels, ``dW = G @ cols``, ``db = sum_p G``, ``dcols = G^T @ W``, dx = col2im(dcols).

  Backward recomputes the windows / cols from the saved input instead of keeping them: the op
  saves what ``conv2d`` saves (x, only when the weight needs a gradient, and the weight) plus the
  small mask.
* ``triton`` (``spikeops/triton/masked_conv.py``): implicit-GEMM kernels over the list of visible
  pixels (no cols buffer, ``tl.dot`` with fp32 accumulation; fp32 inputs in TF32 or IEEE fp32 as
  ``torch.backends.cudnn.allow_tf32`` says, like nn.Conv2d on cuDNN); dW is
  split over P with fp32 partial sums; dx is one launch per kernel tap, so it needs no atomics
  and is deterministic.
* ``torch``: the reference (dense conv, then the mask). ``backend="auto"`` picks it on CUDA
  (:data:`spikeops.backend.TORCH_ON_CUDA`): cuDNN's dense convolution is faster there than the
  Triton kernels at the SCS stem's shapes, even at mask ratio 0.75 (BENCHMARKS.md).

In backward, only grad_out at visible positions is read (the output was masked), and input
pixels outside every visible block's receptive field get exactly 0, as in the reference.
fp32/fp16/bf16 on the kernels (fp32 accumulation). Supported: groups=1, dilation=1, zero padding,
any kernel size / stride / padding whose output the mask tiles. Double backward is not supported
by the kernel backends.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from spikeops import backend as _backend
from spikeops import reference
from spikeops._validation import check_float_tensor
from spikeops.ops.op import custom_op

IntPair = Union[int, Sequence[int]]


def _pair(name: str, value, minimum: int) -> list[int]:
    vals = [value, value] if isinstance(value, int) and not isinstance(value, bool) else value
    try:
        vals = list(vals)
    except TypeError:
        vals = None
    if (vals is None or len(vals) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in vals)):
        raise ValueError(f"{name} must be an int >= {minimum} or a pair of them, got {value!r}")
    return vals


def check_mask(mask, name: str = "mask") -> torch.Tensor:
    """``mask`` as a bool ``[N_m, h, w]`` tensor; it may be ``[N_m, 1, h, w]`` or ``[N_m, h, w]``,
    bool or any real dtype holding only 0 and 1."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (bool, True = visible), got {type(mask).__name__}")
    if mask.dim() == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.dim() != 3 or mask.numel() == 0:
        raise ValueError(f"{name} must be [N, 1, h, w] (or [N, h, w]) and non-empty, got shape {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        if mask.is_complex():
            raise TypeError(f"{name} must be a bool tensor (or hold only 0 and 1), got {mask.dtype}")
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"{name} must be bool or hold only 0 and 1 (True/1 = visible), got other values")
        mask = mask != 0
    return mask


def expand_mask(mask: torch.Tensor, x: torch.Tensor, size, what: str, name: str = "mask"):
    """Validate a bool ``[N_m, h, w]`` mask against ``x``'s batch and a ``size`` = (H, W) grid that
    it must tile; returns (bool ``[N, h, w]`` contiguous, block height, block width)."""
    if mask.device != x.device:
        raise ValueError(f"{name} must be on x's device ({x.device}), got {mask.device}")
    N, Nm = x.shape[0], mask.shape[0]
    if N % Nm:
        raise ValueError(
            f"{name} has batch {Nm}, which must equal x's batch N={N} or divide it "
            f"(time folded into the batch, [T*B, ...] time-major, mask [B, 1, h, w])"
        )
    H, W = size
    h, w = mask.shape[-2:]
    if H % h or W % w:
        raise ValueError(
            f"{name}'s spatial size {(h, w)} must divide the {what} size {(H, W)} "
            f"(each mask cell is one block of the {what}, nearest upsampling)"
        )
    if N != Nm:
        mask = mask.repeat(N // Nm, 1, 1)
    return mask.contiguous(), H // h, W // w


TRITON_MAX_PIXELS = 2**31 - 2**20  # the Triton kernels number the visible pixels in int32


def pixel_backend(chosen: str, backend: str, n_pixels: int, what: str) -> str:
    """``chosen``, or ``"torch"`` instead of ``"triton"`` (auto) / a ValueError (forced) when the
    ``n_pixels`` = N*H*W pixels of ``what`` could overflow the Triton kernels' int32 pixel index."""
    if chosen != "triton" or n_pixels <= TRITON_MAX_PIXELS:
        return chosen
    if backend == "auto":
        return "torch"
    raise ValueError(f"backend='triton' numbers pixels in int32: the {what} has N*H*W={n_pixels} pixels, more than "
                     f"{TRITON_MAX_PIXELS}; split the batch or use backend='torch'")


def block_list(mask: torch.Tensor) -> torch.Tensor:
    """Visible blocks of a bool ``[N, h, w]`` mask: int32 ``[nb, 3]`` (n, by, bx), sorted."""
    return mask.nonzero().to(torch.int32).contiguous()


def out_size(H: int, W: int, kh: int, kw: int, stride, padding) -> tuple[int, int]:
    return (H + 2 * padding[0] - kh) // stride[0] + 1, (W + 2 * padding[1] - kw) // stride[1] + 1


@custom_op("masked_conv2d_forward")
def _forward(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], mask: torch.Tensor, stride: list[int],
    padding: list[int], backend: str,
) -> torch.Tensor:
    """x [N, C, H, W], weight [C_out, C, kh, kw] contiguous, mask bool [N, h, w] -> out [N, C_out, Ho, Wo]."""
    Ho, Wo = out_size(x.shape[2], x.shape[3], weight.shape[2], weight.shape[3], stride, padding)
    bh, bw = Ho // mask.shape[1], Wo // mask.shape[2]
    return _backend.kernel("masked_conv", "masked_conv2d_forward", backend)(
        x, weight, bias, block_list(mask), stride[0], stride[1], padding[0], padding[1], bh, bw, Ho, Wo)


@_forward.register_fake
def _(x, weight, bias, mask, stride, padding, backend):
    Ho, Wo = out_size(x.shape[2], x.shape[3], weight.shape[2], weight.shape[3], stride, padding)
    return x.new_empty((x.shape[0], weight.shape[0], Ho, Wo))


@custom_op("masked_conv2d_backward")
def _backward_op(
    grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, stride: list[int],
    padding: list[int], input_size: list[int], need_x: bool, need_w: bool, need_b: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx [N, C, H, W], dW, db); an unneeded one is an empty tensor; x may be empty unless need_w."""
    Ho, Wo = grad_out.shape[2], grad_out.shape[3]
    bh, bw = Ho // mask.shape[1], Wo // mask.shape[2]
    return _backend.kernel("masked_conv", "masked_conv2d_backward", backend)(
        grad_out, x, weight, block_list(mask), stride[0], stride[1], padding[0], padding[1], bh, bw,
        input_size[0], input_size[1], need_x, need_w, need_b)


@_backward_op.register_fake
def _(grad_out, x, weight, mask, stride, padding, input_size, need_x, need_w, need_b, backend):
    empty = lambda: grad_out.new_empty((0,))  # noqa: E731 - distinct tensors: outputs must not alias
    gx = grad_out.new_empty((grad_out.shape[0], weight.shape[1], *input_size)) if need_x else empty()
    gw = torch.empty_like(weight) if need_w else empty()
    gb = grad_out.new_empty((weight.shape[0],)) if need_b else empty()
    return gx, gw, gb


def _setup_context(ctx, inputs, output):
    x, weight, bias, mask, stride, padding, backend = inputs
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_b = bias is not None and ctx.needs_input_grad[2]
    ctx.save_for_backward(x if need_w else None, weight, mask)
    ctx.params = (stride, padding, [x.shape[2], x.shape[3]], need_x, need_w, need_b, backend)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out):
    if grad_out is None:
        return (None,) * 7
    x, weight, mask = ctx.saved_tensors
    stride, padding, input_size, need_x, need_w, need_b, backend = ctx.params
    if x is None:
        x = weight.new_empty((0,))
    gx, gw, gb = _backward_op(grad_out.contiguous().to(weight.dtype), x, weight, mask, stride, padding, input_size,
                              need_x, need_w, need_b, backend)
    return (gx if need_x else None, gw if need_w else None, gb if need_b else None, None, None, None, None)


_forward.register_autograd(_backward, setup_context=_setup_context)


def masked_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    backend: str = "auto",
) -> torch.Tensor:
    """``conv2d(x, weight, bias, stride, padding)`` computed on the visible blocks only; masked
    output positions are exactly 0.

    Args:
        x: ``[N, C, H, W]`` float (time folded into N, time-major).
        weight: ``[C_out, C, kh, kw]``, same dtype and device as x.
        mask: ``[N_m, 1, h, w]`` (or ``[N_m, h, w]``), bool or 0/1, True = visible, at any
            resolution whose cells tile the output (``h | Ho``, ``w | Wo``); ``N_m`` equals N or
            divides it (the mask is repeated over time steps).
        bias: ``[C_out]`` or None.
        stride, padding: int or pair (zero padding).
        dilation, groups: must be 1 (accepted so that a clear error says so).
        backend: see :mod:`spikeops.backend`.

    Returns:
        ``[N, C_out, Ho, Wo]`` in x's dtype; differentiable in x, weight and bias.
    """
    check_float_tensor("x", x)
    check_float_tensor("weight", weight)
    if _pair("dilation", dilation, 1) != [1, 1]:
        raise ValueError(f"dilation must be 1: masked_conv2d has no dilated kernel, got {dilation!r}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups != 1:
        raise ValueError(f"groups must be 1: masked_conv2d has no grouped kernel, got {groups!r}")
    if x.dim() != 4 or x.numel() == 0:
        raise ValueError(f"x must be a non-empty [N, C, H, W] (4-d) tensor, got shape {tuple(x.shape)}")
    if weight.dim() != 4 or weight.numel() == 0:
        raise ValueError(f"weight must be a non-empty [C_out, C_in, kh, kw] (4-d) tensor, got shape {tuple(weight.shape)}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight has C_in={weight.shape[1]} input channels but x has C={x.shape[1]} (channel mismatch)")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"weight must share x's dtype and device ({x.dtype}, {x.device}), "
                         f"got {weight.dtype}, {weight.device}")
    if bias is not None:
        check_float_tensor("bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must be [C_out={weight.shape[0]}], got shape {tuple(bias.shape)}")
        if bias.dtype != x.dtype or bias.device != x.device:
            raise ValueError(f"bias must share x's dtype and device ({x.dtype}, {x.device}), got {bias.dtype}, {bias.device}")
    stride = _pair("stride", stride, 1)
    padding = _pair("padding", padding, 0)
    Ho, Wo = out_size(x.shape[2], x.shape[3], weight.shape[2], weight.shape[3], stride, padding)
    if Ho < 1 or Wo < 1:
        raise ValueError(f"the output would be empty ({Ho}x{Wo}): kernel {tuple(weight.shape[2:])} larger than the "
                         f"padded input {x.shape[2] + 2 * padding[0]}x{x.shape[3] + 2 * padding[1]}")
    mask = check_mask(mask)
    full, _, _ = expand_mask(mask, x, (Ho, Wo), "output")
    chosen = _backend.resolve(x, backend, op="masked_conv2d")
    pixels = x.shape[0] * max(Ho * Wo, x.shape[2] * x.shape[3])
    chosen = pixel_backend(chosen, backend, pixels, "input or output")
    if chosen == "torch":
        return reference.masked_conv2d_reference(x, weight, mask, bias, stride, padding)
    return _forward(x.contiguous(), weight.contiguous(), bias.contiguous() if bias is not None else None, full,
                    stride, padding, chosen)
