"""spikeops.nn.SpikingSelfAttention / SpikingMLP: same math as the unfused torch layers +
reference ops, less memory for backward."""
import copy

import pytest
import torch
from torch import nn

import spikeops
from spikeops import reference
from spikeops.memory import saved_bytes
from harness import assert_grads_close


def spike_input(shape, density=0.25, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) < density).float()


def unfused_attention(m, x):
    """The same block from nn.Linear / BatchNorm1d (the module's own parameters) and reference ops."""
    T, B, N, C = x.shape

    def branch(p, inp, v_threshold=1.0):
        y = p.linear(inp)
        y = p.bn(y.reshape(-1, y.shape[-1])).view(y.shape)
        return reference.lif(y, v_threshold=v_threshold)

    q, k, v = [branch(p, x).view(T, B, N, m.num_heads, -1).transpose(2, 3) for p in (m.q, m.k, m.v)]
    a = reference.ssa(q, k, v, scale=m.scale, v_threshold=m.attn_v_threshold)
    return branch(m.proj, a.transpose(2, 3).reshape(T, B, N, C))


def test_attention_matches_the_unfused_composition():
    torch.manual_seed(0)
    ours = spikeops.nn.SpikingSelfAttention(32, 4, scale=1.0)  # scale 1: the attention neuron fires at this size
    twin = copy.deepcopy(ours)
    x = spike_input((4, 2, 64, 32))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, ref = ours(x1), unfused_attention(twin, x2)
    assert torch.equal(out, ref)
    assert 0 < out.sum() < out.numel()
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(g)
    ref.backward(g)
    assert_grads_close(x1.grad, x2.grad)
    for (name, p), (_, p2) in zip(ours.named_parameters(), twin.named_parameters()):
        if name == "proj.linear.bias":  # a bias right before training-mode BN: its true gradient is 0,
            assert p.grad.abs().max() < 1e-5 * x1.grad.abs().max() * x.numel() ** 0.5  # both hold rounding noise
            continue
        assert_grads_close(p.grad, p2.grad)
    for b, b2 in zip(ours.buffers(), twin.buffers()):
        assert torch.equal(b, b2)


def test_channels_first_layout_is_the_transpose():
    torch.manual_seed(0)
    a = spikeops.nn.SpikingSelfAttention(16, 2)
    b = spikeops.nn.SpikingSelfAttention(16, 2, layout="tbcn")
    b.load_state_dict(a.state_dict())
    x = spike_input((2, 2, 9, 16))
    assert torch.equal(a(x), b(x.transpose(2, 3).contiguous()).transpose(2, 3))


def test_bad_configuration_and_input_are_explained():
    with pytest.raises(ValueError, match="num_heads \\(5\\) must be a positive divisor of dim \\(32\\)"):
        spikeops.nn.SpikingSelfAttention(32, 5)
    with pytest.raises(ValueError, match="layout must be one of"):
        spikeops.nn.SpikingSelfAttention(32, 4, layout="bnc")
    m = spikeops.nn.SpikingSelfAttention(32, 4)
    with pytest.raises(ValueError, match="expected dim=32"):
        m(spike_input((2, 1, 5, 16)))
    with pytest.raises(ValueError, match="4-d"):
        m(spike_input((2, 5, 32)))


def test_mlp_shapes_and_spikes():
    m = spikeops.nn.SpikingMLP(16, 64, 8)
    out = m(spike_input((2, 3, 5, 16)))
    assert out.shape == (2, 3, 5, 8) and reference.is_binary(out)


def test_spikformer_block_keeps_at_most_35_percent_of_the_eager_bytes():
    neuron = pytest.importorskip("spikingjelly.activation_based.neuron", reason="eager baseline uses SpikingJelly's LIFNode")
    surrogate = pytest.importorskip("spikingjelly.activation_based.surrogate")
    T, B, N, D, H = 4, 8, 64, 384, 12  # B=8: with B=2 the saved weights (~7 MB, kept by both) dominate

    def sj_lif(v_threshold=1.0):
        return neuron.LIFNode(tau=2.0, v_threshold=v_threshold, detach_reset=True,
                              surrogate_function=surrogate.Sigmoid(), step_mode="m")

    class EagerLBL(nn.Module):
        def __init__(self, i, o, bias):
            super().__init__()
            self.linear, self.bn, self.lif = nn.Linear(i, o, bias=bias), nn.BatchNorm1d(o), sj_lif()

        def forward(self, x):
            y = self.linear(x)
            return self.lif(self.bn(y.reshape(-1, y.shape[-1])).view(y.shape))

    class EagerBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = EagerLBL(D, D, False), EagerLBL(D, D, False), EagerLBL(D, D, False)
            self.p, self.attn_lif = EagerLBL(D, D, True), sj_lif(0.5)
            self.f1, self.f2 = EagerLBL(D, 4 * D, True), EagerLBL(4 * D, D, True)

        def forward(self, x):
            q, k, v = [m(x).view(T, B, N, H, D // H).transpose(2, 3) for m in (self.q, self.k, self.v)]
            a = self.attn_lif((q @ k.transpose(-2, -1) @ v) * 0.125)
            x = x + self.p(a.transpose(2, 3).reshape(T, B, N, D))
            return x + self.f2(self.f1(x))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.mlp = spikeops.nn.SpikingSelfAttention(D, H), spikeops.nn.SpikingMLP(D, 4 * D)

        def forward(self, x):
            x = x + self.attn(x)
            return x + self.mlp(x)

    x = spike_input((T, B, N, D), density=0.2).requires_grad_()
    ours, eager = saved_bytes(Block(), x), saved_bytes(EagerBlock(), x)
    assert ours <= 0.35 * eager, f"spikeops block keeps {ours / eager:.1%} of the eager block's bytes"
