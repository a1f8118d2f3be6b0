r"""Fused multi-step LIF neuron: ``spikeops.lif``.

For input ``X [T, ...]`` and every neuron independently, with ``r = v_reset`` (hard reset) or
``r = 0`` (soft reset, ``v_reset=None``) and ``V[-1] = r``:

.. math::

    H_t &= V_{t-1} + (X_t - (V_{t-1} - r)) / \tau      &\text{(decay\_input=True)} \\
    H_t &= V_{t-1} - (V_{t-1} - r) / \tau + X_t        &\text{(decay\_input=False)} \\
    S_t &= \Theta(H_t - v_{th}) \quad (1 \text{ at exactly } 0) \\
    V_t &= H_t (1 - S_t) + r S_t \;\text{(hard)} \qquad V_t = H_t - v_{th} S_t \;\text{(soft)}

Backward uses the surrogate :math:`\sigma'(H_t - v_{th})` for :math:`\partial S_t/\partial H_t`
(``spikeops.reference.surrogate_grad``); with ``detach_reset`` the reset does not carry gradient.
Walking t = T-1 .. 0 with :math:`g_V = 0` at the end:

.. math::

    g_H &= g_{S_t} \sigma' + g_V \, \partial V_t/\partial H_t, \qquad
    g_{X_t} = g_H / \tau \;(\text{or } g_H), \qquad g_V \leftarrow g_H - g_H/\tau

The kernels run all T steps in one launch (forward) and one launch (backward) and save only
H (one float32 per neuron per step) for backward, or with ``state_dtype=torch.bfloat16`` the
distance ``H - v_th`` in bf16 (2 bytes; its sign bit is the spike, so spikes stay exact).
"""
from __future__ import annotations

from typing import Optional

import torch

from spikeops import backend as _backend
from spikeops import reference
from spikeops.ops.known_counts import mark_counts
from spikeops._validation import (
    check_choice,
    check_finite,
    check_float_tensor,
    check_positive,
    check_tau,
    check_time_major,
)
from spikeops.ops.op import custom_op

SURROGATE_IDS = {"sigmoid": 0, "atan": 1}  # shared with csrc/ops.h and spikeops/triton/lif.py
# The attention neuron of SSA and token attention, as the arguments of _lif_forward / _lif_backward
# after tau and v_threshold: v_reset 0, hard reset, decay_input, detach_reset, sigmoid surrogate,
# alpha 4 (the C++ ssa and token_attention kernels hard-code the same).
ATTENTION_NEURON = (0.0, True, True, True, SURROGATE_IDS["sigmoid"], 4.0)
STATE_DTYPES = (torch.float32, torch.bfloat16)


@custom_op("lif_forward")
def _lif_forward(
    x: torch.Tensor,
    tau: float,
    v_threshold: float,
    v_reset: float,
    hard_reset: bool,
    decay_input: bool,
    detach_reset: bool,
    surrogate: int,
    alpha: float,
    save_h: bool,
    state_bf16: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, N] contiguous -> (spikes [T, N] x.dtype, state [T, N] or [0] if not save_h): the state
    is H in float32, or with state_bf16 H - v_threshold rounded to bfloat16 (its sign bit is the spike)."""
    fwd = _backend.kernel("lif", "lif_forward", backend)
    return fwd(x, tau, v_threshold, v_reset, hard_reset, decay_input, save_h, state_bf16)


@_lif_forward.register_fake
def _(x, tau, v_threshold, v_reset, hard_reset, decay_input, detach_reset, surrogate, alpha, save_h, state_bf16, backend):
    h_shape = x.shape if save_h else (0,)
    return torch.empty_like(x), x.new_empty(h_shape, dtype=torch.bfloat16 if state_bf16 else torch.float32)


@custom_op("lif_backward")
def _lif_backward(
    grad_spikes: torch.Tensor,
    h: torch.Tensor,
    tau: float,
    v_threshold: float,
    v_reset: float,
    hard_reset: bool,
    decay_input: bool,
    detach_reset: bool,
    surrogate: int,
    alpha: float,
    backend: str,
) -> torch.Tensor:
    """grad_spikes [T, N], state [T, N] from lif_forward -> grad_x [T, N] in grad_spikes' dtype."""
    bwd = _backend.kernel("lif", "lif_backward", backend)
    return bwd(grad_spikes, h, tau, v_threshold, v_reset, hard_reset, decay_input, detach_reset, surrogate, alpha)


@_lif_backward.register_fake
def _(grad_spikes, h, tau, v_threshold, v_reset, hard_reset, decay_input, detach_reset, surrogate, alpha, backend):
    return torch.empty_like(grad_spikes)


@custom_op("lif_backward_from_input")
def _lif_backward_from_input(
    grad_spikes: torch.Tensor,
    x: torch.Tensor,
    tau: float,
    v_threshold: float,
    v_reset: float,
    hard_reset: bool,
    decay_input: bool,
    detach_reset: bool,
    surrogate: int,
    alpha: float,
    backend: str,
) -> torch.Tensor:
    """``_lif_backward(grad_spikes, h, ...)`` with ``h`` the fp32 state ``_lif_forward(x, ...)`` saves,
    recomputed from the forward's input (grad_spikes and x [T, N] contiguous, one dtype): for
    backward passes that keep x instead of the state (``batch_norm_lif``). C++: one kernel, the state
    kept for a chunk of neurons at a time and never written out (same gradients; an fp32 [T, N]
    tensor less written and read); Triton: the state kernel, then the backward kernel."""
    return _backend.kernel("lif", "lif_backward_from_input", backend)(
        grad_spikes, x, tau, v_threshold, v_reset, hard_reset, decay_input, detach_reset, surrogate, alpha)


@_lif_backward_from_input.register_fake
def _(grad_spikes, x, tau, v_threshold, v_reset, hard_reset, decay_input, detach_reset, surrogate, alpha, backend):
    return torch.empty_like(grad_spikes)


def _setup_context(ctx, inputs, output):
    (_, tau, v_threshold, v_reset, hard_reset, decay_input, detach_reset, surrogate, alpha, _, _, backend) = inputs
    ctx.save_for_backward(output[1])
    ctx.params = (tau, v_threshold, v_reset, hard_reset, decay_input, detach_reset, surrogate, alpha)
    ctx.backend = backend
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero-filled gradient for the saved-state output H


def _backward(ctx, grad_spikes, _grad_h):
    if grad_spikes is None:
        return (None,) * 12
    (h,) = ctx.saved_tensors
    if h.numel() == 0:
        raise RuntimeError(
            "spikeops.lif: backward through a forward that ran without grad enabled for x_seq; "
            "call it with x_seq.requires_grad=True under torch.enable_grad()"
        )
    grad_x = _lif_backward(grad_spikes.contiguous(), h, *ctx.params, ctx.backend)
    return (grad_x,) + (None,) * 11


_lif_forward.register_autograd(_backward, setup_context=_setup_context)


def lif_params(tau, v_threshold, v_reset, surrogate, alpha):
    """Check the neuron's settings; returns (tau, v_threshold, v_reset, alpha) as floats."""
    tau = check_tau(tau)
    v_threshold = check_finite("v_threshold", v_threshold)
    if v_reset is not None:
        v_reset = check_finite("v_reset", v_reset)
    check_choice("surrogate", surrogate, reference.SURROGATES)
    alpha = reference.DEFAULT_ALPHA[surrogate] if alpha is None else check_positive("alpha", alpha)
    return tau, v_threshold, v_reset, alpha


def lif(
    x_seq: torch.Tensor,
    tau: float = 2.0,
    v_threshold: float = 1.0,
    v_reset: Optional[float] = 0.0,
    decay_input: bool = True,
    detach_reset: bool = True,
    surrogate: str = "sigmoid",
    alpha: Optional[float] = None,
    backend: str = "auto",
    state_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Multi-step leaky integrate-and-fire neuron over the leading time axis.

    Args:
        x_seq: input current ``[T, ...]`` (any trailing shape), float32/float16/bfloat16/float64.
            Non-contiguous input is copied to a contiguous one, except channels-last frames
            ``[T, B, C, H, W]``, whose spikes come back in that layout.
        tau: membrane time constant, > 1.
        v_threshold: firing threshold.
        v_reset: hard-reset potential, or ``None`` for soft reset (subtract ``v_threshold``).
        decay_input: whether the input is divided by ``tau`` (SpikingJelly's ``decay_input``).
        detach_reset: cut the gradient through the reset.
        surrogate: ``"sigmoid"`` (alpha 4.0) or ``"atan"`` (alpha 2.0), SpikingJelly's formulas.
        alpha: surrogate sharpness; ``None`` picks the default above.
        backend: ``"auto"``, ``"cpp"``, ``"triton"`` or ``"torch"`` (see :mod:`spikeops.backend`).
        state_dtype: what the kernels keep for backward, one value per neuron per step:
            ``torch.float32`` (default) keeps H, gradients match the reference to ~1e-7;
            ``torch.bfloat16`` keeps ``H - v_threshold`` rounded to bf16 (half the memory, spikes
            still exact, surrogate gradients within ~1% — bf16 has 8 significant bits). The
            ``"torch"`` backend differentiates the reference by autograd and ignores it.

    Returns:
        spikes ``[T, ...]`` of 0./1. in ``x_seq``'s dtype. The membrane state is float32
        (float64 for float64 input) whatever the input dtype.
    """
    check_float_tensor("x_seq", x_seq)
    check_time_major("x_seq", x_seq)
    tau, v_threshold, v_reset, alpha = lif_params(tau, v_threshold, v_reset, surrogate, alpha)
    if state_dtype not in STATE_DTYPES:
        raise ValueError(f"state_dtype must be torch.float32 or torch.bfloat16, got {state_dtype}")
    chosen = _backend.resolve(x_seq, backend)

    if chosen == "torch":
        return mark_counts(reference.lif(x_seq, tau, v_threshold, v_reset, decay_input, detach_reset, surrogate, alpha))

    x2d, laid_out = _time_rows(x_seq)
    save_h = torch.is_grad_enabled() and x_seq.requires_grad
    spikes, _ = _lif_forward(
        x2d,
        tau,
        v_threshold,
        0.0 if v_reset is None else v_reset,
        v_reset is not None,
        bool(decay_input),
        bool(detach_reset),
        SURROGATE_IDS[surrogate],
        alpha,
        save_h,
        state_dtype == torch.bfloat16,
        chosen,
    )
    return mark_counts(laid_out(spikes))


def _time_rows(x_seq: torch.Tensor):
    """(x_seq as ``[T, N]``, a function giving ``[T, N]`` spikes x_seq's shape and layout): a view of
    a contiguous x_seq or of channels-last frames ``[T, B, C, H, W]`` (C innermost, as a
    channels-last stem makes them: the spikes keep that layout, no copy either way), else a
    contiguous copy."""
    T = x_seq.shape[0]
    if not x_seq.is_contiguous() and x_seq.dim() == 5:
        moved = x_seq.movedim(2, -1)
        if moved.is_contiguous():
            return moved.view(T, -1), lambda s: s.view(moved.shape).movedim(-1, 2)
    return x_seq.contiguous().view(T, -1), lambda s: s.view(x_seq.shape)
