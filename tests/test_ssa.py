"""spikeops.ssa: the fused attention equals the reference (spikes exact, gradients 1e-5) on each backend."""
import pytest
import torch

import spikeops
from spikeops import reference
from harness import KERNEL_BACKENDS, assert_grads_close, device_for


def qkv(shape, densities=(0.3, 0.4, 0.5), seed=0, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(shape, generator=g) < p).to(dtype).to(device) for p in densities]


def run(fn, tensors, grad):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(grad.to(out.dtype))
    return out.detach(), [leaf.grad for leaf in leaves]


# (T, B, H, N, d): N > d takes Q (K^T V), N <= d takes (Q K^T) V; odd sizes and T=1 included
SHAPES = [(4, 2, 3, 20, 8), (3, 2, 2, 5, 16), (1, 1, 1, 70, 3), (4, 1, 2, 16, 16), (2, 1, 2, 40, 24), (2, 2, 1, 9, 70)]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_spikes_and_grads_match_reference(backend, shape):
    device = device_for(backend)
    tensors = qkv(shape, device=device)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(9)).to(device)
    out, grads = run(lambda q, k, v: spikeops.ssa(q, k, v, backend=backend), tensors, grad)
    ref, ref_grads = run(reference.ssa, [t.cpu() for t in tensors], grad.cpu())
    assert torch.equal(out.cpu(), ref)
    assert 0 < ref.sum() < ref.numel()
    for g, rg in zip(grads, ref_grads):
        assert_grads_close(g, rg, rtol=1e-5)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("scale,v_threshold,tau", [(0.25, 1.0, 3.0), (0.05, 0.3, 1.5), (0.125, 0.5, 4.0)])
def test_settings_reach_the_kernel(backend, scale, v_threshold, tau):
    device = device_for(backend)
    tensors = qkv((3, 1, 2, 24, 8), device=device)
    kw = dict(scale=scale, v_threshold=v_threshold, tau=tau)
    assert torch.equal(spikeops.ssa(*tensors, backend=backend, **kw).cpu(), reference.ssa(*[t.cpu() for t in tensors], **kw))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("N,d", [(64, 64), (64, 32), (33, 7), (130, 24), (9, 130)])
def test_rows_from_empty_to_full_match_reference(backend, N, d):
    # row n of q, k and v holds about n / N spikes per column: every count of set bits in a
    # row (0 .. d) and in a column of K (the CPU kernel's sums take the first bits of a word
    # without branching on them and the rest with, an empty word reading a zero row). d 7-130:
    # every lane width of the C++ sums and neuron (int16 lanes: 16-wide vectors for d <= 16,
    # 32-wide for d 17-32 and 49+, a lane mask where 16 does not divide d); N 130, d 130: bit rows
    # of several words
    device = device_for(backend)
    g = torch.Generator().manual_seed(3)
    rate = (torch.arange(N, dtype=torch.float32) / (N - 1)).view(1, 1, 1, N, 1)
    tensors = [(torch.rand((2, 1, 2, N, d), generator=g) < rate).float() for _ in range(3)]
    tensors[1] = tensors[1].flip(-2)  # K's columns: spikes at the other end from Q's and V's
    grad = torch.randn((2, 1, 2, N, d), generator=g)
    out, grads = run(lambda q, k, v: spikeops.ssa(q, k, v, scale=0.02, backend=backend),
                     [t.to(device) for t in tensors], grad.to(device))
    ref, ref_grads = run(lambda q, k, v: reference.ssa(q, k, v, scale=0.02), tensors, grad)
    assert torch.equal(out.cpu(), ref)
    assert 0 < ref.sum() < ref.numel()
    for g_, rg in zip(grads, ref_grads):
        assert_grads_close(g_, rg, rtol=1e-5)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_counts_beyond_fp16_exact_integers_stay_exact(backend):
    # all-ones V and K of density 0.98: K^T V entries near N = 2100 > 2048, in the forward and
    # where backward recomputes the forward's H
    device = device_for(backend)
    shape = (1, 1, 1, 2100, 2)
    q = (torch.rand(shape, generator=torch.Generator().manual_seed(1)) < 0.5).float().to(device)
    k = (torch.rand(shape, generator=torch.Generator().manual_seed(2)) < 0.98).float().to(device)
    v = torch.ones(shape, device=device)
    assert (k.sum(-2) > 2048).all()
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(device)
    scale = 1.0 / 2100.0
    out, grads = run(lambda q, k, v: spikeops.ssa(q, k, v, scale=scale, backend=backend), (q, k, v), grad)
    ref, ref_grads = run(lambda q, k, v: reference.ssa(q, k, v, scale=scale), [t.cpu() for t in (q, k, v)], grad.cpu())
    assert torch.equal(out.cpu(), ref) and 0 < ref.sum() < ref.numel()
    for g, rg in zip(grads, ref_grads):
        assert_grads_close(g, rg, rtol=1e-5)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_counts_beyond_int16_stay_exact(backend):
    # N d = 36000 > 32767: the C++ kernel sums in int32 lanes. All-ones K and V make every entry
    # of K^T V equal N = 300 and Y = 300 * (spikes in the row of Q): ~34000 at density 0.95, past
    # int16, with the threshold amid the rows' values so that both outcomes occur.
    device = device_for(backend)
    shape = (2, 1, 1, 300, 120)
    q = (torch.rand(shape, generator=torch.Generator().manual_seed(3)) < 0.95).float().to(device)
    k, v = torch.ones(shape, device=device), torch.ones(shape, device=device)
    assert (300 * q.sum(-1)).max() > 32767
    scale = 1.0 / 36000.0
    out = spikeops.ssa(q, k, v, scale=scale, v_threshold=0.475, backend=backend)
    ref = reference.ssa(q.cpu(), k.cpu(), v.cpu(), scale=scale, v_threshold=0.475)
    assert torch.equal(out.cpu(), ref)
    assert 0 < ref[0].sum() < ref[0].numel()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_random_spikes_in_the_int32_count_range_match_reference(backend):
    device = device_for(backend)
    shape = (2, 1, 2, 300, 120)
    tensors = qkv(shape, densities=(0.2, 0.3, 0.4), seed=5, device=device)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(6)).to(device)
    out, grads = run(lambda q, k, v: spikeops.ssa(q, k, v, scale=0.001, backend=backend), tensors, grad)
    ref, ref_grads = run(lambda q, k, v: reference.ssa(q, k, v, scale=0.001), [t.cpu() for t in tensors], grad.cpu())
    assert torch.equal(out.cpu(), ref)
    assert 0 < ref.sum() < ref.numel()
    for g, rg in zip(grads, ref_grads):
        assert_grads_close(g, rg, rtol=1e-5)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_spikes(backend, dtype):
    device = device_for(backend)
    shape = (2, 2, 2, 12, 8)
    tensors = qkv(shape, device=device, dtype=dtype)
    grad = torch.randn(shape).to(device)
    out, grads = run(lambda q, k, v: spikeops.ssa(q, k, v, backend=backend), tensors, grad)
    ref, ref_grads = run(reference.ssa, [t.cpu() for t in tensors], grad.cpu())
    assert out.dtype == dtype and torch.equal(out.cpu(), ref)
    for g, rg in zip(grads, ref_grads):
        assert g.dtype == dtype
        assert_grads_close(g, rg, rtol=1e-2)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_backward_keeps_q_k_v_as_bits(backend):
    device = device_for(backend)
    shape = (4, 2, 2, 16, 64)
    q, k, v = [t.requires_grad_() for t in qkv(shape, device=device)]
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        spikeops.ssa(q, k, v, backend=backend)
    assert sum(saved.values()) == 3 * q.numel() // 8  # 1 bit per spike, d = 64: no padding


@pytest.mark.parametrize("bad_value", [0.5, 1.0001, float("nan")])  # 1.0001 is 1 in fp16: checked before any cast
@pytest.mark.parametrize("which", [0, 1, 2])
def test_non_binary_input_is_rejected_on_every_backend(which, bad_value):
    for backend in KERNEL_BACKENDS + ("torch",):
        tensors = qkv((2, 1, 1, 8, 4), device=device_for(backend) if backend != "torch" else "cpu")
        tensors[which][1, 0, 0, 5, 2] = bad_value  # one value, at the last step
        with pytest.raises(ValueError, match="0 and 1"):
            spikeops.ssa(*tensors, backend=backend)


def test_bad_shapes_and_settings_are_rejected():
    q, k, v = qkv((2, 1, 1, 8, 4))
    with pytest.raises(ValueError, match=r"\[T, B, H, N, d\]"):
        spikeops.ssa(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="k must have q's shape"):
        spikeops.ssa(q, k[:, :, :, :4], v)
    with pytest.raises(ValueError, match="k must share q's dtype and device"):
        spikeops.ssa(q, k.half(), v)
    with pytest.raises(ValueError, match="tau must be > 1"):
        spikeops.ssa(q, k, v, tau=1.0)
    with pytest.raises(ValueError, match="scale must be finite"):
        spikeops.ssa(q, k, v, scale=float("inf"))
    with pytest.raises(ValueError, match="T=0"):
        spikeops.ssa(q[:0], k[:0], v[:0])
    with pytest.raises(TypeError, match="q must be a floating tensor"):
        spikeops.ssa(q.bool(), k, v)


def test_float64_runs_the_reference():
    tensors = [t.double() for t in qkv((2, 1, 1, 8, 4))]
    assert torch.equal(spikeops.ssa(*tensors), reference.ssa(*tensors))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_forward_op_passes_opcheck(backend):
    device = device_for(backend)
    q, k, v = [t.view(2, 2, 12, 8).requires_grad_() for t in qkv((2, 1, 2, 12, 8), device=device)]
    torch.library.opcheck(torch.ops.spikeops.ssa_forward.default, (q, k, v, 0.125, 0.5, 2.0, True, backend))


def test_compiled_attention_matches_eager():
    tensors = [t.requires_grad_() for t in qkv((2, 1, 2, 12, 8))]
    fn = torch.compile(lambda q, k, v: spikeops.ssa(q, k, v), fullgraph=True, backend="aot_eager")
    out = fn(*tensors)
    assert torch.equal(out, reference.ssa(*tensors))
    out.sum().backward()
    assert all(t.grad is not None for t in tensors)


@pytest.mark.parametrize("N,d", [(40, 24), (33, 64)])
def test_triton_fused_and_unfused_backward_agree(N, d):
    from spikeops.triton import ssa as triton_ssa

    device = device_for("triton")
    q, k, v = (t.view(3, 2, N, d) for t in qkv((3, 1, 2, N, d), device=device))
    _, qw, kw, vw, _ = triton_ssa.ssa_forward(q, k, v, 0.125, 0.5, 2.0, True)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(4)).to(device)
    fused = triton_ssa.ssa_backward_fused(grad, qw, kw, vw, 0.125, 0.5, 2.0)
    unfused = triton_ssa.ssa_backward_unfused(grad, qw, kw, vw, 0.125, 0.5, 2.0)
    for a, b in zip(fused, unfused):
        assert_grads_close(a, b, rtol=1e-5)
