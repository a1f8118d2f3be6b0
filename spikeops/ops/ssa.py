r"""Fused Spiking Self-Attention: ``spikeops.ssa``.

For spikes q, k, v ``[T, B, H, N, d]`` (Spikformer's attention, per head and time step):

.. math::

    Y_t = s \, Q_t K_t^T V_t, \qquad S = \mathrm{LIF}_{v_{th}, \tau}(Y) \text{ over } t

with the attention neuron of Spikformer (v_reset 0, decay_input, detach_reset, sigmoid surrogate
alpha 4). ``Q K^T V`` is an exact integer (0/1 operands), computed as ``Q (K^T V)`` (no N x N
map; the Triton kernel takes ``(Q K^T) V`` when ``N <= d``); the scale is applied in fp32, so
spikes equal the reference bit for bit.

Backward saves q, k, v bit-packed (1 bit per spike, 1/32 of fp32) and recomputes Y from them
exactly, runs the LIF backward (surrogate) to get dL/dY, then the float products:
``dQ = s dY (K^T V)^T``, ``dA = s Q^T dY``, ``dK = V dA^T``, ``dV = K dA``. The C++ backend does
all of it in one kernel over the bits (sums of rows at the spikes); so does Triton for d <= 64
(``tl.dot`` on unpacked tiles), composing unpack, the LIF kernels and matmuls for wider heads.
"""
from __future__ import annotations

import torch

from spikeops import backend as _backend
from spikeops import reference
from spikeops._validation import check_attention_inputs, check_binary, check_finite, check_tau
from spikeops.ops.known_counts import counts_bound, mark_counts
from spikeops.ops.op import custom_op

TRITON_MAX_ND = 2**31 - 2**16  # the Triton kernel's offsets inside one (t, head) slice are int32


@custom_op("ssa_forward")
def _ssa_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, v_threshold: float, tau: float,
    save_packed: bool, backend: str, check: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [T, BH, N, d] contiguous -> (spikes, q/k/v packed along d [T, BH, N, ceil(d/64)] or empty).
    ``check``: raise unless q, k, v are 0/1 (the kernels find out; reading it back is a host sync
    on a GPU, skipped for inputs known to be spikes)."""
    out, qw, kw, vw, binary = _backend.kernel("ssa", "ssa_forward", backend)(q, k, v, scale, v_threshold, tau, save_packed)
    if check and not bool(binary):  # name the culprit (error path only)
        check_binary("ssa", (("q", q), ("k", k), ("v", v)))
        raise ValueError("ssa: q, k and v must hold only 0 and 1 (spikes)")
    return out, qw, kw, vw


@_ssa_forward.register_fake
def _(q, k, v, scale, v_threshold, tau, save_packed, backend, check=True):
    T, BH, N, d = q.shape
    shape = (T, BH, N, -(-d // 64)) if save_packed else (0,)
    words = [q.new_empty(shape, dtype=torch.int64) for _ in range(3)]
    return (torch.empty_like(q), *words)


@custom_op("ssa_backward")
def _ssa_backward(
    grad: torch.Tensor, qw: torch.Tensor, kw: torch.Tensor, vw: torch.Tensor, scale: float, v_threshold: float,
    tau: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad [T, BH, N, d] contiguous, the words saved by forward -> dq, dk, dv [T, BH, N, d] in grad's
    dtype (computed in fp32, rounded once)."""
    return _backend.kernel("ssa", "ssa_backward", backend)(grad, qw, kw, vw, scale, v_threshold, tau)


@_ssa_backward.register_fake
def _(grad, qw, kw, vw, scale, v_threshold, tau, backend):
    return tuple(torch.empty_like(grad) for _ in range(3))


def _setup_context(ctx, inputs, output):
    _, _, _, scale, v_threshold, tau, _, backend, *_ = inputs
    ctx.save_for_backward(*output[1:])
    ctx.params = (scale, v_threshold, tau, backend)
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad, *_):
    if grad is None:
        return (None,) * 9
    qw, kw, vw = ctx.saved_tensors
    if qw.numel() == 0:
        raise RuntimeError("spikeops.ssa: backward through a forward that ran without grad enabled for q, k, v")
    scale, v_threshold, tau, backend = ctx.params
    grads = _ssa_backward(grad.contiguous(), qw, kw, vw, scale, v_threshold, tau, backend)  # in q's dtype
    return (*grads, None, None, None, None, None, None)


_ssa_forward.register_autograd(_backward, setup_context=_setup_context)


def ssa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float = 0.125,
    v_threshold: float = 0.5,
    tau: float = 2.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Spiking self-attention ``LIF(scale * Q K^T V)`` in one fused kernel.

    Args:
        q, k, v: spikes ``[T, B, H, N, d]`` (0./1.), same shape, dtype and device.
        scale: Spikformer's 0.125 (0.25 for its DVS models).
        v_threshold: the attention neuron's threshold (0.5 in Spikformer).
        tau: the attention neuron's time constant, > 1.
        backend: see :mod:`spikeops.backend`.

    Returns:
        spikes ``[T, B, H, N, d]`` in q's dtype. Differentiable in q, k, v; backward keeps
        q, k, v packed to 1 bit each. Raises ``ValueError`` if q, k or v is not binary.
    """
    named = [("q", q), ("k", k), ("v", v)]
    check_attention_inputs(named)
    scale = check_finite("scale", scale)
    v_threshold = check_finite("v_threshold", v_threshold)
    tau = check_tau(tau)
    chosen = _backend.resolve(q, backend)
    if chosen == "triton" and q.shape[-2] * q.shape[-1] > TRITON_MAX_ND:  # its in-head offsets are int32
        if backend != "auto":
            raise ValueError(f"backend='triton' needs N*d <= {TRITON_MAX_ND} per head (int32 offsets), got q of "
                             f"shape {tuple(q.shape)}; use backend='torch'")
        chosen = "torch"
    if chosen == "torch":
        check_binary("ssa", named)
        return mark_counts(reference.ssa(q, k, v, scale, v_threshold, tau))
    T, B, H, N, d = q.shape
    check = any(counts_bound(x) != 1 for x in (q, k, v))  # not all known spikes: the kernel's check is read
    flat = [x.contiguous().view(T, B * H, N, d) for x in (q, k, v)]
    save = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    out = _ssa_forward(*flat, scale, v_threshold, tau, save, chosen, check)[0]
    return mark_counts(out.view(T, B, H, N, d))
