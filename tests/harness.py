"""Shared test harness: which kernel backends run here, on which device, and how results are compared.

Every kernel test is parametrised over KERNEL_BACKENDS and compares against spikeops.reference,
so the C++ kernels (natively) and the Triton kernels (on a GPU, or under TRITON_INTERPRET=1 on
CPU tensors) are held to the same ground truth.
"""
import torch

KERNEL_BACKENDS = ("cpp", "triton")


def device_for(backend: str) -> torch.device:
    """The device a backend's kernels run on in this test session."""
    if backend == "triton" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def forward_backward(fn, x: torch.Tensor, grad_out: torch.Tensor):
    """Run ``fn`` on a fresh leaf copy of ``x``; returns (output, d output·grad_out / dx)."""
    leaf = x.detach().clone().requires_grad_(True)
    out = fn(leaf)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), leaf.grad


def assert_grads_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    """Gradients agree to ``rtol`` relative to the largest expected magnitude.

    Backward recurrences sum terms that can cancel, so an element-wise relative bound would
    measure cancellation, not kernel error; the bound is relative to the gradient's scale.
    """
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    actual, expected = actual.double().cpu(), expected.double().cpu()
    scale = expected.abs().max().item() or 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


def random_spikes(*shape, seed=0, p=0.4) -> torch.Tensor:
    """Seeded 0./1. spikes of ``shape`` firing with probability ``p``."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) < p).float()


def random_currents(*shape, seed=0) -> torch.Tensor:
    """Seeded input currents ``N(0.7, 1.5^2)``: a LIF neuron fires on a fair share of them."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 1.5 + 0.7


class Masked(torch.nn.Module):
    """A masked stem layer run inside ``spikeops.masking`` (the mask is set in forward)."""

    def __init__(self, layer, mask):
        super().__init__()
        self.layer = layer
        self.register_buffer("mask", mask)  # moves with .to(device)

    def forward(self, x):
        import spikeops
        with spikeops.masking(self.mask):
            return self.layer(x)
