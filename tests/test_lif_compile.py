"""torch.library registration of the LIF ops: opcheck, and torch.compile(fullgraph=True) of models using them."""
import pytest
import torch
from torch import nn

import spikeops
from harness import KERNEL_BACKENDS, device_for


def op_args(x, backend, save_h=True, state_bf16=False):
    # x, tau, v_threshold, v_reset, hard_reset, decay_input, detach_reset, surrogate, alpha, save_h, state_bf16, backend
    return (x, 2.0, 1.0, 0.0, True, True, True, 0, 4.0, save_h, state_bf16, backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_forward_op_passes_opcheck(backend):
    x = (torch.randn(4, 37) + 0.5).to(device_for(backend)).requires_grad_()
    torch.library.opcheck(torch.ops.spikeops.lif_forward.default, op_args(x, backend))
    torch.library.opcheck(torch.ops.spikeops.lif_forward.default, op_args(x.detach(), backend, save_h=False))
    torch.library.opcheck(torch.ops.spikeops.lif_forward.default, op_args(x, backend, state_bf16=True))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_backward_op_passes_opcheck(backend):
    device = device_for(backend)
    grad, h = torch.randn(4, 37, device=device), torch.randn(4, 37, device=device) + 1.0
    # grad_spikes, h, tau, v_threshold, v_reset, hard_reset, decay_input, detach_reset, surrogate, alpha, backend
    torch.library.opcheck(torch.ops.spikeops.lif_backward.default,
                          (grad, h, 2.0, 1.0, 0.0, True, True, False, 1, 2.0, backend))


def make_model(backend):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), spikeops.nn.LIF(backend=backend), nn.Linear(32, 8),
                         spikeops.nn.LIF(v_reset=None, surrogate="atan", backend=backend))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_compiled_model_matches_eager_without_graph_breaks(backend):
    device = device_for(backend)
    eager, compiled = make_model(backend).to(device), make_model(backend).to(device)
    x = torch.randn(4, 3, 16, device=device) * 2
    ref = eager(x)
    ref.sum().backward()
    torch._dynamo.reset()
    out = torch.compile(compiled, fullgraph=True, backend="aot_eager")(x)
    out.sum().backward()
    assert torch.equal(out, ref)
    torch.testing.assert_close(compiled[0].weight.grad, eager[0].weight.grad, rtol=1e-5, atol=1e-6)


def test_inductor_compiles_a_model_with_the_cpp_op():
    eager, compiled = make_model("auto"), make_model("auto")
    x = torch.randn(4, 3, 16) * 2
    ref = eager(x)
    ref.sum().backward()
    torch._dynamo.reset()
    out = torch.compile(compiled, fullgraph=True)(x)
    out.sum().backward()
    assert torch.equal(out, ref)
    torch.testing.assert_close(compiled[0].weight.grad, eager[0].weight.grad, rtol=1e-5, atol=1e-6)
