"""``SpikingSelfAttention``: Spikformer's SSA block from spikeops layers and the fused ``ssa`` op."""
from __future__ import annotations

import torch
from torch import nn

from spikeops._validation import check_finite, check_float_tensor, check_tau, check_time_major
from spikeops.nn.lif import LIF
from spikeops.nn.spike_layers import SpikeLinear
from spikeops.ops.batch_norm_lif import batch_norm_lif
from spikeops.ops.known_counts import same_counts
from spikeops.ops.ssa import ssa

LAYOUTS = ("tbnc", "tbcn")


class SpikeLinearBNLIF(nn.Module):
    """``LIF(BN(x W^T + b))`` on ``[T, B, N, C_in]`` -> spikes ``[T, B, N, C_out]``.

    BatchNorm statistics are shared over T, B and N (BatchNorm1d on the flattened
    ``[T*B*N, C]`` tensor), as in Spikformer. Backward keeps the input compactly (bits for
    spikes, :class:`SpikeLinear`) and one float per output neuron and step
    (:func:`spikeops.ops.batch_norm_lif.batch_norm_lif`); with ``backend="torch"`` it is the
    plain ``lif(bn(linear(x)))`` of eager PyTorch.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, tau: float = 2.0,
                 v_threshold: float = 1.0, backend: str = "auto"):
        super().__init__()
        self.linear = (nn.Linear if backend == "torch" else SpikeLinear)(in_features, out_features, bias=bias)
        self.bn = nn.BatchNorm1d(out_features)
        self.lif = LIF(tau=tau, v_threshold=v_threshold, detach_reset=True, backend=backend)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return batch_norm_lif(y.reshape(-1, y.shape[-1]), self.bn, self.lif, y.shape[0]).view(y.shape)


class SpikingSelfAttention(nn.Module):
    """Spikformer's Spiking Self-Attention block.

    ``Q, K, V = LIF(BN(X W_{q,k,v}))``, split into ``num_heads`` heads of ``d = dim / num_heads``;
    ``A = LIF_{attn_v_threshold}(scale * Q K^T V)`` by the fused :func:`spikeops.ssa`; output
    ``LIF(BN(A W_o + b_o))``. The projections are :class:`SpikeLinear` (inputs saved as bits),
    the neurons :class:`spikeops.nn.LIF` (tau 2, v_reset 0, detach_reset, sigmoid surrogate).

    Args:
        dim: channels C; num_heads must divide it.
        layout: ``"tbnc"`` for input/output ``[T, B, N, C]`` (tokens, channels last) or ``"tbcn"``
            for ``[T, B, C, N]`` (the layout of Spikformer's CIFAR code with conv1d k=1 projections;
            the weights are the same as a Linear's).
        qkv_bias: bias in the q/k/v projections (Spikformer: False). The output projection has one.
    """

    def __init__(self, dim: int, num_heads: int, scale: float = 0.125, attn_v_threshold: float = 0.5,
                 qkv_bias: bool = False, layout: str = "tbnc", tau: float = 2.0, backend: str = "auto"):
        super().__init__()
        if num_heads <= 0 or dim % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a positive divisor of dim ({dim})")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        scale, tau = check_finite("scale", scale), check_tau(tau)
        attn_v_threshold = check_finite("attn_v_threshold", attn_v_threshold)
        self.dim, self.num_heads, self.scale, self.layout = dim, num_heads, float(scale), layout
        self.attn_v_threshold, self.tau, self.backend = float(attn_v_threshold), float(tau), backend
        self.q = SpikeLinearBNLIF(dim, dim, bias=qkv_bias, tau=tau, backend=backend)
        self.k = SpikeLinearBNLIF(dim, dim, bias=qkv_bias, tau=tau, backend=backend)
        self.v = SpikeLinearBNLIF(dim, dim, bias=qkv_bias, tau=tau, backend=backend)
        self.proj = SpikeLinearBNLIF(dim, dim, bias=True, tau=tau, backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: spikes ``[T, B, N, C]`` (``[T, B, C, N]`` for layout "tbcn") -> spikes, same shape."""
        check_float_tensor("x", x)
        if x.dim() != 4:
            raise ValueError(f"x must be 4-d ({'[T, B, N, C]' if self.layout == 'tbnc' else '[T, B, C, N]'}), got {tuple(x.shape)}")
        check_time_major("x", x)
        if self.layout == "tbcn":
            x = x.transpose(2, 3)
        T, B, N, C = x.shape
        if C != self.dim:
            raise ValueError(f"x has {C} channels, expected dim={self.dim}")
        heads = [branch(x).view(T, B, N, self.num_heads, C // self.num_heads).transpose(2, 3)
                 for branch in (self.q, self.k, self.v)]
        a = ssa(*heads, scale=self.scale, v_threshold=self.attn_v_threshold, tau=self.tau, backend=self.backend)
        out = self.proj(same_counts(a, a.transpose(2, 3).reshape(T, B, N, C)))
        return out.transpose(2, 3) if self.layout == "tbcn" else out

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, scale={self.scale}, attn_v_threshold={self.attn_v_threshold}, layout={self.layout!r}"


class SpikingMLP(nn.Module):
    """Spikformer's MLP: ``LIF(BN(fc2(LIF(BN(fc1(x))))))`` on ``[T, B, N, C]`` -> ``[T, B, N, C_out]``."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int = None, tau: float = 2.0,
                 backend: str = "auto"):
        super().__init__()
        out_features = out_features or in_features
        for name, value in (("in_features", in_features), ("hidden_features", hidden_features),
                            ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.in_features = in_features
        self.fc1 = SpikeLinearBNLIF(in_features, hidden_features, bias=True, tau=tau, backend=backend)
        self.fc2 = SpikeLinearBNLIF(hidden_features, out_features, bias=True, tau=tau, backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_float_tensor("x", x)
        if x.dim() != 4 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must be [T, B, N, C={self.in_features}], got shape {tuple(x.shape)}")
        check_time_major("x", x)
        return self.fc2(self.fc1(x))
