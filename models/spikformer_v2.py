"""Spikformer V2: Spiking Convolutional Stem (SCS) + Spikformer encoder blocks.

SCS (as derived in papers.md from the paper's parameter table; no public code): four blocks with
channels ``C_i in {D/8, D/4, D/2, D}``; block i is

    conv2x2/s2 C_{i-1} -> C_i, BN, LIF;  conv3x3 C_i -> 4 C_i, BN, LIF;  conv3x3 4 C_i -> C_i, BN, LIF

(all convs without bias, no max-pool, no relative position embedding), so images
``[T, B, C, H, W]`` become tokens ``[T, B, (H/16)(W/16), D]``. The transformer blocks and head are
those of Spikformer V1 on ImageNet. For masked pre-training (:class:`~spikeops.models.MaskedPretrainer`)
the stem's convs/BNs are swapped for :class:`spikeops.nn.MaskedConv2d` / ``MaskedBatchNorm2d``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from spikeops.models.layers import ConvBNLIF2d, SpikformerBlock, TokenHead, check_config, time_major_images
from spikeops.models.registry import register_model
from spikeops.ops.known_counts import same_counts


class SpikingConvStem(nn.Module):
    """SCS: images ``[T, B, C, H, W]`` -> feature map ``[T, B, D, H/16, W/16]`` (spikes)."""

    def __init__(self, in_channels: int, dim: int, expansion: int = 4, backend: str = "auto"):
        super().__init__()
        widths = [in_channels, dim // 8, dim // 4, dim // 2, dim]
        self.blocks = nn.ModuleList(
            nn.Sequential(
                ConvBNLIF2d(widths[i], widths[i + 1], 2, 2, 0, spikes_in=i > 0, backend=backend),
                ConvBNLIF2d(widths[i + 1], expansion * widths[i + 1], 3, 1, 1, backend=backend),
                ConvBNLIF2d(expansion * widths[i + 1], widths[i + 1], 3, 1, 1, backend=backend),
            ) for i in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class SpikformerV2(nn.Module):
    """Spikformer V2: images ``[B, C, H, W]`` (repeated T times) or ``[T, B, C, H, W]`` -> logits
    ``[B, num_classes]``. ``H`` and ``W`` must be multiples of 16.

    :meth:`forward_features` takes ``keep`` (``[B, N_vis]`` token indices) to run the blocks on
    the visible tokens only, as masked pre-training does.
    """

    grid = 16

    def __init__(self, dim: int = 512, depth: int = 8, num_heads: int = 8, num_classes: int = 1000,
                 img_size: int = 224, in_channels: int = 3, T: int = 4, mlp_ratio: float = 4.0,
                 scale: float = 0.125, qkv_bias: bool = False, backend: str = "auto"):
        super().__init__()
        if dim % 8 or dim % num_heads:
            raise ValueError(f"SpikformerV2: dim={dim} must be divisible by 8 and by num_heads={num_heads}")
        check_config(img_size, self.grid, T, "SpikformerV2")
        self.dim, self.T, self.in_channels, self.img_size, self.backend = dim, T, in_channels, img_size, backend
        self.stem = SpikingConvStem(in_channels, dim, backend=backend)
        self.blocks = nn.ModuleList(
            SpikformerBlock(dim, num_heads, mlp_ratio, scale, qkv_bias, backend) for _ in range(depth))
        self.head = TokenHead(dim, num_classes)

    def forward_features(self, x: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Images -> tokens ``[T, B, N, D]`` after the last block (``N = N_vis`` with ``keep``)."""
        x = self.stem(time_major_images(x, self.T, self.in_channels, self.grid, type(self).__name__))
        # [T, B, D, h, w] -> [T, B, N, D] laid out as such (as Spikformer's SPS: a transposed view would
        # make every residual sum transposed too, and every projection copy its input to contiguous)
        x = same_counts(x, x.flatten(3).transpose(2, 3).contiguous())
        if keep is not None:
            x = same_counts(x, torch.gather(x, 2, keep[None, :, :, None].expand(x.shape[0], -1, -1, x.shape[3])))
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


_IMAGENET = dict(num_classes=1000, img_size=224, T=4)

for _name, _cfg in {
    "spikformer_v2_8_384": dict(dim=384, depth=8, num_heads=12),
    "spikformer_v2_8_512": dict(dim=512, depth=8, num_heads=8),
    "spikformer_v2_12_512": dict(dim=512, depth=12, num_heads=8),
    "spikformer_v2_12_768": dict(dim=768, depth=12, num_heads=12),
    "spikformer_v2_16_768": dict(dim=768, depth=16, num_heads=12),
}.items():
    register_model(_name)(lambda _cfg=_cfg, **overrides: SpikformerV2(**{**_IMAGENET, **_cfg, **overrides}))
