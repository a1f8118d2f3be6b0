"""``QKTokenAttention`` (QKFormer) and ``MultiScaleSpikingAttention`` (MSViT's MSSA) blocks.

Both take spikes ``[T, B, C, N]`` (channels before tokens, as the released code's conv1d
projections) and return spikes of the same shape. Q and K are ``LIF(BN(conv1d_k1(x)))``;
MSSA adds ``P = LIF(BN(conv1d_k3(x)))``, a 3-tap conv along the flattened token sequence. Per
head, :func:`spikeops.token_attention` sums Q (and P) over the head's channels, fires the
attention neuron on that count and masks K; the output is ``LIF(BN(conv1d_k1(.) + b))``.
All convs are :class:`SpikeConv1d` (inputs saved as bits for backward).

Note: the MSViT paper fires the attention neuron at 0.5, but its released code uses 1.0;
``attn_v_threshold`` is a parameter (default 0.5, as QKFormer and the paper).
"""
from __future__ import annotations

import torch
from torch import nn

from spikeops._validation import check_finite, check_float_tensor, check_tau, check_time_major
from spikeops.nn.lif import LIF
from spikeops.nn.spike_layers import SpikeConv1d
from spikeops.ops.batch_norm_lif import batch_norm_lif
from spikeops.ops.known_counts import same_counts
from spikeops.ops.token_attention import token_attention


class ConvBNLIF(nn.Module):
    """``LIF(BN(conv1d(x)))`` on ``[T, B, C_in, N]`` -> spikes ``[T, B, C_out, N]`` (BN over T, B, N).

    The conv is a :class:`SpikeConv1d` (input saved as bits), or a plain ``nn.Conv1d`` with
    ``backend="torch"`` (the eager baseline); the parameters are the same either way."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, bias: bool = False,
                 tau: float = 2.0, backend: str = "auto"):
        super().__init__()
        conv = nn.Conv1d if backend == "torch" else SpikeConv1d
        self.conv = conv(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)
        self.bn = nn.BatchNorm1d(out_channels)
        self.lif = LIF(tau=tau, detach_reset=True, backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B = x.shape[:2]
        y = batch_norm_lif(self.conv(x.flatten(0, 1)), self.bn, self.lif, T)
        return y.view(T, B, *y.shape[1:])


class _TokenAttentionBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, attn_v_threshold: float, p_kernel_size, tau: float, backend: str):
        super().__init__()
        if num_heads <= 0 or dim % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a positive divisor of dim ({dim})")
        attn_v_threshold, tau = check_finite("attn_v_threshold", attn_v_threshold), check_tau(tau)
        self.dim, self.num_heads, self.attn_v_threshold = dim, num_heads, float(attn_v_threshold)
        self.tau, self.backend = float(tau), backend
        self.q = ConvBNLIF(dim, dim, 1, tau=tau, backend=backend)
        self.k = ConvBNLIF(dim, dim, 1, tau=tau, backend=backend)
        self.p = ConvBNLIF(dim, dim, p_kernel_size, tau=tau, backend=backend) if p_kernel_size else None
        self.proj = ConvBNLIF(dim, dim, 1, bias=True, tau=tau, backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: spikes ``[T, B, C, N]`` -> spikes ``[T, B, C, N]``."""
        check_float_tensor("x", x)
        if x.dim() != 4 or x.shape[2] != self.dim:
            raise ValueError(f"x must be [T, B, C={self.dim}, N], got shape {tuple(x.shape)}")
        check_time_major("x", x)
        T, B, C, N = x.shape

        def heads(t):  # [T, B, C, N] -> [T, B, H, N, d]
            return t.view(T, B, self.num_heads, C // self.num_heads, N).transpose(-1, -2)

        p = heads(self.p(x)) if self.p is not None else None
        a = token_attention(heads(self.q(x)), heads(self.k(x)), p, v_threshold=self.attn_v_threshold,
                            tau=self.tau, backend=self.backend)
        return self.proj(same_counts(a, a.transpose(-1, -2).reshape(T, B, C, N)))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, attn_v_threshold={self.attn_v_threshold}"


class QKTokenAttention(_TokenAttentionBlock):
    """QKFormer's Q-K token attention block: ``[T, B, C, N]`` spikes -> ``[T, B, C, N]`` spikes."""

    def __init__(self, dim: int, num_heads: int, attn_v_threshold: float = 0.5, tau: float = 2.0, backend: str = "auto"):
        super().__init__(dim, num_heads, attn_v_threshold, None, tau, backend)


class MultiScaleSpikingAttention(_TokenAttentionBlock):
    """MSViT's multi-scale spiking attention (MSSA): ``[T, B, C, N]`` spikes -> ``[T, B, C, N]`` spikes.

    ``p_kernel_size``: the P branch's conv1d kernel along tokens (3 in MSViT; odd).
    """

    def __init__(self, dim: int, num_heads: int, attn_v_threshold: float = 0.5, p_kernel_size: int = 3,
                 tau: float = 2.0, backend: str = "auto"):
        if isinstance(p_kernel_size, bool) or not isinstance(p_kernel_size, int) or p_kernel_size < 1 or \
                p_kernel_size % 2 == 0:
            raise ValueError(f"p_kernel_size must be a positive odd number, got {p_kernel_size}")
        super().__init__(dim, num_heads, attn_v_threshold, p_kernel_size, tau, backend)
