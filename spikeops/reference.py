"""Plain-PyTorch ground truth for every spikeops op.

These functions are the specification: the C++ and Triton kernels must give the same spikes
bit for bit (in float32) and the same gradients to tight tolerances. They run on any device and
in float64 (for ``gradcheck``), and are differentiated by ordinary autograd. ``backend="torch"``
runs them.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

SURROGATES = ("sigmoid", "atan")
DEFAULT_ALPHA = {"sigmoid": 4.0, "atan": 2.0}


def surrogate_grad(d: torch.Tensor, surrogate: str, alpha: float) -> torch.Tensor:
    """dS/dH of the spike S = Heaviside(d), d = H - v_threshold (SpikingJelly's formulas).

    sigmoid: ``alpha * sig(alpha d) * (1 - sig(alpha d))``, written as
    ``alpha * e / (1 + e)^2`` with ``e = exp(-|alpha d|)`` (same value, no cancellation);
    atan: ``alpha / 2 / (1 + (pi/2 * alpha * d)^2)``.
    """
    if surrogate == "sigmoid":
        e = torch.exp(-(alpha * d).abs())
        return alpha * e / ((1.0 + e) * (1.0 + e))
    if surrogate == "atan":
        return alpha / 2.0 / (1.0 + (math.pi / 2.0 * alpha * d) ** 2)
    raise ValueError(f"surrogate must be one of {SURROGATES}, got {surrogate!r}")


class _Heaviside(torch.autograd.Function):
    """S = (d >= 0) forward; surrogate gradient backward."""

    @staticmethod
    def forward(ctx, d, surrogate, alpha):
        ctx.save_for_backward(d)
        ctx.surrogate, ctx.alpha = surrogate, alpha
        return (d >= 0).to(d.dtype)

    @staticmethod
    def backward(ctx, grad):
        (d,) = ctx.saved_tensors
        return grad * surrogate_grad(d, ctx.surrogate, ctx.alpha), None, None


def lif(
    x_seq: torch.Tensor,
    tau: float = 2.0,
    v_threshold: float = 1.0,
    v_reset: Optional[float] = 0.0,
    decay_input: bool = True,
    detach_reset: bool = True,
    surrogate: str = "sigmoid",
    alpha: Optional[float] = None,
) -> torch.Tensor:
    """Multi-step LIF neuron, x_seq ``[T, ...]`` -> spikes ``[T, ...]`` (x_seq's dtype, 0./1.).

    State is float32 (float64 for float64 input); see :func:`spikeops.lif` for the equations.
    """
    if alpha is None:
        alpha = DEFAULT_ALPHA[surrogate]
    compute = torch.float64 if x_seq.dtype == torch.float64 else torch.float32
    x = x_seq.to(compute)
    r = 0.0 if v_reset is None else v_reset
    v = torch.full_like(x[0], r)
    spikes = []
    for x_t in x:
        if decay_input:
            h = v + (x_t - (v - r)) / tau
        else:
            h = v - (v - r) / tau + x_t
        s = _Heaviside.apply(h - v_threshold, surrogate, alpha)
        s_reset = s.detach() if detach_reset else s
        if v_reset is None:
            v = h - s_reset * v_threshold
        else:
            v = s_reset * v_reset + (1.0 - s_reset) * h
        spikes.append(s)
    return torch.stack(spikes).to(x_seq.dtype)


# --------------------------------------------------------------------------------------------
# Bit-packed spikes: 64 spikes per int64 word, little-endian bit order (element 64*w + j is
# bit j of word w), zero padding up to a whole word.

WORD_BITS = 64


def is_binary(x: torch.Tensor) -> bool:
    """True when every element of x is 0 or 1."""
    return bool(((x == 0) | (x == 1)).all())


def to_counts(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(``x`` cast to uint8, whether every value of ``x`` is an integer in 0..255 and so survives
    the round trip): the uint8 form :func:`spikeops.ops.compact.compact` keeps of small counts."""
    counts = x.to(torch.uint8)
    return counts, torch.equal(counts.to(x.dtype), x)


def pack_spikes(x: torch.Tensor) -> torch.Tensor:
    """Pack 0/1 values along the last dim: ``[..., n]`` -> int64 words ``[..., ceil(n/64)]``."""
    n = x.shape[-1]
    words = -(-n // WORD_BITS)
    bits = torch.zeros(*x.shape[:-1], words * WORD_BITS, dtype=torch.uint8, device=x.device)
    bits[..., :n] = x != 0
    weights = (1 << torch.arange(8, device=x.device)).to(torch.uint8)
    as_bytes = (bits.view(*x.shape[:-1], words * 8, 8) * weights).sum(-1, dtype=torch.uint8)
    return as_bytes.view(torch.int64)


def unpack_spikes(words: torch.Tensor, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`pack_spikes`: int64 words ``[..., W]`` -> 0./1. ``[..., n]`` of ``dtype``."""
    as_bytes = words.contiguous().view(torch.uint8)
    shifts = torch.arange(8, device=words.device, dtype=torch.uint8)
    bits = (as_bytes.unsqueeze(-1) >> shifts) & 1
    return bits.view(*words.shape[:-1], -1)[..., :n].to(dtype)


# --------------------------------------------------------------------------------------------
# Spike products and Spiking Self-Attention


def spike_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a [..., M, K] @ b [..., K, N]`` of 0/1 tensors as exact int32 counts."""
    return (a.double() @ b.double()).round().to(torch.int32)


def ssa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float = 0.125,
    v_threshold: float = 0.5,
    tau: float = 2.0,
) -> torch.Tensor:
    """Spikformer's spiking self-attention: ``LIF(scale * Q K^T V)`` over T.

    q, k, v: spikes ``[T, B, H, N, d]``. The product is an exact integer in float32 (either
    association gives it); the attention neuron has v_reset=0, decay_input, detach_reset and
    the sigmoid surrogate (alpha 4), as in Spikformer. Returns spikes ``[T, B, H, N, d]``.
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qc, kc, vc = q.to(compute), k.to(compute), v.to(compute)
    y = (qc @ (kc.transpose(-2, -1) @ vc)) * scale
    return lif(y, tau=tau, v_threshold=v_threshold, v_reset=0.0, decay_input=True, detach_reset=True).to(q.dtype)


ATTENTION_MODES = ("token", "channel")


def token_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    p: Optional[torch.Tensor] = None,
    v_threshold: float = 0.5,
    tau: float = 2.0,
    mode: str = "token",
) -> torch.Tensor:
    """QKFormer's Q-K attention (``p=None``) / MSViT's MSSA (with ``p``), spikes ``[T, B, H, N, d]``.

    ``mode="token"``: per token, ``S = sum_c Q (+ sum_c P)`` over the head's d channels, a
    ``[T, B, H, N, 1]`` mask ``A = LIF(S)``; ``mode="channel"``: sums over the N tokens, a
    ``[T, B, H, 1, d]`` mask. Returns ``A * K`` (broadcast). The attention neuron has v_reset 0,
    decay_input, detach_reset and the sigmoid surrogate (alpha 4).
    """
    axis = -1 if mode == "token" else -2
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = q.to(compute).sum(axis, keepdim=True)
    if p is not None:
        s = s + p.to(compute).sum(axis, keepdim=True)
    a = lif(s, tau=tau, v_threshold=v_threshold, v_reset=0.0, decay_input=True, detach_reset=True)
    return (a * k.to(compute)).to(q.dtype)


# --------------------------------------------------------------------------------------------
# Masked (sparse) convolution and BatchNorm for masked pre-training of the Spiking Convolutional
# Stem (Spikformer V2; SparK-style): the mask [Nm, 1, h, w] marks visible cells; at a layer of
# resolution H x W each cell is an (H/h) x (W/w) block (nearest upsampling). With time folded
# into the batch (n = t * Nm + b, time-major), one mask serves all T steps.


def upsample_mask(mask: torch.Tensor, n: int, size) -> torch.Tensor:
    """``mask`` ``[Nm, 1, h, w]`` or ``[Nm, h, w]`` (bool or 0/1) -> bool ``[n, 1, H, W]``: each
    cell repeated over an (H/h) x (W/w) block, the batch repeated n / Nm times (time-major)."""
    m = mask if mask.dtype == torch.bool else mask != 0
    if m.dim() == 3:
        m = m.unsqueeze(1)
    H, W = size
    m = m.repeat_interleave(H // m.shape[-2], dim=2).repeat_interleave(W // m.shape[-1], dim=3)
    return m.repeat(n // m.shape[0], 1, 1, 1)


def masked_conv2d_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride=1,
    padding=0,
) -> torch.Tensor:
    """Dense ``conv2d(x, weight, bias, stride, padding)`` times the mask upsampled to the output:
    masked output positions are exactly 0 (SparK's ``SparseConv2d``), even for non-finite x."""
    out = torch.nn.functional.conv2d(x, weight, bias, stride, padding)
    visible = upsample_mask(mask, out.shape[0], out.shape[-2:])
    return torch.where(visible, out, torch.zeros((), dtype=out.dtype, device=out.device))  # 0, also where out is NaN


def masked_batch_norm2d_reference(
    x: torch.Tensor,
    mask: torch.Tensor,
    running_mean: Optional[torch.Tensor] = None,
    running_var: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Gather the visible positions of ``x`` ``[N, C, H, W]`` into ``[P, C]``, BatchNorm1d them
    (``F.batch_norm``: batch statistics and running-stat updates over the P visible positions
    only), scatter back into zeros: masked outputs are exactly 0 (SparK's ``SparseBatchNorm2d``)."""
    m = upsample_mask(mask, x.shape[0], x.shape[-2:])[:, 0]  # [N, H, W]
    nhwc = x.permute(0, 2, 3, 1)
    y = torch.nn.functional.batch_norm(nhwc[m], running_mean, running_var, weight, bias, training, momentum, eps)
    return torch.zeros_like(nhwc).index_put((m,), y).permute(0, 3, 1, 2)
