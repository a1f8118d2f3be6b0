"""Masked pre-training of a convolutional stem: ``MaskedConv2d``, ``MaskedBatchNorm2d``,
``masking`` and ``to_masked`` / ``from_masked``.

The pre-training wrapper sets the patch mask once per step; every masked layer reads it and
upsamples it (nearest) to its own resolution, so a 14x14 patch mask serves the 112/56/28/14
grids of the four Spiking Convolutional Stem blocks (x8, x4, x2, x1)::

    stem = spikeops.nn.to_masked(stem)          # Conv2d -> MaskedConv2d, BatchNorm2d -> MaskedBatchNorm2d
    mask = torch.rand(B, 1, 14, 14) > 0.75      # True = visible (25% of the patches)
    with spikeops.masking(mask):
        feats = stem(images)                    # masked positions exactly 0 after every conv and BN
    stem = spikeops.nn.from_masked(stem)        # back to nn.Conv2d / nn.BatchNorm2d for fine-tuning

* Outside a ``masking`` block the masked layers are their dense parents (``nn.Conv2d`` /
  ``nn.BatchNorm2d``), so a converted stem also runs on full images.
* Inputs may be ``[N, C, H, W]`` (time folded: ``N = T * B`` time-major, the ``[B, ...]`` mask is
  repeated over T) or ``[T, B, C, H, W]`` (multi-step; folded and unfolded around the op).
* The mask is a module-level setting (not thread-local), nested ``masking`` blocks restore the
  outer mask on exit.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn

from spikeops.ops.masked_batch_norm import masked_batch_norm2d
from spikeops.nn.spike_layers import SpikeConv2d
from spikeops.ops.masked_conv import check_mask, masked_conv2d

_MASKS: list = []


@contextlib.contextmanager
def masking(mask: Optional[torch.Tensor]) -> Iterator[Optional[torch.Tensor]]:
    """Within the block, masked layers use ``mask`` (``[B, 1, h, w]`` or ``[B, h, w]``, bool or
    0/1, True = visible). ``masking(None)`` turns masking off inside an outer block."""
    if mask is not None:
        mask = check_mask(mask).unsqueeze(1)
    _MASKS.append(mask)
    try:
        yield mask
    finally:
        _MASKS.pop()


def current_mask() -> Optional[torch.Tensor]:
    """The mask set by the innermost ``masking`` block (bool ``[B, 1, h, w]``), or None."""
    return _MASKS[-1] if _MASKS else None


def _fold(x: torch.Tensor, what: str):
    if x.dim() == 5:
        return x.flatten(0, 1), x.shape[:2]
    if x.dim() == 4:
        return x, None
    raise ValueError(f"{what}: x must be [N, C, H, W] or [T, B, C, H, W], got shape {tuple(x.shape)}")


def _unfold(y: torch.Tensor, tb) -> torch.Tensor:
    return y if tb is None else y.view(*tb, *y.shape[1:])


class MaskedConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same constructor, parameters and state_dict) that, inside
    :func:`masking`, computes only the visible blocks (:func:`spikeops.masked_conv2d`): masked
    output positions are exactly 0. Needs groups=1, dilation=1, padding_mode='zeros'
    (padding 'same' only for odd kernels). ``backend`` picks the kernel (see spikeops.backend)."""

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend
        _check_conv(self, type(self).__name__)

    def _padding(self):
        if self.padding == "valid":
            return (0, 0)
        if self.padding == "same":
            return tuple(k // 2 for k in self.kernel_size)
        return self.padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = current_mask()
        if mask is None:
            return super().forward(x)
        flat, tb = _fold(x, "MaskedConv2d")
        y = masked_conv2d(flat, self.weight, mask, self.bias, self.stride, self._padding(), backend=self.backend)
        return _unfold(y, tb)


class MaskedBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` (same constructor, parameters, buffers and state_dict) that, inside
    :func:`masking`, takes batch statistics and updates running statistics over the visible
    positions only and outputs exactly 0 at masked ones (:func:`spikeops.masked_batch_norm2d`).
    Eval mode uses the running statistics; momentum=None (cumulative average) and
    track_running_stats=False behave as in ``nn.BatchNorm2d``."""

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = current_mask()
        if mask is None:
            return super().forward(x)
        flat, tb = _fold(x, "MaskedBatchNorm2d")
        # the bookkeeping of nn.BatchNorm2d.forward (momentum=None: cumulative moving average)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        y = masked_batch_norm2d(flat, mask, self.running_mean if track else None, self.running_var if track else None,
                                self.weight, self.bias, use_batch_stats, factor, self.eps, backend=self.backend)
        return _unfold(y, tb)


def _check_conv(conv: nn.Conv2d, where: str) -> None:
    problems = []
    if conv.groups != 1:
        problems.append(f"groups={conv.groups}")
    if tuple(conv.dilation) != (1, 1):
        problems.append(f"dilation={tuple(conv.dilation)}")
    if conv.padding_mode != "zeros":
        problems.append(f"padding_mode={conv.padding_mode!r}")
    if conv.padding == "same" and any(k % 2 == 0 for k in conv.kernel_size):
        problems.append(f"padding='same' with an even kernel {tuple(conv.kernel_size)}")
    if problems:
        raise ValueError(f"{where}: masked convolution supports groups=1, dilation=1, padding_mode='zeros' "
                         f"(and 'same' padding only for odd kernels), got {', '.join(problems)}")


def _share(dst: nn.Module, src: nn.Module) -> nn.Module:
    """dst takes src's Parameter and buffer objects (no copy: an optimizer keeps working) and mode."""
    for name, p in src.named_parameters(recurse=False):
        setattr(dst, name, p)
    for name, b in src.named_buffers(recurse=False):
        dst._buffers[name] = b
    dst.train(src.training)
    return dst


def _conv_args(m: nn.Conv2d) -> dict:
    p = m.weight
    return dict(in_channels=m.in_channels, out_channels=m.out_channels, kernel_size=m.kernel_size, stride=m.stride,
                padding=m.padding, dilation=m.dilation, groups=m.groups, bias=m.bias is not None,
                padding_mode=m.padding_mode, device=p.device, dtype=p.dtype)


def _bn_args(m: nn.BatchNorm2d) -> dict:
    like = m.weight if m.weight is not None else m.running_mean
    extra = dict(device=like.device, dtype=like.dtype) if like is not None else {}
    return dict(num_features=m.num_features, eps=m.eps, momentum=m.momentum, affine=m.affine,
                track_running_stats=m.track_running_stats, **extra)


def _swap(module: nn.Module, convert, path: str) -> nn.Module:
    new = convert(module, path or type(module).__name__)
    if new is not None:
        return new
    for name, child in module.named_children():
        replaced = _swap(child, convert, f"{path}.{name}" if path else name)
        if replaced is not child:
            setattr(module, name, replaced)
    return module


def to_masked(module: nn.Module, backend: str = "auto") -> nn.Module:
    """Replace every ``nn.Conv2d`` (or :class:`spikeops.nn.SpikeConv2d`) / ``nn.BatchNorm2d`` in ``module`` by
    :class:`MaskedConv2d` / :class:`MaskedBatchNorm2d` holding the same Parameter and buffer
    objects (weights, running stats; nothing copied, state_dict keys unchanged). Returns the
    module (a new one if ``module`` itself is a Conv2d/BatchNorm2d). A Conv2d the masked kernel
    cannot run (groups, dilation, padding mode) raises ``ValueError`` naming it."""

    def convert(m, path):
        if type(m) in (nn.Conv2d, SpikeConv2d):
            _check_conv(m, f"to_masked: {path}")
            return _share(MaskedConv2d(**{**_conv_args(m), "device": "meta"}, backend=backend), m)
        if type(m) is nn.BatchNorm2d:
            return _share(MaskedBatchNorm2d(**{**_bn_args(m), "device": "meta"}, backend=backend), m)
        return None

    return _swap(module, convert, "")


def from_masked(module: nn.Module) -> nn.Module:
    """Undo :func:`to_masked`: :class:`MaskedConv2d` -> ``nn.Conv2d``, :class:`MaskedBatchNorm2d` ->
    ``nn.BatchNorm2d``, sharing the Parameter and buffer objects."""

    def convert(m, path):
        if isinstance(m, MaskedConv2d):
            return _share(nn.Conv2d(**{**_conv_args(m), "device": "meta"}), m)
        if isinstance(m, MaskedBatchNorm2d):
            return _share(nn.BatchNorm2d(**{**_bn_args(m), "device": "meta"}), m)
        return None

    return _swap(module, convert, "")
