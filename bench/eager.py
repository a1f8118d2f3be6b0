"""The eager baselines every benchmark compares against: SpikingJelly 2.0's LIFNode (when it can be
imported) and a plain PyTorch multi-step LIF loop with the same semantics (tau 2, v_reset 0,
detach_reset, sigmoid surrogate alpha 4)."""
from __future__ import annotations

import torch
from torch import nn

TAU, ALPHA = 2.0, 4.0

try:
    from spikingjelly.activation_based import functional as sj_functional
    from spikingjelly.activation_based import neuron as sj_neuron
    from spikingjelly.activation_based import surrogate as sj_surrogate
    SJ_ERROR = None
except Exception as exc:  # noqa: BLE001 - any import failure just skips those rows
    sj_functional = sj_neuron = sj_surrogate = None
    SJ_ERROR = f"{type(exc).__name__}: {exc}"


class SigmoidSpike(torch.autograd.Function):
    """Heaviside(d) forward, sigmoid surrogate ``alpha * sig(alpha d) * (1 - sig(alpha d))`` backward."""

    @staticmethod
    def forward(ctx, d):
        ctx.save_for_backward(d)
        return (d >= 0).to(d.dtype)

    @staticmethod
    def backward(ctx, grad):
        (d,) = ctx.saved_tensors
        sg = torch.sigmoid(ALPHA * d)
        return grad * ALPHA * sg * (1.0 - sg)


def py_lif(x_seq: torch.Tensor, v_threshold: float = 1.0) -> torch.Tensor:
    """Plain eager multi-step LIF: h = v + (x - v)/tau; s = H(h - th); v = h (1 - s) (reset detached)."""
    v = torch.zeros_like(x_seq[0])
    spikes = []
    for x in x_seq:
        h = v + (x - v) / TAU
        s = SigmoidSpike.apply(h - v_threshold)
        v = h * (1.0 - s.detach())
        spikes.append(s)
    return torch.stack(spikes)


class PyLIF(nn.Module):
    """:func:`py_lif` as a module: stands in for SpikingJelly's LIFNode when it is not installed."""

    def __init__(self, v_threshold: float = 1.0):
        super().__init__()
        self.v_threshold = v_threshold

    def forward(self, x):
        return py_lif(x, self.v_threshold)


def sjlif(th: float = 1.0) -> nn.Module:
    """SpikingJelly's multi-step LIFNode with the Spikformer settings (PyLIF without SpikingJelly)."""
    if SJ_ERROR is not None:
        return PyLIF(th)
    return sj_neuron.LIFNode(tau=TAU, v_threshold=th, detach_reset=True,
                             surrogate_function=sj_surrogate.Sigmoid(), step_mode="m")


def reset(module: nn.Module) -> None:
    """SpikingJelly's reset_net (a no-op for modules without SpikingJelly neurons)."""
    if SJ_ERROR is None:
        sj_functional.reset_net(module)
