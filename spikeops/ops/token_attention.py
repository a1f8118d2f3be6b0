r"""Fused token attention (QKFormer) and multi-scale spiking attention (MSViT): ``spikeops.token_attention``.

For spikes q, k (and p) ``[T, B, H, N, d]``, per time step and head:

.. math::

    S_{n} = \sum_c Q_{n,c} \;(+ \sum_c P_{n,c}), \qquad A = \mathrm{LIF}(S) \text{ over } t,
    \qquad \mathrm{out}_{n,c} = A_n K_{n,c}

(``mode="channel"`` sums over tokens instead and masks channels). The attention neuron: v_reset 0,
decay_input, detach_reset, sigmoid surrogate (alpha 4). Linear in N. The sums are exact integer
counts, so spikes equal the reference bit for bit.

Backward (one kernel): :math:`\partial A = \sum_c \partial\mathrm{out} \odot K`, the surrogate LIF
backward gives :math:`\partial S`, which is :math:`\partial Q` and :math:`\partial P` broadcast
over channels; :math:`\partial K = A \odot \partial\mathrm{out}`. It keeps the neuron's H
(``[T, B, H, N]`` fp32, 1/d of a q-sized tensor) and K bit-packed (written by the forward kernel,
read bit by bit by the backward kernel).
"""
from __future__ import annotations

from typing import Optional

import torch

from spikeops import backend as _backend
from spikeops import reference
from spikeops._validation import check_attention_inputs, check_binary, check_finite, check_tau
from spikeops.ops.known_counts import counts_bound, mark_counts
from spikeops.ops.op import custom_op


def _raise_not_binary(q, k, p) -> None:
    """ValueError naming the first input that is not 0/1 (the error path only: one more pass)."""
    check_binary("token_attention", (("q", q), ("k", k)) + ((("p", p),) if p is not None else ()))
    raise ValueError("token_attention: q, k and p must hold only 0 and 1 (spikes)")


def _setup_context(ctx, inputs, output):
    q, _, p, v_threshold, tau, _, backend, *_ = inputs
    ctx.save_for_backward(output[1], output[2])
    ctx.shape, ctx.dtype, ctx.has_p = q.shape, q.dtype, p is not None
    ctx.params = (v_threshold, tau, backend)
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)


def _layout_ops(name: str, channel_dim: int):
    """Registers the forward and backward custom ops ``spikeops::<name>_forward`` / ``_backward`` of
    one memory layout (the raw kernels of the same names) and their autograd; returns the forward op.

    Layouts: ``token_attention`` q, k, p ``[T, BH, N, d]`` (``channel_dim=-1``) and
    ``token_attention_cf`` ``[T, BH, d, N]`` (``channel_dim=-2``; modules hold q, k, p as
    ``[T, B, C, N]`` conv1d outputs, so their ``[T, B, H, N, d]`` heads are transposed views of
    contiguous ``[T, B, H, d, N]`` tensors: kernels for that layout spare four transposing copies in
    forward and two in backward, each several times the cost of the kernel's own pass). Forward:
    (out, H ``[T, BH, N]`` fp32, k packed along the contiguous last dim ``[numel / last, ceil(last/64)]``;
    H and the words empty unless save). Backward: grad_out, the words, H -> (dL/dS ``[T, BH, N]``
    fp32, dL/dk); dL/dq = dL/dp = dL/dS broadcast over the channels.
    """
    @custom_op(f"{name}_forward")
    def forward(
        q: torch.Tensor, k: torch.Tensor, p: Optional[torch.Tensor], v_threshold: float, tau: float, save: bool,
        backend: str, check: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out, h, k_words, binary = _backend.kernel("token_attention", f"{name}_forward", backend)(
            q, k, p, v_threshold, tau, save)
        if check and not bool(binary):  # a host sync on a GPU: skipped for inputs known to be spikes
            _raise_not_binary(q, k, p)
        return out, h, k_words

    @forward.register_fake
    def _(q, k, p, v_threshold, tau, save, backend, check=True):
        tokens = [n for i, n in enumerate(q.shape) if i != channel_dim % 4]  # [T, BH, N]
        last = q.shape[-1]
        h = q.new_empty(tokens if save else (0,), dtype=torch.float32)
        words = q.new_empty((q.numel() // last, -(-last // 64)) if save else (0,), dtype=torch.int64)
        return torch.empty_like(q), h, words

    @custom_op(f"{name}_backward")
    def backward_op(
        grad_out: torch.Tensor, k_words: torch.Tensor, h: torch.Tensor, v_threshold: float, tau: float, backend: str,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return _backend.kernel("token_attention", f"{name}_backward", backend)(grad_out, k_words, h, v_threshold, tau)

    @backward_op.register_fake
    def _(grad_out, k_words, h, v_threshold, tau, backend):
        return h.new_empty(h.shape), torch.empty_like(grad_out)

    def backward(ctx, grad_out, *_):
        if grad_out is None:
            return (None,) * 8
        h, k_words = ctx.saved_tensors
        if h.numel() == 0:
            raise RuntimeError("spikeops.token_attention: backward through a forward that ran without grad enabled")
        v_threshold, tau, backend = ctx.params
        grad_s, grad_k = backward_op(grad_out.contiguous().to(ctx.dtype), k_words, h, v_threshold, tau, backend)
        # an expanded view, as sum's backward gives (autograd copies it into a leaf's .grad; a
        # consumer that needs it dense makes it so)
        grad_q = grad_s.to(ctx.dtype).unsqueeze(channel_dim).expand(ctx.shape)
        return grad_q, grad_k, grad_q if ctx.has_p else None, None, None, None, None, None

    forward.register_autograd(backward, setup_context=_setup_context)
    return forward


_forward = _layout_ops("token_attention", -1)
_cf_forward = _layout_ops("token_attention_cf", -2)


def _use_cf(named, chosen: str) -> bool:
    """Inputs are transposed views of contiguous ``[.., d, N]`` tensors and the backend has kernels
    for that layout."""
    return _backend.has_kernel("token_attention", "token_attention_cf_forward", chosen) and all(
        x.numel() > 0 and not x.is_contiguous() and x.mT.is_contiguous() for _, x in named)


def token_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    p: Optional[torch.Tensor] = None,
    v_threshold: float = 0.5,
    tau: float = 2.0,
    mode: str = "token",
    backend: str = "auto",
) -> torch.Tensor:
    """Q-K token attention (``p=None``, QKFormer) or MSSA (with ``p``, MSViT) in one fused kernel.

    Args:
        q, k, p: spikes ``[T, B, H, N, d]`` (0./1.), one shape, dtype and device; p optional.
        v_threshold: the attention neuron's threshold (QKFormer 0.5; MSViT's released code 1.0).
        tau: its time constant, > 1.
        mode: ``"token"`` (sum over the head's channels, mask tokens) or ``"channel"`` (sum over
            tokens, mask channels).
        backend: see :mod:`spikeops.backend`.

    Returns:
        ``A * k``, ``[T, B, H, N, d]`` in q's dtype (0./1.). Differentiable in q, k, p.
        Raises ``ValueError`` if an input is not binary.
    """
    named = [("q", q), ("k", k)] + ([("p", p)] if p is not None else [])
    check_attention_inputs(named)
    if mode not in reference.ATTENTION_MODES:
        raise ValueError(f"mode must be one of {reference.ATTENTION_MODES}, got {mode!r}")
    v_threshold = check_finite("v_threshold", v_threshold)
    tau = check_tau(tau)
    chosen = _backend.resolve(q, backend)
    if chosen == "torch":
        check_binary("token_attention", named)
        return mark_counts(reference.token_attention(q, k, p, v_threshold, tau, mode))
    if mode == "channel":  # the same kernel on [.., d, N]: sums over tokens, masks channels
        swap = [x.transpose(-1, -2) for _, x in named]
        out = token_attention(*swap[:2], swap[2] if p is not None else None, v_threshold, tau, "token", chosen)
        return out.transpose(-1, -2)
    T, B, H, N, d = q.shape
    save = torch.is_grad_enabled() and any(x.requires_grad for _, x in named)
    check = any(counts_bound(x) != 1 for _, x in named)  # not all known spikes: the kernel's check is read
    if _use_cf(named, chosen):  # e.g. the heads of [T, B, C, N] activations: no transposing copies
        flat = [x.mT.view(T, B * H, d, N) for _, x in named]
        out = _cf_forward(flat[0], flat[1], flat[2] if p is not None else None, v_threshold, tau, save, chosen,
                          check)[0]
        return mark_counts(out.view(T, B, H, d, N).mT)
    flat = [x.contiguous().view(T, B * H, N, d) for _, x in named]
    out = _forward(flat[0], flat[1], flat[2] if p is not None else None, v_threshold, tau, save, chosen, check)[0]
    return mark_counts(out.view(T, B, H, N, d))
