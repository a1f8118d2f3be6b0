"""torch.compile(fullgraph=True) over every spikeops nn module and over a small full model.

The custom ops (lif, ssa, token attention, masked conv/BN, pack, ...) are opaque torch.library
ops with fake kernels, so they compile as they are. SpikeLinear/SpikeConv*/SpikeMaxPool2d and
batch_norm_lif choose what to save for backward from the input's values; under
``torch.compiler.is_compiling()`` they take the plain PyTorch path instead (the parent
module's forward, ``lif(bn(y))``), so there is no graph break and the results are the eager
ones: spikes bit for bit, gradients to 1e-5 of their scale (the eager fused BN+LIF backward
sums in another order than the unfused one).
"""
import pytest
import torch
from torch import nn

import spikeops
import spikeops.nn as snn
from spikeops.models import create_model
from harness import KERNEL_BACKENDS, Masked, assert_grads_close, device_for, random_currents, random_spikes


spikes, currents = random_spikes, random_currents


def mask():
    m = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(5)) < 0.5
    m[:, :, 0, 0] = True
    return m


# name -> (module factory (backend) -> nn.Module, input factory)
MODULES = {
    "LIF": (lambda be: snn.LIF(backend=be), lambda: currents(4, 3, 10)),
    "LIF_soft_atan_bf16_state": (lambda be: snn.LIF(v_reset=None, surrogate="atan", state_dtype=torch.bfloat16,
                                                    backend=be), lambda: currents(4, 3, 10)),
    "SpikingSelfAttention": (lambda be: snn.SpikingSelfAttention(16, 2, backend=be), lambda: spikes(2, 2, 5, 16)),
    "SpikingSelfAttention_tbcn": (lambda be: snn.SpikingSelfAttention(16, 2, layout="tbcn", backend=be),
                                  lambda: spikes(2, 2, 16, 5)),
    "SpikingMLP": (lambda be: snn.SpikingMLP(16, 32, backend=be), lambda: spikes(2, 2, 5, 16)),
    "QKTokenAttention": (lambda be: snn.QKTokenAttention(16, 2, backend=be), lambda: spikes(2, 2, 16, 6)),
    "MultiScaleSpikingAttention": (lambda be: snn.MultiScaleSpikingAttention(16, 2, backend=be),
                                   lambda: spikes(2, 2, 16, 6)),
    "SpikeLinear": (lambda be: snn.SpikeLinear(16, 8), lambda: spikes(2, 3, 16)),
    "SpikeConv1d": (lambda be: snn.SpikeConv1d(6, 4, 3, padding=1), lambda: spikes(2, 6, 9)),
    "SpikeConv2d": (lambda be: snn.SpikeConv2d(6, 4, 3, padding=1), lambda: spikes(2, 6, 7, 7)),
    "SpikeMaxPool2d": (lambda be: snn.SpikeMaxPool2d(3, 2, 1), lambda: spikes(2, 4, 7, 7)),
    "MaskedConv2d": (lambda be: Masked(snn.MaskedConv2d(3, 4, 3, padding=1, backend=be), mask()),
                     lambda: currents(4, 3, 8, 8)),
    "MaskedBatchNorm2d": (lambda be: Masked(snn.MaskedBatchNorm2d(3, backend=be), mask()), lambda: currents(4, 3, 8, 8)),
}


def build(name, backend, device):
    make, _ = MODULES[name]
    torch.manual_seed(0)
    return make(backend).to(device)


def forward_backward(module, x):
    leaf = x.clone().requires_grad_(True)
    out = module(leaf)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device, out.dtype)
    out.backward(g)
    return out.detach(), leaf.grad, [p.grad for p in module.parameters()]


def assert_same_results(eager, compiled):
    (out_e, gx_e, gp_e), (out_c, gx_c, gp_c) = eager, compiled
    assert torch.equal(out_c, out_e)
    assert_grads_close(gx_c, gx_e)
    assert len(gp_c) == len(gp_e)
    # relative to the module's largest parameter gradient: a bias right before training-mode
    # BatchNorm has gradient 0 in exact arithmetic and holds rounding noise whose size depends on
    # the BatchNorm backward (cuDNN's in eager CUDA calls, spikeops' C++ one through LIF and
    # BatchNorm in eager CPU calls, ATen's in the compiled graph: seen up to 2.1e-5 of the scale)
    scale = max((e.abs().max().item() for e in gp_e if e is not None), default=0.0)
    for a, e in zip(gp_c, gp_e):
        assert (a is None) == (e is None)
        if e is not None:
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-4 * scale)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", list(MODULES))
def test_module_compiles_with_fullgraph(name, backend):
    device = device_for(backend)
    x = MODULES[name][1]().to(device)
    eager = build(name, backend, device)
    compiled_module = build(name, backend, device)
    ref = forward_backward(eager, x)
    torch._dynamo.reset()
    compiled = torch.compile(compiled_module, fullgraph=True, backend="aot_eager")
    assert_same_results(ref, forward_backward(compiled, x))
    for b_e, b_c in zip(eager.buffers(), compiled_module.buffers()):  # BN running statistics
        torch.testing.assert_close(b_c, b_e, rtol=1e-6, atol=1e-7)


def test_the_fused_paths_really_are_skipped_only_while_compiling():
    # the eager forward of these layers keeps their compact backward (fewer saved bytes than the
    # plain path the compiled graph takes): the compile path must not leak into eager calls
    from spikeops.memory import saved_bytes

    lin, x = snn.SpikeLinear(256, 8), spikes(4, 2, 8, 256)
    torch._dynamo.reset()
    torch.compile(lin, fullgraph=True, backend="aot_eager")(x.clone().requires_grad_())
    weight_bytes = lin.weight.numel() * 4
    assert saved_bytes(lin, x) <= weight_bytes + x.numel() // 8 + 64  # the input kept as bits
    assert saved_bytes(nn.Linear(256, 8), x) >= x.numel() * 4


def small_model(backend):
    torch.manual_seed(0)
    return create_model("spikformer_cifar_4_384", dim=32, depth=1, num_heads=2, T=2, backend=backend)


def model_step(model, x, run=None):
    out = (run if run is not None else model)(x)
    out.square().sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend", ["auto"])  # C++ kernels; a Triton-interpreter model step is too slow here
def test_full_model_forward_backward_compiles_with_fullgraph(backend):
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    eager, compiled_model = small_model(backend), small_model(backend)
    ref_out, ref_grads = model_step(eager, x)
    torch._dynamo.reset()
    out, grads = model_step(compiled_model, x, torch.compile(compiled_model, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)  # logits: means of identical spikes
    assert ref_grads.keys() == grads.keys()
    assert any(g.abs().sum() > 0 for g in ref_grads.values())
    # a bias right before training-mode BatchNorm has gradient 0 in exact arithmetic: rounding noise
    # whose size depends on the BatchNorm backward (spikeops' C++ one through LIF and BatchNorm in
    # eager CPU calls, ATen's in the compiled graph), compared relative to the model's largest gradient
    scale = max(g.abs().max().item() for g in ref_grads.values())
    for name, g in ref_grads.items():
        if g.abs().max().item() < 1e-4 * scale:  # seen: up to 5e-6 of the scale, differing by up to 8e-7 of it
            torch.testing.assert_close(grads[name], g, rtol=0, atol=1e-5 * scale, msg=name)
        else:
            assert_grads_close(grads[name], g)
    for (name, b_e), b_c in zip(eager.named_buffers(), compiled_model.buffers()):
        torch.testing.assert_close(b_c, b_e, rtol=1e-6, atol=1e-7, msg=name)


def test_inductor_compiles_a_spiking_block_with_fullgraph():
    # one inductor case (g++ is required; inductor generates C++ for the non-custom-op parts)
    import shutil

    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("inductor needs a C++ compiler (g++) on CPU, and none is installed")
    torch.manual_seed(0)
    block = nn.Sequential(snn.SpikeConv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Unflatten(0, (2, 2)),
                          snn.LIF(), nn.Flatten(0, 1), snn.SpikeMaxPool2d(2), nn.Flatten(1), snn.SpikeLinear(8 * 9, 5))
    x = spikes(4, 4, 6, 6)
    import copy

    other = copy.deepcopy(block)
    ref = forward_backward(block, x)
    torch._dynamo.reset()
    out, gx, gp = forward_backward(torch.compile(other, fullgraph=True), x)
    # inductor fuses BatchNorm into its own kernels: the LIF input may differ in the last bit, so
    # a spike may flip where it lies within rounding of the threshold (none did when written)
    assert (out != ref[0]).float().mean() <= 0.01
    torch.testing.assert_close(gx, ref[1], rtol=1e-4, atol=1e-4 * ref[1].abs().max().item())
    for a, e in zip(gp, ref[2]):  # + 1e-6: the conv bias before BatchNorm has a gradient of ~0 (noise)
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4 * e.abs().max().item() + 1e-6)
