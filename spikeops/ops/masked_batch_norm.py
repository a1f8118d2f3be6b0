r"""Masked BatchNorm for masked pre-training: ``spikeops.masked_batch_norm2d``.

For ``x`` ``[N, C, H, W]`` and a mask whose cells tile ``H x W`` (as for
:func:`spikeops.masked_conv2d`), with V the set of visible positions (n, y, x), ``P = |V|``:

.. math::

    \mu_c = \frac{1}{P} \sum_{V} x_{n,c,y,x}, \qquad
    \sigma^2_c = \frac{1}{P} \sum_{V} (x_{n,c,y,x} - \mu_c)^2, \qquad
    y = \begin{cases} \gamma_c \dfrac{x - \mu_c}{\sqrt{\sigma_c^2 + \epsilon}} + \beta_c & \text{visible} \\
    0 & \text{masked} \end{cases}

in training (running stats: ``r <- (1 - momentum) r + momentum * batch``, with the unbiased
variance :math:`\sigma^2 P / (P - 1)`); in eval the running stats replace :math:`\mu, \sigma^2`.
This is exactly "gather the visible positions -> BatchNorm1d -> scatter into zeros" (SparK's
``SparseBatchNorm2d``; :func:`spikeops.reference.masked_batch_norm2d_reference`), gradients
included: with :math:`\hat x = (x - \mu)/\sigma`, :math:`g` = grad_y at visible positions,

.. math::

    \partial\beta = \sum_V g, \quad \partial\gamma = \sum_V g \hat x, \quad
    \partial x = \frac{\gamma}{\sigma}\Big(g - \frac{\partial\beta}{P} - \hat x \frac{\partial\gamma}{P}\Big)
    \;(\text{eval: } \tfrac{\gamma}{\sigma} g), \quad 0 \text{ at masked positions.}

Implementation: the block gather/scatter kernels of :mod:`spikeops.ops.masked_conv` (C++ or
Triton) move the visible blocks into a channels-last ``[nb, C, bh, bw]`` (= the ``[P, C]`` rows of
the BatchNorm1d reference) and back (zero fill), so masked blocks are neither read nor
normalised. On the gathered blocks, an ordinary (channels-last) batch,
torch's own BatchNorm kernels do the rest (``native_batch_norm`` / ``native_batch_norm_backward``,
statistics in fp32 also for fp16/bf16 input): the same arithmetic as the BatchNorm1d reference.
For backward the op keeps the gathered blocks (``(1 - mask ratio)`` of x), not x.
``backend="torch"`` runs the reference; ``backend="auto"`` picks it on CUDA
(:data:`spikeops.backend.TORCH_ON_CUDA`), where it was faster than the Triton gather/scatter.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from spikeops import backend as _backend
from spikeops import reference
from spikeops._validation import check_float_tensor
from spikeops.ops.masked_conv import block_list, check_mask, expand_mask, pixel_backend
from spikeops.ops.op import custom_op


def _gather(t, blocks, bh, bw, backend):
    return _backend.kernel("masked_conv", "masked_gather", backend)(t, blocks, bh, bw)


def _scatter(src, blocks, shape, backend):
    N, _, H, W = shape
    return _backend.kernel("masked_conv", "masked_scatter", backend)(src, blocks, N, H, W)


_DIMS = (0, 2, 3)  # of the gathered blocks [nb, C, bh, bw]: all but the channel


def _per_channel(v):
    return v[None, :, None, None]


@custom_op("masked_batch_norm_forward")
def _forward(
    x: torch.Tensor, mask: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor], training: bool, eps: float,
    save: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [N, C, H, W] contiguous, mask bool [N, h, w] -> (y, mean [C] fp32, invstd [C] fp32,
    unbiased batch var [C] fp32 (empty in eval), x's visible blocks [nb, C, bh, bw] (empty unless save))."""
    bh, bw = x.shape[2] // mask.shape[1], x.shape[3] // mask.shape[2]
    blocks = block_list(mask)
    vis = _gather(x, blocks, bh, bw, backend)
    C = x.shape[1]
    if training:
        P = vis.numel() // C
        if P < 2:
            raise ValueError(f"masked_batch_norm2d: training needs more than 1 visible position per channel, "
                             f"the mask leaves {P}")
        # torch's own BatchNorm kernel on the visible blocks; with momentum 1 into zeroed buffers
        # the "running" stats it writes are exactly the batch mean and unbiased variance
        batch_mean, var_unbiased = (torch.zeros((C,), device=x.device, dtype=torch.float32) for _ in range(2))
        y_vis, mean, invstd = torch.native_batch_norm(vis, weight, bias, batch_mean, var_unbiased, True, 1.0, eps)
        mean, invstd = mean.float(), invstd.float()
    else:
        y_vis = torch.native_batch_norm(vis, weight, bias, running_mean, running_var, False, 0.0, eps)[0]
        mean = running_mean.to(torch.float32, copy=True)
        invstd = torch.rsqrt(running_var.float() + eps)
        var_unbiased = mean.new_empty((0,))
    y = _scatter(y_vis.contiguous(memory_format=torch.channels_last), blocks, x.shape, backend)
    return y, mean, invstd, var_unbiased, vis if save else x.new_empty((0,))


@_forward.register_fake
def _(x, mask, weight, bias, running_mean, running_var, training, eps, save, backend):
    C = x.shape[1]
    stat = x.new_empty((C,), dtype=torch.float32)
    bh, bw = x.shape[2] // mask.shape[1], x.shape[3] // mask.shape[2]
    vis = (torch.empty((torch.library.get_ctx().new_dynamic_size(), C, bh, bw), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last) if save else x.new_empty((0,)))
    return torch.empty_like(x), stat, stat.new_empty((C,)), stat.new_empty((C,) if training else (0,)), vis


@custom_op("masked_batch_norm_backward")
def _backward_op(
    grad_y: torch.Tensor, vis: torch.Tensor, mask: torch.Tensor, weight: Optional[torch.Tensor], mean: torch.Tensor,
    invstd: torch.Tensor, training: bool, need_x: bool, need_w: bool, need_b: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad_y [N, C, H, W] contiguous, vis: x's visible blocks (channels-last [nb, C, bh, bw]; may be
    empty in eval without dW) -> (dx, dweight, dbias), unneeded ones empty."""
    bh, bw = grad_y.shape[2] // mask.shape[1], grad_y.shape[3] // mask.shape[2]
    blocks = block_list(mask)
    g = _gather(grad_y, blocks, bh, bw, backend)
    empty = lambda: grad_y.new_empty((0,))  # noqa: E731 - distinct tensors: outputs must not alias
    if training:
        gx_vis, gw, gb = torch.ops.aten.native_batch_norm_backward(
            g, vis, weight, None, None, mean, invstd, True, 0.0, [need_x, need_w, need_b])
    else:  # eval: y = x * (w * invstd) + const per channel, with the running stats
        gf = g.float()
        gx_vis = gw = gb = None
        if need_x:
            w = weight.float() if weight is not None else torch.ones_like(invstd)
            gx_vis = gf * _per_channel(w * invstd)
        if need_w:
            gw = (gf * ((vis.float() - _per_channel(mean)) * _per_channel(invstd))).sum(_DIMS)
        if need_b:
            gb = gf.sum(_DIMS)
    gx = (_scatter(gx_vis.to(grad_y.dtype).contiguous(memory_format=torch.channels_last), blocks, grad_y.shape,
                   backend) if need_x else empty())
    return (gx, gw.to(weight.dtype) if need_w else empty(),
            gb.to(weight.dtype if weight is not None else torch.float32) if need_b else empty())


@_backward_op.register_fake
def _(grad_y, vis, mask, weight, mean, invstd, training, need_x, need_w, need_b, backend):
    empty = lambda: grad_y.new_empty((0,))  # noqa: E731 - distinct tensors: outputs must not alias
    C = grad_y.shape[1]
    return (torch.empty_like(grad_y) if need_x else empty(), weight.new_empty((C,)) if need_w else empty(),
            grad_y.new_empty((C,)) if need_b else empty())


def _setup_context(ctx, inputs, output):
    x, mask, weight, bias, _, _, training, _, _, backend = inputs
    _, mean, invstd, var_unbiased, vis = output
    need_x, need_w = ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[2]
    need_b = bias is not None and ctx.needs_input_grad[3]
    ctx.save_for_backward(vis, mask, weight, mean, invstd)
    ctx.params = (training, need_x, need_w, need_b, backend)
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.mark_non_differentiable(mean, invstd, var_unbiased, vis)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_y, *_):
    if grad_y is None:
        return (None,) * 10
    vis, mask, weight, mean, invstd = ctx.saved_tensors
    training, need_x, need_w, need_b, backend = ctx.params
    if (need_w or training) and vis.dim() != 4:
        raise RuntimeError("spikeops.masked_batch_norm2d: backward through a forward that ran without grad enabled")
    gx, gw, gb = _backward_op(grad_y.contiguous(), vis, mask, weight, mean, invstd, training, need_x, need_w, need_b,
                              backend)
    return (gx if need_x else None, None, gw if need_w else None, gb.to(ctx.bias_dtype) if need_b else None,
            None, None, None, None, None, None)


_forward.register_autograd(_backward, setup_context=_setup_context)


def _check_channel_vector(name: str, t, C: int, x: torch.Tensor) -> None:
    if t is None:
        return
    check_float_tensor(name, t)
    if t.shape != (C,):
        raise ValueError(f"{name} must be [C={C}] (x's channels), got shape {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"{name} must be on x's device ({x.device}), got {t.device}")
    # what torch's BatchNorm kernels accept on every path (aten raises "mixed dtype" otherwise)
    want = torch.float64 if x.dtype == torch.float64 else torch.float32
    if t.dtype != want:
        raise ValueError(f"{name} must be {want} for a {x.dtype} x (BatchNorm parameters and statistics are "
                         f"kept in fp32, fp64 for fp64 x), got {t.dtype}")


def masked_batch_norm2d(
    x: torch.Tensor,
    mask: torch.Tensor,
    running_mean: Optional[torch.Tensor] = None,
    running_var: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    backend: str = "auto",
) -> torch.Tensor:
    """BatchNorm2d over the visible positions only; masked outputs are exactly 0.

    Arguments as ``torch.nn.functional.batch_norm`` plus ``mask`` (second): ``[N_m, 1, h, w]`` or
    ``[N_m, h, w]``, bool or 0/1, True = visible, cells tiling x's ``H x W``, ``N_m`` dividing N
    (repeated over time steps). In training the batch statistics come from the visible positions
    and ``running_mean``/``running_var`` (if given) are updated in place; otherwise the running
    statistics are used (and must be given). Weight/bias/running stats are ``[C]`` float32 (float64
    for a float64 x), computed in fp32. Returns ``[N, C, H, W]`` in x's dtype, differentiable in x, weight, bias.
    """
    check_float_tensor("x", x)
    if x.dim() != 4 or x.numel() == 0:
        raise ValueError(f"x must be a non-empty [N, C, H, W] (4-d) tensor, got shape {tuple(x.shape)}")
    C = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        _check_channel_vector(name, t, C, x)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (or both None)")
    if not training and running_mean is None:
        raise ValueError("running_mean and running_var are needed when training=False (eval uses the running stats)")
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be a number in [0, 1], got {momentum!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    mask = check_mask(mask)
    full, _, _ = expand_mask(mask, x, x.shape[2:], "input")
    chosen = pixel_backend(_backend.resolve(x, backend, op="masked_batch_norm2d"), backend,
                           x.shape[0] * x.shape[2] * x.shape[3], "input")
    if chosen == "torch":
        return reference.masked_batch_norm2d_reference(x, mask, running_mean, running_var, weight, bias, training,
                                                       float(momentum), float(eps))
    needs_grad = torch.is_grad_enabled()
    any_grad = x.requires_grad or any(t is not None and t.requires_grad for t in (weight, bias))
    save = needs_grad and ((weight is not None and weight.requires_grad) or (training and any_grad))
    y, mean, _, var_unbiased, _ = _forward(x.contiguous(), full, weight, bias, running_mean, running_var,
                                           bool(training), float(eps), save, chosen)
    if training and running_mean is not None:
        with torch.no_grad():
            running_mean.mul_(1.0 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1.0 - momentum).add_(var_unbiased.to(running_var.dtype), alpha=momentum)
    return y
