"""MSViT and QKFormer: hierarchical spiking transformers with token attention.

Both are the same three-stage hierarchy (QKFormer, Zhou et al. 2024; MSViT, seed 004); they
differ in the stage 1-2 attention and in the stage-1 width:

=========  ===========================  ==============================  ==================
model      stage 1 / 2 / 3 width        stage 1-2 attention             stage 3 attention
=========  ===========================  ==============================  ==================
MSViT      D/2, D/2, D                  MSSA (Q, P = conv1d k3, K)      SSA (Spikformer)
QKFormer   D/4, D/2, D                  Q-K token attention (Q, K)      SSA (Spikformer)
=========  ===========================  ==============================  ==================

Layout (tensors are time-major; BatchNorm runs over the flattened ``[T*B, ...]`` tensor, so
its statistics are shared across time steps; every neuron is ``spikeops.nn.LIF(tau=2,
v_threshold=1, v_reset=0, detach_reset=True)`` except the attention neurons):

* **Patch embedding 1** (the stem), images ``[T, B, C_in, H, W]`` -> ``[T, B, w1, H/s, W/s]``.
  Two ``conv3x3 -> BN -> LIF`` units ``C_in -> w1/2 -> w1``, the second's output summed with a
  shortcut ``conv1x1 -> BN -> LIF`` (``w1/2 -> w1``) taken from the first unit's spikes.
  ImageNet-style (patch grid 16): each unit max-pools (3x3, stride 2) between BN and LIF, a third
  unit ``conv3x3 w1 -> w1`` follows, and the shortcut has stride 2 (``s = 4``). CIFAR-style
  (patch grid 4): no pooling, stride-1 shortcut (``s = 1``).
* **Stage 1**: ``depths[0]`` token-attention blocks at width w1.
* **Patch embedding 2 / 3**, ``[T, B, c_in, h, w]`` -> ``[T, B, c_out, h/2, w/2]``: two
  ``conv3x3 -> BN -> LIF`` units ``c_in -> c_out -> c_out`` with one 3x3/2 max-pool between BN
  and LIF (ImageNet-style: in the first unit; CIFAR-style: in the second), plus a shortcut
  ``conv1x1 stride 2 -> BN -> LIF`` (``c_in -> c_out``) from the stage input; the two are summed.
* **Stage 2**: ``depths[1]`` token-attention blocks at width w2 (``h/2 x w/2`` tokens).
* **Stage 3**: ``depths[2]`` Spikformer SSA blocks at width D (``h/4 x w/4`` tokens).
* **Head**: mean over tokens and time steps, ``Linear(D, num_classes)``.

Every block is ``x = x + attn(x); x = x + mlp(x)`` with the MLP ``LIF(BN(fc2(LIF(BN(fc1 x)))))``,
hidden width ``mlp_ratio * dim`` (4), biases in fc1/fc2. Block inputs after the first residual
sum are small non-negative integers, not 0/1 (the spikeops layers save them as uint8).

Deliberate differences from the released code:

* The released stage-3 SSA applies its output ``proj_lif`` to a ``[T*B, C, N]`` tensor, so that
  neuron's "time" axis runs over samples and time steps mixed. Here it runs over T for each
  sample (:class:`spikeops.nn.SpikingSelfAttention`, correct ``[T, B, ...]`` semantics).
* The attention neurons fire at ``attn_v_threshold`` (default 0.5, as QKFormer's code and the
  MSViT paper). MSViT's released code builds them with a helper that ignores the threshold, so
  they fire at 1.0 there (both MSSA and SSA); pass ``attn_v_threshold=1.0`` to reproduce it.
* The reference models' timm/LayerNorm arguments are unused there and not built here; the head
  is initialised as there (trunc-normal std 0.02, zero bias), every other layer as torch does.

``backend="torch"`` builds the eager-PyTorch baseline: plain ``nn.Conv2d``/``nn.Conv1d``/
``nn.Linear`` layers and the reference ops (same parameters, state_dict keys and outputs).
"""
from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch
from torch import nn
from torch.nn.init import trunc_normal_

import spikeops.nn as snn
from spikeops.models.layers import conv2d, time_major_images
from spikeops.models.registry import register_model
from spikeops.ops.batch_norm_lif import batch_norm_lif
from spikeops.ops.known_counts import add_counts, same_counts

__all__ = ["MSViT", "QKFormer", "HierarchicalSpikingTransformer"]

STEMS = ("imagenet", "cifar")
PATCH_GRID = {"imagenet": 16, "cifar": 4}


def _pair(size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    if isinstance(size, int):
        return size, size
    size = tuple(size)
    if len(size) != 2 or not all(isinstance(s, int) for s in size):
        raise ValueError(f"img_size must be an int or a pair of ints (H, W), got {size!r}")
    return size


class ConvBNPoolLIF(nn.Module):
    """``LIF(pool(BN(conv2d(x))))``: ``[T, B, C_in, H, W]`` -> spikes ``[T, B, C_out, H', W']``.

    ``pool``: a ``MaxPool2d(3, stride=2, padding=1)`` between BN and LIF (``H' = H/stride/2``),
    as the reference code; otherwise ``H' = H/stride``. ``spikes_in``: the input is spikes (or
    integer residual sums), so the conv may save it compactly; False for the image pixels.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 pool: bool = False, spikes_in: bool = True, backend: str = "auto"):
        super().__init__()
        self.conv = conv2d(backend, in_channels, out_channels, kernel_size, stride, kernel_size // 2, spikes_in=spikes_in)
        self.bn = nn.BatchNorm2d(out_channels)
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if pool else None
        self.lif = snn.LIF(tau=2.0, v_threshold=1.0, detach_reset=True, backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, B = x.shape[:2]
        y = self.conv(x.flatten(0, 1))
        if self.pool is None:
            y = batch_norm_lif(y, self.bn, self.lif, T)
            return y.view(T, B, *y.shape[1:])
        y = self.pool(self.bn(y))
        return self.lif(y.view(T, B, *y.shape[1:]))


class PatchEmbedStem(nn.Module):
    """Patch embedding 1: images ``[T, B, C_in, H, W]`` -> ``[T, B, dim, H/s, W/s]`` (values 0..2).

    ImageNet-style (``stem="imagenet"``, ``s = 4``): ``C_in -> dim/2`` (pool), ``dim/2 -> dim``
    (pool), ``dim -> dim``, shortcut conv1x1/2 ``dim/2 -> dim``. CIFAR-style (``s = 1``):
    ``C_in -> dim/2``, ``dim/2 -> dim``, shortcut conv1x1 ``dim/2 -> dim``.
    """

    def __init__(self, in_channels: int, dim: int, stem: str = "imagenet", backend: str = "auto"):
        super().__init__()
        imagenet = stem == "imagenet"
        half = dim // 2
        self.conv0 = ConvBNPoolLIF(in_channels, half, 3, pool=imagenet, spikes_in=False, backend=backend)
        self.conv1 = ConvBNPoolLIF(half, dim, 3, pool=imagenet, backend=backend)
        self.conv2 = ConvBNPoolLIF(dim, dim, 3, backend=backend) if imagenet else None
        self.shortcut = ConvBNPoolLIF(half, dim, 1, stride=2 if imagenet else 1, backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s0 = self.conv0(x)
        y = self.conv1(s0)
        if self.conv2 is not None:
            y = self.conv2(y)
        return add_counts(y, self.shortcut(s0))


class PatchEmbedDown(nn.Module):
    """Patch embedding 2/3: ``[T, B, in_dim, h, w]`` -> ``[T, B, dim, h/2, w/2]`` (values 0..2).

    ``conv3x3 in_dim -> dim``, ``conv3x3 dim -> dim`` (one max-pool: after the first conv for
    ``stem="imagenet"``, after the second for ``"cifar"``) plus the shortcut conv1x1/2
    ``in_dim -> dim`` from the input; each conv is followed by BN and LIF.
    """

    def __init__(self, in_dim: int, dim: int, stem: str = "imagenet", backend: str = "auto"):
        super().__init__()
        imagenet = stem == "imagenet"
        self.conv0 = ConvBNPoolLIF(in_dim, dim, 3, pool=imagenet, backend=backend)
        self.conv1 = ConvBNPoolLIF(dim, dim, 3, pool=not imagenet, backend=backend)
        self.shortcut = ConvBNPoolLIF(in_dim, dim, 1, stride=2, backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return add_counts(self.conv1(self.conv0(x)), self.shortcut(x))


class TokenAttentionBlock(nn.Module):
    """Stage 1-2 block on ``[T, B, C, N]`` (channels before tokens) -> ``[T, B, C, N]``.

    ``x = x + attn(x); x = x + mlp(x)``; ``attn`` is :class:`spikeops.nn.MultiScaleSpikingAttention`
    (``kind="mssa"``, MSViT) or :class:`spikeops.nn.QKTokenAttention` (``kind="qk"``, QKFormer);
    the MLP is two :class:`spikeops.nn.ConvBNLIF` (conv1d k=1 with bias, i.e. a per-token Linear).
    """

    def __init__(self, dim: int, num_heads: int, kind: str = "mssa", mlp_ratio: float = 4.0,
                 attn_v_threshold: float = 0.5, backend: str = "auto"):
        super().__init__()
        if kind == "mssa":
            self.attn = snn.MultiScaleSpikingAttention(dim, num_heads, attn_v_threshold=attn_v_threshold,
                                                       p_kernel_size=3, backend=backend)
        elif kind == "qk":
            self.attn = snn.QKTokenAttention(dim, num_heads, attn_v_threshold=attn_v_threshold, backend=backend)
        else:
            raise ValueError(f"kind must be 'mssa' or 'qk', got {kind!r}")
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(snn.ConvBNLIF(dim, hidden, 1, bias=True, backend=backend),
                                 snn.ConvBNLIF(hidden, dim, 1, bias=True, backend=backend))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = add_counts(x, self.attn(x))
        return add_counts(x, self.mlp(x))


class SSABlock(nn.Module):
    """Stage 3 block (Spikformer's) on tokens ``[T, B, N, C]`` -> ``[T, B, N, C]``.

    ``x = x + SSA(x); x = x + MLP(x)`` with :class:`spikeops.nn.SpikingSelfAttention` (scale
    0.125, no q/k/v bias) and :class:`spikeops.nn.SpikingMLP`.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, attn_v_threshold: float = 0.5,
                 backend: str = "auto"):
        super().__init__()
        self.attn = snn.SpikingSelfAttention(dim, num_heads, scale=0.125, attn_v_threshold=attn_v_threshold,
                                             qkv_bias=False, layout="tbnc", backend=backend)
        self.mlp = snn.SpikingMLP(dim, int(dim * mlp_ratio), backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = add_counts(x, self.attn(x))
        return add_counts(x, self.mlp(x))


class HierarchicalSpikingTransformer(nn.Module):
    """The three-stage spiking transformer of QKFormer / MSViT (see the module docstring).

    Forward: images ``[B, C_in, H, W]`` (repeated ``T`` times: static images) or time-major frames
    ``[T', B, C_in, H, W]`` (used as given) -> logits ``[B, num_classes]``. H and W must be
    multiples of the patch grid (16 ImageNet-style, 4 CIFAR-style); there is no position
    embedding, so any such size works, ``img_size`` is the size the model is built for.

    Args:
        dims: widths (w1, w2, w3) of stages 1-3; w1 must be even (the stem's first conv has w1/2).
        depths: blocks per stage (ImageNet L=10: (1, 2, 7); CIFAR L=4: (1, 1, 2)).
        num_heads: heads in every stage (must divide each width).
        attention: ``"mssa"`` (MSViT) or ``"qk"`` (QKFormer) for stages 1-2.
        stem: ``"imagenet"`` (patch grid 16) or ``"cifar"`` (patch grid 4).
        num_classes: head outputs (0: no head, forward returns the pooled ``[B, D]`` features).
        img_size: image size the model is built for, an int or (H, W); multiples of the patch grid.
        in_channels: image channels (checked in forward). T: time steps static images are repeated for.
        mlp_ratio: MLP hidden width / block width (4).
        attn_v_threshold: threshold of the attention neurons (token attention and SSA).
        backend: spikeops backend for every layer; ``"torch"`` is the eager baseline.
    """

    def __init__(self, dims: Sequence[int], depths: Sequence[int] = (1, 2, 7), num_heads: int = 6,
                 attention: str = "mssa", stem: str = "imagenet", num_classes: int = 1000,
                 img_size: Union[int, Sequence[int]] = 224, in_channels: int = 3, T: int = 4,
                 mlp_ratio: float = 4.0, attn_v_threshold: float = 0.5, backend: str = "auto"):
        super().__init__()
        name = type(self).__name__
        if stem not in STEMS:
            raise ValueError(f"{name}: stem must be one of {STEMS}, got {stem!r}")
        if attention not in ("mssa", "qk"):
            raise ValueError(f"{name}: attention must be 'mssa' or 'qk', got {attention!r}")
        dims, depths = tuple(int(d) for d in dims), tuple(int(d) for d in depths)
        if len(dims) != 3 or min(dims) <= 0 or dims[0] % 2:
            raise ValueError(f"{name}: dims must be 3 positive widths with an even stage-1 width, got {dims} "
                             f"(embed_dim must be a multiple of {4 if attention == 'mssa' else 8})")
        if len(depths) != 3 or min(depths) < 0:
            raise ValueError(f"{name}: depths must be 3 non-negative block counts, got {depths}")
        if not isinstance(in_channels, int) or in_channels <= 0:
            raise ValueError(f"{name}: in_channels must be a positive int, got {in_channels!r}")
        if not isinstance(T, int) or T <= 0:
            raise ValueError(f"{name}: T must be a positive int, got {T!r}")
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"{name}: num_classes must be a non-negative int, got {num_classes!r}")
        grid = PATCH_GRID[stem]
        img_hw = _pair(img_size)
        if min(img_hw) <= 0 or img_hw[0] % grid or img_hw[1] % grid:
            raise ValueError(f"{name}: img_size={img_size} must be a positive multiple of {grid} "
                             f"(the patch grid of the {stem!r} stem)")
        self.dims, self.depths, self.num_heads = dims, depths, int(num_heads)
        self.attention, self.stem, self.patch_grid = attention, stem, grid
        self.num_classes, self.in_channels, self.T = num_classes, in_channels, T
        self.img_size = img_size if isinstance(img_size, int) else img_hw  # int, or (H, W)
        self.attn_v_threshold, self.backend = float(attn_v_threshold), backend

        w1, w2, w3 = dims
        self.patch_embed1 = PatchEmbedStem(in_channels, w1, stem, backend)
        self.stage1 = nn.ModuleList(TokenAttentionBlock(w1, num_heads, attention, mlp_ratio, attn_v_threshold, backend)
                                    for _ in range(depths[0]))
        self.patch_embed2 = PatchEmbedDown(w1, w2, stem, backend)
        self.stage2 = nn.ModuleList(TokenAttentionBlock(w2, num_heads, attention, mlp_ratio, attn_v_threshold, backend)
                                    for _ in range(depths[1]))
        self.patch_embed3 = PatchEmbedDown(w2, w3, stem, backend)
        self.stage3 = nn.ModuleList(SSABlock(w3, num_heads, mlp_ratio, attn_v_threshold, backend)
                                    for _ in range(depths[2]))
        self.head = nn.Linear(w3, num_classes) if num_classes > 0 else nn.Identity()
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    @staticmethod
    def _token_stage(x: torch.Tensor, blocks: nn.ModuleList) -> torch.Tensor:
        """Token-attention blocks on ``[T, B, C, h, w]`` (as tokens ``[T, B, C, h*w]``) -> same shape."""
        T, B, C, h, w = x.shape
        x = x.flatten(3)
        for blk in blocks:
            x = blk(x)
        return x.view(T, B, C, h, w)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images / frames (as :meth:`forward`) -> stage-3 tokens ``[T, B, N, D]`` (N = H*W/grid^2)."""
        x = self.patch_embed1(time_major_images(x, self.T, self.in_channels, self.patch_grid, type(self).__name__))  # [T, B, w1, h, w]
        x = self._token_stage(x, self.stage1)
        x = self._token_stage(self.patch_embed2(x), self.stage2)  # [T, B, w2, h/2, w/2]
        x = self.patch_embed3(x)  # [T, B, D, h/4, w/4]
        x = same_counts(x, x.flatten(3).transpose(2, 3).contiguous())  # [T, B, N, D]
        for blk in self.stage3:
            x = blk(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: images ``[B, C, H, W]`` or frames ``[T, B, C, H, W]`` -> logits ``[B, num_classes]``
        (the head on the mean over tokens and time steps)."""
        return self.head(self.forward_features(x).mean(dim=(0, 2)))

    def extra_repr(self) -> str:
        return (f"dims={self.dims}, depths={self.depths}, num_heads={self.num_heads}, attention={self.attention!r}, "
                f"stem={self.stem!r}, img_size={self.img_size}, T={self.T}, attn_v_threshold={self.attn_v_threshold}, "
                f"backend={self.backend!r}")


class MSViT(HierarchicalSpikingTransformer):
    """MSViT: MSSA in stages 1-2 at widths (D/2, D/2), SSA in stage 3 at width D.

    Shapes as :class:`HierarchicalSpikingTransformer`; ``embed_dim`` D must be a multiple of 4.
    """

    def __init__(self, embed_dim: int = 384, depths: Sequence[int] = (1, 2, 7), num_heads: int = 6, **kwargs):
        if embed_dim % 4:
            raise ValueError(f"MSViT: embed_dim must be a multiple of 4, got {embed_dim}")
        super().__init__((embed_dim // 2, embed_dim // 2, embed_dim), depths, num_heads, attention="mssa", **kwargs)
        self.embed_dim = embed_dim


class QKFormer(HierarchicalSpikingTransformer):
    """QKFormer: Q-K token attention in stages 1-2 at widths (D/4, D/2), SSA in stage 3 at width D.

    Shapes as :class:`HierarchicalSpikingTransformer`; ``embed_dim`` D must be a multiple of 8.
    """

    def __init__(self, embed_dim: int = 384, depths: Sequence[int] = (1, 2, 7), num_heads: int = 6, **kwargs):
        if embed_dim % 8:
            raise ValueError(f"QKFormer: embed_dim must be a multiple of 8, got {embed_dim}")
        super().__init__((embed_dim // 4, embed_dim // 2, embed_dim), depths, num_heads, attention="qk", **kwargs)
        self.embed_dim = embed_dim


_IMAGENET = dict(depths=(1, 2, 7), stem="imagenet", num_classes=1000, img_size=224, in_channels=3, T=4)
_CIFAR = dict(embed_dim=384, depths=(1, 1, 2), num_heads=8, stem="cifar", num_classes=10, img_size=32,
              in_channels=3, T=4)

# name: (class, configuration). Parameter counts reported by the papers / released code:
# MSViT-10-384/512/768 17.69M / 31.23M (the code's count; its README says 30.23M) / 69.80M, MSViT
# CIFAR 4-384 7.59M; QKFormer-10-384/512/768 16.47M / 29.08M / 64.96M, QKFormer CIFAR 4-384
# 6,706,234 (CIFAR-10). CIFAR models: blocks {1, 1, 2}, 32x32 -> 16x16 -> 8x8 tokens.
for _name, (_cls, _cfg) in {
    "msvit_10_384": (MSViT, dict(_IMAGENET, embed_dim=384, num_heads=6)),
    "msvit_10_512": (MSViT, dict(_IMAGENET, embed_dim=512, num_heads=8)),
    "msvit_10_768": (MSViT, dict(_IMAGENET, embed_dim=768, num_heads=12)),
    "msvit_cifar_4_384": (MSViT, _CIFAR),
    "qkformer_10_384": (QKFormer, dict(_IMAGENET, embed_dim=384, num_heads=6)),
    "qkformer_10_512": (QKFormer, dict(_IMAGENET, embed_dim=512, num_heads=8)),
    "qkformer_10_768": (QKFormer, dict(_IMAGENET, embed_dim=768, num_heads=12)),
    "qkformer_cifar_4_384": (QKFormer, _CIFAR),
}.items():
    register_model(_name)(lambda _cls=_cls, _cfg=_cfg, **overrides: _cls(**{**_cfg, **overrides}))
