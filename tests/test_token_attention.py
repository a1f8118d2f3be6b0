"""spikeops.token_attention (QKFormer / MSSA) and its modules: exact spikes, tight gradients, both backends."""
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import spikeops
from spikeops import reference
from harness import KERNEL_BACKENDS, assert_grads_close, device_for


def spikes(shape, n, seed, device="cpu", dtype=torch.float32):
    """About 1.5 spikes per summed row, so the attention neuron sits near its threshold and the
    surrogate gradients are not all ~0."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) < min(0.4, 1.5 / n)).to(dtype).to(device)


def run(fn, tensors, grad):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(grad.to(out.dtype))
    return out.detach(), [leaf.grad for leaf in leaves]


SHAPES = [(4, 2, 3, 20, 8), (1, 1, 1, 5, 3), (3, 2, 2, 7, 70), (2, 1, 2, 33, 16)]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ["token", "channel"])
@pytest.mark.parametrize("with_p", [False, True])
def test_spikes_and_grads_match_reference(backend, shape, mode, with_p):
    device = device_for(backend)
    summed = shape[-1] if mode == "token" else shape[-2]
    tensors = [spikes(shape, summed, seed, device) for seed in range(3 if with_p else 2)]
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(7)).to(device)

    def ours(q, k, p=None):
        return spikeops.token_attention(q, k, p, mode=mode, backend=backend)

    def ref(q, k, p=None):
        return reference.token_attention(q, k, p, mode=mode)

    out, grads = run(ours, tensors, grad)
    expected, ref_grads = run(ref, [t.cpu() for t in tensors], grad.cpu())
    assert torch.equal(out.cpu(), expected)
    assert 0 < expected.sum() <= tensors[1].sum()
    for g, rg in zip(grads, ref_grads):
        assert_grads_close(g, rg, rtol=1e-5)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("v_threshold,tau", [(1.0, 2.0), (0.3, 4.0)])
def test_threshold_and_tau_reach_the_kernel(backend, v_threshold, tau):
    device = device_for(backend)
    q, k, p = [spikes((3, 2, 2, 10, 8), 8, s, device) for s in range(3)]
    out = spikeops.token_attention(q, k, p, v_threshold=v_threshold, tau=tau, backend=backend)
    assert torch.equal(out.cpu(), reference.token_attention(q.cpu(), k.cpu(), p.cpu(), v_threshold, tau))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(backend, dtype):
    device = device_for(backend)
    shape = (3, 2, 2, 10, 8)
    tensors = [spikes(shape, 8, s, device, dtype) for s in range(3)]
    grad = torch.randn(shape).to(device)
    out, grads = run(lambda q, k, p: spikeops.token_attention(q, k, p, backend=backend), tensors, grad)
    expected, ref_grads = run(reference.token_attention, [t.cpu() for t in tensors], grad.cpu())
    assert out.dtype == dtype and torch.equal(out.cpu(), expected)
    for g, rg in zip(grads, ref_grads):
        assert_grads_close(g, rg, rtol=1e-2)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_backward_keeps_k_as_bits_and_one_float_per_token(backend):
    device = device_for(backend)
    T, B, H, N, d = 4, 2, 2, 16, 64
    q, k = [spikes((T, B, H, N, d), d, s, device).requires_grad_() for s in range(2)]
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        spikeops.token_attention(q, k, backend=backend)
    assert sum(saved.values()) == T * B * H * N * 4 + k.numel() // 8


def test_bad_input_is_rejected():
    q, k = spikes((2, 1, 1, 8, 4), 4, 0), spikes((2, 1, 1, 8, 4), 4, 1)
    for backend in KERNEL_BACKENDS + ("torch",):
        with pytest.raises(ValueError, match="0 and 1"):
            spikeops.token_attention(q.to(device_for(backend) if backend != "torch" else "cpu"),
                                     (k * 3).to(device_for(backend) if backend != "torch" else "cpu"), backend=backend)
    with pytest.raises(ValueError, match="k must have q's shape"):
        spikeops.token_attention(q, k[..., :2])
    with pytest.raises(ValueError, match="p must share q's dtype"):
        spikeops.token_attention(q, k, k.half())
    with pytest.raises(ValueError, match=r"\[T, B, H, N, d\]"):
        spikeops.token_attention(q[0], k[0])
    with pytest.raises(ValueError, match="mode must be one of"):
        spikeops.token_attention(q, k, mode="spatial")
    with pytest.raises(ValueError, match="tau must be > 1"):
        spikeops.token_attention(q, k, tau=0.5)
    with pytest.raises(TypeError, match="k must be a floating tensor"):
        spikeops.token_attention(q, k.to(torch.int8))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", ["q", "k", "p"])
@pytest.mark.parametrize("grad", [False, True])
def test_non_binary_input_in_the_modules_layout_is_named(name, grad, backend):
    # heads of [T, B, C, N] activations: [T, B, H, N, d] views of contiguous [T, B, H, d, N]
    named = {n: spikes((2, 1, 2, 5, 64), 5, seed, device_for(backend)).transpose(-1, -2)
             for seed, n in enumerate("qkp")}
    named[name] = named[name] * 2
    if grad:
        named = {n: x.requires_grad_() for n, x in named.items()}
    with pytest.raises(ValueError, match=f"{name} must hold only 0 and 1"):
        spikeops.token_attention(named["q"], named["k"], named["p"], backend=backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", ["q", "k", "p"])
@pytest.mark.parametrize("step", [0, 1, 2])
def test_one_non_binary_value_at_any_step_of_the_modules_layout_is_named(name, step, backend):
    # the C++ kernel sums step t + 1's q and p while it writes step t's output: each step is checked
    named = {n: spikes((3, 1, 2, 5, 70), 5, seed, device_for(backend)) for seed, n in enumerate("qkp")}
    named[name][step, 0, 1, 4, 69] = 0.5
    with pytest.raises(ValueError, match=f"{name} must hold only 0 and 1"):
        spikeops.token_attention(*(named[n].transpose(-1, -2) for n in "qkp"), backend=backend)


class OpNames(TorchDispatchMode):
    """Records the ops that run under it."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("with_p", [False, True])
@pytest.mark.parametrize("N,dtype", [(64, torch.float32), (1100, torch.float32), (1100, torch.bfloat16),
                                     (70, torch.float16)])
def test_modules_layout_runs_its_own_kernels_and_matches_reference(backend, N, dtype, with_p):
    # [T, B, H, N, d] views of contiguous [T, B, H, d, N] (the modules' heads); N = 1100: more than
    # one C++ run of 1024 tokens and not a whole number of 64-bit words
    device = device_for(backend)
    shape = (3, 1, 2, N, 6)
    tensors = [spikes((3, 1, 2, 6, N), 6, seed, device, dtype).mT for seed in range(3 if with_p else 2)]
    assert not tensors[0].is_contiguous() and tensors[0].mT.is_contiguous()
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(7)).to(device)
    with OpNames() as ops:
        out, grads = run(lambda *x: spikeops.token_attention(*x, backend=backend), tensors, grad)
    assert {"spikeops.token_attention_cf_forward", "spikeops.token_attention_cf_backward"} <= ops.names
    expected, ref_grads = run(reference.token_attention, [t.cpu() for t in tensors], grad.cpu())
    assert out.dtype == dtype and torch.equal(out.cpu(), expected) and 0 < expected.sum()
    for g, rg in zip(grads, ref_grads):
        assert_grads_close(g, rg, rtol=1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_ops_pass_opcheck(backend):
    device = device_for(backend)
    q, k, p = [spikes((2, 3, 10, 8), 8, s, device).requires_grad_() for s in range(3)]
    torch.library.opcheck(torch.ops.spikeops.token_attention_forward.default, (q, k, p, 0.5, 2.0, True, backend))
    torch.library.opcheck(torch.ops.spikeops.token_attention_forward.default, (q, k, None, 0.5, 2.0, True, backend))


def unfused_block(m, x):
    """The module's math from its own convs/BNs and reference ops."""
    T, B, C, N = x.shape

    def branch(b, inp):
        y = b.bn(torch.nn.functional.conv1d(inp.flatten(0, 1), b.conv.weight, b.conv.bias, padding=b.conv.padding))
        return reference.lif(y.view(T, B, C, N))

    def heads(t):
        return t.view(T, B, m.num_heads, C // m.num_heads, N).transpose(-1, -2)

    p = heads(branch(m.p, x)) if m.p is not None else None
    a = reference.token_attention(heads(branch(m.q, x)), heads(branch(m.k, x)), p, m.attn_v_threshold)
    return branch(m.proj, a.transpose(-1, -2).reshape(T, B, C, N))


@pytest.mark.parametrize("cls", [spikeops.nn.QKTokenAttention, spikeops.nn.MultiScaleSpikingAttention])
def test_modules_match_the_unfused_composition(cls):
    torch.manual_seed(0)
    ours = cls(24, 3)
    twin = copy.deepcopy(ours)
    x = (torch.rand(4, 2, 24, 32) < 0.3).float()
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, ref = ours(x1), unfused_block(twin, x2)
    assert torch.equal(out, ref) and 0 < out.sum()
    g = torch.randn(out.shape)
    out.backward(g)
    ref.backward(g)
    assert_grads_close(x1.grad, x2.grad)
    for (name, p), (_, p2) in zip(ours.named_parameters(), twin.named_parameters()):
        if name == "proj.conv.bias":  # right before training-mode BN: true gradient 0, both hold rounding noise
            continue
        assert_grads_close(p.grad, p2.grad)


def test_module_configuration_errors():
    with pytest.raises(ValueError, match="num_heads \\(5\\) must be a positive divisor of dim \\(24\\)"):
        spikeops.nn.MultiScaleSpikingAttention(24, 5)
    with pytest.raises(ValueError, match="p_kernel_size must be a positive odd number"):
        spikeops.nn.MultiScaleSpikingAttention(24, 3, p_kernel_size=2)
    with pytest.raises(ValueError, match=r"\[T, B, C=24, N\]"):
        spikeops.nn.QKTokenAttention(24, 3)(torch.zeros(2, 1, 12, 5))
