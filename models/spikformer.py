"""Spikformer (V1, ICLR 2023): Spiking Patch Splitting stem + Spikformer encoder blocks.

SPS: four ``conv3x3 -> BN -> LIF`` stages with channels ``in -> D/8 -> D/4 -> D/2 -> D``, a
``MaxPool2d(3, 2, 1)`` on the spikes after the stages in ``pool_after`` (CIFAR: the last two,
32 -> 8; ImageNet / DVS: all four, 224 -> 14 and 128 -> 8), then the relative position embedding
``x = x + LIF(BN(conv3x3(x)))``. Tokens ``[T, B, N, D]`` go through ``depth`` blocks
(:class:`~spikeops.models.layers.SpikformerBlock`) and a mean-over-tokens-and-time Linear head.

The reference code also builds two LayerNorms per block that its forward never calls; they are
not built here (CIFAR 4-384: 9,324,730 parameters vs the reported 9,330,874, -0.07%).
"""
from __future__ import annotations

import torch
from torch import nn

import spikeops.nn as snn
from spikeops.models.layers import (ConvBNLIF2d, SpikformerBlock, TokenHead, channels_last_frames, check_config,
                                    time_major_images)
from spikeops.models.registry import register_model
from spikeops.ops.known_counts import add_counts, same_counts


class SpikingPatchSplitting(nn.Module):
    """SPS: images ``[T, B, C, H, W]`` -> tokens ``[T, B, N, D]`` with ``N = (H/s)(W/s)``,
    ``s = 2**len(pool_after)``."""

    def __init__(self, in_channels: int, dim: int, pool_after=(2, 3), backend: str = "auto"):
        super().__init__()
        widths = [in_channels, dim // 8, dim // 4, dim // 2, dim]
        self.stages = nn.ModuleList(
            ConvBNLIF2d(widths[i], widths[i + 1], 3, 1, 1, spikes_in=i > 0, backend=backend) for i in range(4))
        self.pool_after = tuple(pool_after)
        self.pool = (nn.MaxPool2d if backend == "torch" else snn.SpikeMaxPool2d)(kernel_size=3, stride=2, padding=1)
        self.rpe = ConvBNLIF2d(dim, dim, 3, 1, 1, backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = channels_last_frames(x)
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.pool_after:
                y = self.pool(x.flatten(0, 1))
                x = y.view(*x.shape[:2], *y.shape[1:])
        x = add_counts(x, self.rpe(x))
        # [T, B, D, H', W'] -> [T, B, N, D], laid out as such: a transposed view here would make every
        # residual sum after it transposed too (elementwise ops keep their input's layout), and each
        # projection would copy its input to contiguous, forward and backward
        return same_counts(x, x.flatten(3).transpose(2, 3).contiguous())


class Spikformer(nn.Module):
    """Spikformer V1: images ``[B, C, H, W]`` (repeated T times) or frames ``[T, B, C, H, W]`` ->
    logits ``[B, num_classes]``.

    Args:
        dim, depth, num_heads: width D, number of blocks L, attention heads.
        pool_after: SPS stages followed by a max-pool (the patch grid is ``2**len(pool_after)``).
        scale: the SSA scale (0.125; 0.25 for the DVS model). mlp_ratio: MLP hidden width / D.
        qkv_bias: bias in the q/k/v projections (the reported CIFAR and ImageNet counts include it).
        backend: spikeops backend for every layer ("torch" = the eager PyTorch baseline).
    """

    def __init__(self, dim: int = 384, depth: int = 4, num_heads: int = 12, num_classes: int = 10,
                 img_size: int = 32, in_channels: int = 3, T: int = 4, pool_after=(2, 3), scale: float = 0.125,
                 mlp_ratio: float = 4.0, qkv_bias: bool = False, backend: str = "auto"):
        super().__init__()
        if dim % 8 or dim % num_heads:
            raise ValueError(f"Spikformer: dim={dim} must be divisible by 8 and by num_heads={num_heads}")
        self.grid = 2 ** len(pool_after)
        check_config(img_size, self.grid, T, "Spikformer")
        self.T, self.in_channels, self.img_size, self.backend = T, in_channels, img_size, backend
        self.patch_embed = SpikingPatchSplitting(in_channels, dim, pool_after, backend)
        self.blocks = nn.ModuleList(
            SpikformerBlock(dim, num_heads, mlp_ratio, scale, qkv_bias, backend) for _ in range(depth))
        self.head = TokenHead(dim, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> the last block's tokens ``[T, B, N, D]``."""
        x = self.patch_embed(time_major_images(x, self.T, self.in_channels, self.grid, type(self).__name__))
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def _spikformer(defaults: dict, overrides: dict) -> Spikformer:
    return Spikformer(**{**defaults, **overrides})


_CIFAR = dict(num_classes=10, img_size=32, T=4, pool_after=(2, 3), qkv_bias=True)
_IMAGENET = dict(num_classes=1000, img_size=224, T=4, pool_after=(0, 1, 2, 3), qkv_bias=True)

for _name, _cfg in {
    "spikformer_cifar_4_384": dict(_CIFAR, dim=384, depth=4, num_heads=12),
    "spikformer_cifar_4_256": dict(_CIFAR, dim=256, depth=4, num_heads=16),
    "spikformer_cifar_2_384": dict(_CIFAR, dim=384, depth=2, num_heads=12),
    "spikformer_8_384": dict(_IMAGENET, dim=384, depth=8, num_heads=12),
    "spikformer_8_512": dict(_IMAGENET, dim=512, depth=8, num_heads=8),
    "spikformer_10_512": dict(_IMAGENET, dim=512, depth=10, num_heads=8),
    "spikformer_8_768": dict(_IMAGENET, dim=768, depth=8, num_heads=12),
    "spikformer_dvs_2_256": dict(num_classes=10, img_size=128, in_channels=2, T=16, pool_after=(0, 1, 2, 3),
                                 dim=256, depth=2, num_heads=16, scale=0.25),
}.items():
    register_model(_name)(lambda _cfg=_cfg, **overrides: _spikformer(_cfg, overrides))
