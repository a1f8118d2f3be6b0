"""Building blocks shared by the Spikformer-family models.

Tensors are time-major: images ``[T, B, C, H, W]``, tokens ``[T, B, N, C]``. BatchNorm runs
over the flattened ``[T*B, ...]`` tensor (statistics shared across time steps), every neuron is
``spikeops.nn.LIF(tau=2, v_threshold=1, v_reset=0, detach_reset=True, sigmoid surrogate)``.

``backend`` is passed to every spikeops layer. ``backend="torch"`` builds the eager baseline:
plain ``nn.Conv2d``/``nn.Linear`` layers (autograd keeps fp32 inputs) and the reference ops of
:mod:`spikeops.reference`; the parameters and state_dict keys are the same as with the kernels.
"""
from __future__ import annotations

import torch
from torch import nn

import spikeops.nn as snn
from spikeops.ops.batch_norm_lif import batch_norm_lif
from spikeops.ops.known_counts import add_counts


def conv2d(backend: str, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
           padding: int = 0, bias: bool = False, spikes_in: bool = True) -> nn.Conv2d:
    """A Conv2d for ``backend``: :class:`spikeops.nn.SpikeConv2d` (saves its spike input as bits)
    when the input is spikes and the kernels are on, else ``nn.Conv2d``."""
    cls = snn.SpikeConv2d if spikes_in and backend != "torch" else nn.Conv2d
    return cls(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)


class ConvBNLIF2d(nn.Module):
    """``LIF(BN(conv2d(x)))``: ``[T, B, C_in, H, W]`` -> spikes ``[T, B, C_out, H', W']``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 1, spikes_in: bool = True, backend: str = "auto"):
        super().__init__()
        self.conv = conv2d(backend, in_channels, out_channels, kernel_size, stride, padding, spikes_in=spikes_in)
        self.bn = nn.BatchNorm2d(out_channels)
        self.lif = snn.LIF(tau=2.0, detach_reset=True, backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B = x.shape[:2]
        y = batch_norm_lif(self.conv(x.flatten(0, 1)), self.bn, self.lif, T)
        return y.view(T, B, *y.shape[1:])


class SpikformerBlock(nn.Module):
    """``x = x + SSA(x); x = x + MLP(x)`` on tokens ``[T, B, N, C]`` (Spikformer's encoder block).

    After the first block the input is a small non-negative integer tensor (residual sums of
    spikes), not 0/1; the projections save it as uint8 for backward."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, scale: float = 0.125,
                 qkv_bias: bool = False, backend: str = "auto"):
        super().__init__()
        self.attn = snn.SpikingSelfAttention(dim, num_heads, scale=scale, qkv_bias=qkv_bias, backend=backend)
        self.mlp = snn.SpikingMLP(dim, int(dim * mlp_ratio), backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = add_counts(x, self.attn(x))  # a sum of spikes, known so (see spikeops.ops.known_counts)
        return add_counts(x, self.mlp(x))


class TokenHead(nn.Module):
    """Classifier: mean over tokens and time, then Linear. ``[T, B, N, C]`` -> logits ``[B, classes]``."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(0, 2)))


def channels_last_frames(x: torch.Tensor) -> torch.Tensor:
    """Frames ``[T, B, C, H, W]``, each laid out channels-last (C innermost) on CPU; as they are elsewhere.

    On CPU oneDNN runs bf16 convolutions in NHWC: with NCHW tensors each one copied its input and
    output, and in backward their gradients, between the two layouts (8.3 ms for one
    [64, 192, 32, 32] on the 2-core VM). The layers after a channels-last convolution keep its
    layout (BatchNorm+LIF, max pooling, the LIF, the residual sum), so the stem runs without those
    copies; Spikformer's CIFAR training step took 0.80-0.96x the time with it in bf16 and 0.84-0.98x
    in fp32, with either backend (BENCHMARKS.md, stop 26). Not on CUDA: there the fused
    BatchNorm+LIF takes channels-last input through the two modules only (see
    :func:`spikeops.ops.batch_norm_lif.batch_norm_lif`)."""
    if x.device.type != "cpu":
        return x
    return x.flatten(0, 1).contiguous(memory_format=torch.channels_last).view(x.shape)


def time_major_images(x: torch.Tensor, T: int, in_channels: int, grid: int, where: str) -> torch.Tensor:
    """Images ``[B, C, H, W]`` (repeated T times) or event frames ``[T', B, C, H, W]`` -> ``[T, B, C, H, W]``.

    Raises ``ValueError`` for a wrong rank, channel count, or H/W not divisible by ``grid``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: x must be a tensor [B, C, H, W] or [T, B, C, H, W], got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{where}: x must be a floating-point tensor (images scaled to floats), got {x.dtype}; "
                        "convert it with x.float() / 255")
    if x.dim() == 4:
        x = x.unsqueeze(0).expand(T, *x.shape)
    elif x.dim() != 5:
        raise ValueError(f"{where}: x must be [B, C, H, W] images or [T, B, C, H, W] frames, got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{where}: x must have at least one time step and one sample, got shape {tuple(x.shape)}")
    if x.shape[2] != in_channels:
        raise ValueError(f"{where}: x has {x.shape[2]} channels, the model was built with in_channels={in_channels}")
    if x.shape[-1] == 0 or x.shape[-2] == 0 or x.shape[-1] % grid or x.shape[-2] % grid:
        raise ValueError(f"{where}: image size {tuple(x.shape[-2:])} must be a positive multiple of {grid} (the patch grid)")
    return x


def check_config(img_size: int, grid: int, T: int, where: str) -> None:
    """Raise ``ValueError`` unless ``img_size`` is a positive multiple of ``grid`` and ``T >= 1``."""
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"{where}: T (time steps) must be a positive int, got {T!r}")
    if img_size <= 0 or img_size % grid:
        raise ValueError(f"{where}: img_size={img_size} must be a positive multiple of {grid} (the patch grid)")
