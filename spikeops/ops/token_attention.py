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
from torch.autograd.function import once_differentiable

from spikeops import backend as _backend
from spikeops import reference
from spikeops._validation import check_attention_inputs, check_binary, check_finite, check_tau
from spikeops.ops.lif import ATTENTION_NEURON, _lif_backward, _lif_forward
from spikeops.ops.pack import _pack, _unpack, word_rows


@torch.library.custom_op("spikeops::token_attention_forward", mutates_args=())
def _forward(
    q: torch.Tensor, k: torch.Tensor, p: Optional[torch.Tensor], v_threshold: float, tau: float, save: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, p [T, BH, N, d] contiguous -> (out, H [T, BH, N] fp32, k packed [T*BH*N, ceil(d/64)]; empty if not save)."""
    out, h, k_words, binary = _backend.kernel("token_attention", "token_attention_forward", backend)(
        q, k, p, v_threshold, tau, save)
    if not binary:  # name the culprit (error path only)
        check_binary("token_attention", (("q", q), ("k", k)) + ((("p", p),) if p is not None else ()))
        raise ValueError("token_attention: q, k and p must hold only 0 and 1 (spikes)")
    return out, h, k_words


@_forward.register_fake
def _(q, k, p, v_threshold, tau, save, backend):
    T, BH, N, d = q.shape
    h = q.new_empty((T, BH, N) if save else (0,), dtype=torch.float32)
    words = q.new_empty((T * BH * N, -(-d // 64)) if save else (0,), dtype=torch.int64)
    return torch.empty_like(q), h, words


@torch.library.custom_op("spikeops::token_attention_backward", mutates_args=())
def _backward_op(
    grad_out: torch.Tensor, k_words: torch.Tensor, h: torch.Tensor, v_threshold: float, tau: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_out [T, BH, N, d], k packed [T*BH*N, ceil(d/64)], H [T, BH, N] -> (dL/dS [T, BH, N] fp32, dL/dk)."""
    return _backend.kernel("token_attention", "token_attention_backward", backend)(grad_out, k_words, h, v_threshold, tau)


@_backward_op.register_fake
def _(grad_out, k_words, h, v_threshold, tau, backend):
    return h.new_empty(h.shape), torch.empty_like(grad_out)


def _setup_context(ctx, inputs, output):
    q, _, p, v_threshold, tau, _, backend = inputs
    ctx.save_for_backward(output[1], output[2])
    ctx.shape, ctx.dtype, ctx.has_p = q.shape, q.dtype, p is not None
    ctx.params = (v_threshold, tau, backend)
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, *_):
    if grad_out is None:
        return (None,) * 7
    h, k_words = ctx.saved_tensors
    if h.numel() == 0:
        raise RuntimeError("spikeops.token_attention: backward through a forward that ran without grad enabled")
    v_threshold, tau, backend = ctx.params
    T, BH, N, d = ctx.shape
    grad_s, grad_k = _backward_op(grad_out.contiguous().to(ctx.dtype), k_words, h, v_threshold, tau, backend)
    # dL/dq = dL/dp = dL/dS broadcast over the channels: an expanded view, as sum's backward gives
    # (autograd copies it into a leaf's .grad; a consumer that needs it dense makes it so).
    grad_q = grad_s.to(ctx.dtype).unsqueeze(-1).expand(T, BH, N, d)
    return grad_q, grad_k, grad_q if ctx.has_p else None, None, None, None, None


torch.library.register_autograd("spikeops::token_attention_forward", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- channels-first layout
# Modules hold q, k, p as [T, B, C, N] (conv1d outputs: a head's d channels before its tokens), so
# their [T, B, H, N, d] heads are transposed views of contiguous [T, B, H, d, N] tensors. The fused
# kernel wants [T, BH, N, d] rows: four transposing copies (q, k, p in, out back) plus two more in
# backward, each several times the cost of the kernel's own pass. In that layout the op is instead
# run in place from strided sums and broadcast products plus the LIF kernels (same neuron code,
# lif_math.h), with the same saved state: H (fp32, one per token) and K as bits (here packed
# along N, the contiguous dim). Spikes are the kernel's bit for bit (exact integer counts, the
# same LIF step, the same A * K products); gradients differ only in the order of dA's sum over c.

def _rows(x: torch.Tensor) -> torch.Tensor:
    """Contiguous ``x`` as ``[R, n]`` rows of whole 64-bit words where it can, else along its last dim."""
    rows = word_rows(x)
    return rows if rows is not None else x.view(-1, x.shape[-1])


def _check_binary_cf(named, backend: str) -> None:
    """ValueError naming the first input that is not 0/1 (the pack kernel's check: one pass each)."""
    for name, x in named:
        if not bool(_pack(_rows(x.detach()), True, backend)[1]):
            raise ValueError(f"token_attention: {name} must hold only 0 and 1 (spikes)")


def _attention_cf(q, k, p, v_threshold: float, tau: float, backend: str, save: bool):
    """q, k, p ``[T, B, H, d, N]`` contiguous fp32 -> (out ``[T, B, H, d, N]``, H ``[T, B*H*N]``)."""
    T = q.shape[0]
    s = q.sum(3)  # counts of 0/1 values: exact integers in fp32, in any summation order
    if p is not None:
        s.add_(p.sum(3))
    a, h = _lif_forward(s.view(T, -1), tau, v_threshold, *ATTENTION_NEURON, save, False, backend)
    return a.view(s.shape).unsqueeze(3) * k, h  # the kernel's A * K, element for element


class _TokenAttentionCF(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, p, v_threshold, tau, backend):
        out, h = _attention_cf(q, k, p, v_threshold, tau, backend, True)
        rows = _rows(k)
        words, binary = _pack(rows, True, backend)
        if not bool(binary):
            raise ValueError("token_attention: k must hold only 0 and 1 (spikes)")
        ctx.save_for_backward(h, words)
        ctx.shape, ctx.n, ctx.has_p, ctx.params = k.shape, rows.shape[1], p is not None, (v_threshold, tau, backend)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        h, words = ctx.saved_tensors
        v_threshold, tau, backend = ctx.params
        T, B, H, d, N = ctx.shape
        needs = ctx.needs_input_grad
        grad_q = grad_k = None
        if needs[0] or needs[2]:
            k = _unpack(words, ctx.n, torch.float32, backend).view(ctx.shape)
            grad_a = (grad_out * k).sum(3)  # dA = sum_c dout * K
            grad_s = _lif_backward(grad_a.view(T, -1), h, tau, v_threshold, *ATTENTION_NEURON, backend)
            # dL/dq = dL/dp = dL/dS broadcast over the channels (an expanded view, as sum's backward gives)
            grad_q = grad_s.view(T, B, H, 1, N).expand(ctx.shape)
        if needs[1]:
            a = (h >= v_threshold).to(grad_out.dtype).view(T, B, H, 1, N)  # the forward's spikes
            grad_k = a * grad_out  # the kernel's A * dout
        return (grad_q if needs[0] else None, grad_k, grad_q if needs[2] and ctx.has_p else None,
                None, None, None)


def _use_cf(named, chosen: str) -> bool:
    """Inputs are plain transposed views of contiguous ``[.., d, N]`` tensors and the C++ kernels
    run (not while torch.compile traces: it takes the custom op)."""
    return chosen == "cpp" and not torch.compiler.is_compiling() and all(
        type(x) is torch.Tensor and x.dtype == torch.float32 and x.numel() > 0 and not x.is_contiguous()
        and x.mT.is_contiguous() for _, x in named)


def _token_attention_cf(named, v_threshold: float, tau: float, backend: str) -> torch.Tensor:
    """token_attention on ``[T, B, H, N, d]`` views of contiguous ``[T, B, H, d, N]`` tensors, no copies."""
    cf = [(name, x.mT) for name, x in named]
    q, k, p = cf[0][1], cf[1][1], cf[2][1] if len(cf) > 2 else None
    if torch.is_grad_enabled() and any(x.requires_grad for _, x in cf):
        _check_binary_cf([cf[0]] + cf[2:], backend)  # k: checked by its packing
        out = _TokenAttentionCF.apply(q, k, p, v_threshold, tau, backend)
    else:
        _check_binary_cf(cf, backend)
        out = _attention_cf(q, k, p, v_threshold, tau, backend, False)[0]
    return out.mT


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
        return reference.token_attention(q, k, p, v_threshold, tau, mode)
    if mode == "channel":  # the same kernel on [.., d, N]: sums over tokens, masks channels
        swap = [x.transpose(-1, -2) for _, x in named]
        out = token_attention(*swap[:2], swap[2] if p is not None else None, v_threshold, tau, "token", chosen)
        return out.transpose(-1, -2)
    if _use_cf(named, chosen):  # e.g. the heads of [T, B, C, N] activations: no transposing copies
        return _token_attention_cf(named, v_threshold, tau, chosen)
    T, B, H, N, d = q.shape
    flat = [x.contiguous().view(T, B * H, N, d) for _, x in named]
    save = torch.is_grad_enabled() and any(x.requires_grad for _, x in named)
    out = _forward(flat[0], flat[1], flat[2] if p is not None else None, v_threshold, tau, save, chosen)[0]
    return out.view(T, B, H, N, d)
