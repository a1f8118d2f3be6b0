"""Tiny spiking classifiers for the training-CLI tests, registered in spikeops.models under
test-only names. Run as a script (``python tests/tiny_models.py ARGS``, also under torchrun) it
registers them and runs ``spikeops.train`` with ARGS.
"""
import sys

import torch
from torch import nn

import spikeops
from spikeops.models import list_models, register_model

TINY = "_test_tiny_snn"  # conv-BN-LIF x2, linear head
TINY_NOBN = "_test_tiny_snn_nobn"  # the same with per-sample GroupNorm instead of BatchNorm


class TinySNN(nn.Module):
    """[B, C, H, W] images -> [B, classes] logits; static input repeated T times, time-major LIF."""

    def __init__(self, num_classes=10, img_size=8, in_channels=3, T=2, backend="auto", norm="bn", width=8):
        super().__init__()
        self.T = T

        def norm_layer(c):
            return nn.BatchNorm2d(c) if norm == "bn" else nn.GroupNorm(1, c)

        self.conv1, self.norm1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False), norm_layer(width)
        self.conv2, self.norm2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), norm_layer(2 * width)
        self.lif1 = spikeops.nn.LIF(tau=2.0, detach_reset=True, backend=backend)
        self.lif2 = spikeops.nn.LIF(tau=2.0, detach_reset=True, backend=backend)
        self.head = nn.Linear(2 * width, num_classes)

    seen_dtypes = set()  # dtypes of conv1's output (autocast check)

    def forward(self, x):
        T, B = self.T, x.shape[0]
        x = x.unsqueeze(0).expand(T, *x.shape).flatten(0, 1)  # [T*B, C, H, W]
        x = self.conv1(x)
        TinySNN.seen_dtypes.add(x.dtype)
        x = self.norm1(x)
        x = self.lif1(x.view(T, B, *x.shape[1:])).flatten(0, 1)
        x = self.norm2(self.conv2(x))
        x = self.lif2(x.view(T, B, *x.shape[1:]))  # [T, B, C, H, W] spikes
        return self.head(x.mean((3, 4)).mean(0))


if TINY not in list_models():
    register_model(TINY)(lambda **kw: TinySNN(norm="bn", **kw))
    register_model(TINY_NOBN)(lambda **kw: TinySNN(norm="gn", **kw))

if __name__ == "__main__":
    from spikeops.train.cli import main

    sys.exit(main(sys.argv[1:]))
