"""batch_norm_lif: LIF(BN(y)) keeping only y for backward, equal to the two modules in turn."""
import copy

import pytest
import torch
from torch import nn

import spikeops
from spikeops.memory import saved_bytes
from spikeops.ops.batch_norm_lif import batch_norm_lif
from harness import KERNEL_BACKENDS, device_for


def inputs(kind, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "bn1d":
        return torch.randn(shape, generator=g) * 2 + 0.5
    return torch.randn(shape, generator=g) * 2 + 0.5


def modules(kind, channels, backend, **bn_kwargs):
    torch.manual_seed(0)
    bn = (nn.BatchNorm1d if kind == "bn1d" else nn.BatchNorm2d)(channels, **bn_kwargs)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.2, 0.2)
    return bn, spikeops.nn.LIF(tau=2.0, detach_reset=True, backend=backend)


SHAPES = {"bn1d": (4 * 2 * 5, 8), "bn2d": (4 * 2, 6, 5, 3)}


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("kind", ["bn1d", "bn2d"])
@pytest.mark.parametrize("momentum,track", [(0.1, True), (None, True), (0.1, False)])
def test_fused_equals_batch_norm_then_lif(backend, kind, momentum, track):
    dev = device_for(backend)
    bn, lif = modules(kind, SHAPES[kind][1], backend, momentum=momentum, track_running_stats=track)
    bn = bn.to(dev)
    bn2, lif2 = copy.deepcopy(bn), spikeops.nn.LIF(tau=2.0, detach_reset=True, backend="torch")
    for step in range(2):  # twice: running statistics accumulate the same way
        base = inputs(kind, SHAPES[kind], seed=step).to(dev)
        y, y2 = base.clone().requires_grad_(), base.clone().requires_grad_()
        out = batch_norm_lif(y, bn, lif, T=4)
        z = bn2(y2)
        ref = lif2(z.view(4, -1, *z.shape[1:])).view(z.shape)
        assert torch.equal(out, ref) and 0 < out.sum() < out.numel()
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(dev)
        out.backward(g)
        ref.backward(g)
        scale = y2.grad.abs().max()
        torch.testing.assert_close(y.grad, y2.grad, rtol=1e-5, atol=1e-6 * scale)
        for p, p2 in zip(bn.parameters(), bn2.parameters()):
            torch.testing.assert_close(p.grad, p2.grad, rtol=1e-5, atol=1e-6 * p2.grad.abs().max())
        for b, b2 in zip(bn.buffers(), bn2.buffers()):
            if dev.type == "cuda":  # nn.BatchNorm2d runs cuDNN's kernel there: last-bit differences
                torch.testing.assert_close(b, b2, rtol=1e-6, atol=0)
            else:
                assert torch.equal(b, b2)


def test_eval_mode_uses_the_running_statistics_in_forward_and_backward():
    bn, lif = modules("bn2d", 6, "auto")
    bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    bn.eval()
    bn2, lif2 = copy.deepcopy(bn), spikeops.nn.LIF(backend="torch")
    y = inputs("bn2d", SHAPES["bn2d"]).requires_grad_()
    y2 = y.detach().clone().requires_grad_()
    out = batch_norm_lif(y, bn, lif, T=4)
    ref = lif2(bn2(y2).view(4, 2, 6, 5, 3)).view(8, 6, 5, 3)
    assert torch.equal(out, ref)
    bn.running_mean.zero_()  # a later change of the buffers does not change this backward
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(y.grad, y2.grad, rtol=1e-5, atol=1e-7)


def test_keeps_one_float_per_neuron_instead_of_two():
    bn, lif = modules("bn2d", 16, "auto")
    y = torch.randn(4 * 2, 16, 8, 8, requires_grad=True)
    fused = saved_bytes(lambda t: batch_norm_lif(t, bn, lif, 4), y)
    unfused = saved_bytes(lambda t: lif(bn(t).view(4, 2, 16, 8, 8)), y)
    assert fused <= y.numel() * 4 + 4096
    assert unfused >= 2 * y.numel() * 4


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_channels_last_input_is_fused_and_equals_the_two_modules(backend, dtype):
    """A channels-last y (a channels-last stem's convolution output) runs fused on CPU as its
    [T*B*H*W, C] view; the spikes come back channels-last and equal the two modules' on y."""
    dev = device_for(backend)
    bn, lif = modules("bn2d", 37, backend)  # 37 channels: vector tails in the [rows, C] kernels
    bn = bn.to(dev)
    bn2 = copy.deepcopy(bn)
    base = inputs("bn2d", (4 * 2, 37, 5, 3)).to(dev, dtype).contiguous(memory_format=torch.channels_last)
    y, y2 = base.clone().requires_grad_(), base.clone().requires_grad_()
    out = batch_norm_lif(y, bn, lif, T=4)
    z = bn2(y2)
    z.retain_grad()
    ref = lif(z.view(4, -1, *z.shape[1:])).view(z.shape)
    assert torch.equal(out, ref) and 0 < out.sum() < out.numel()
    assert out.is_contiguous(memory_format=torch.channels_last)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(dev, dtype)
    out.backward(g)
    ref.backward(g)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5  # the C++ backward through BatchNorm: rounding
    torch.testing.assert_close(y.grad, y2.grad, rtol=tol, atol=tol * y2.grad.abs().max().item())
    # dL/dweight, dL/dbias against float64 sums of the two modules' dL/dZ (ATen's own channels-last
    # bf16 backward is off by ~0.2% in dL/dbias here, so it is not the yardstick)
    dz, yd = z.grad.double(), base.double()
    mean = yd.mean((0, 2, 3), keepdim=True)
    invstd = (yd.var((0, 2, 3), unbiased=False, keepdim=True) + bn.eps).rsqrt()
    for p, exact in zip(bn.parameters(), [(dz * (yd - mean) * invstd).sum((0, 2, 3)), dz.sum((0, 2, 3))]):
        torch.testing.assert_close(p.grad.double(), exact, rtol=1e-5, atol=1e-6 * exact.abs().max().item())
    for b, b2 in zip(bn.buffers(), bn2.buffers()):
        assert torch.equal(b, b2)
    if dev.type == "cpu":  # (on CUDA channels-last input runs the two modules)
        fused = saved_bytes(lambda t: batch_norm_lif(t, bn, lif, 4), base.clone().requires_grad_())
        assert fused <= base.numel() * base.element_size() + 4096  # y only


def test_time_steps_must_divide_the_rows():
    bn, lif = modules("bn1d", 8, "auto")
    with pytest.raises(ValueError, match="T=3"):
        batch_norm_lif(torch.randn(10, 8), bn, lif, T=3)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
# affine=False: fp32 running statistics with fp16/bf16 y and no weight make ATen compute fp32 batch
# statistics, no running statistics half-precision ones (and another Z): backward must recompute
# BatchNorm with the forward's kind of running statistics
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
def test_half_precision_input_is_fused_and_equals_the_two_modules(backend, dtype, affine):
    dev = device_for(backend)
    bn, lif = modules("bn2d", 6, backend)
    if not affine:
        bn = nn.BatchNorm2d(6, affine=False)
    bn = bn.to(dev)
    bn2 = copy.deepcopy(bn)
    base = inputs("bn2d", SHAPES["bn2d"]).to(dev, dtype)
    y, y2 = base.clone().requires_grad_(), base.clone().requires_grad_()
    out = batch_norm_lif(y, bn, lif, T=4)
    z = bn2(y2)  # nn.BatchNorm2d on fp16/bf16 input: fp32 statistics, output in the input's dtype
    ref = lif(z.view(4, -1, *z.shape[1:])).view(z.shape)
    assert out.dtype == dtype and torch.equal(out, ref) and 0 < out.sum() < out.numel()
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(dev, dtype)
    out.backward(g)
    ref.backward(g)
    # H recomputed bit for bit from y; the BatchNorm backward is ATen's, except in the C++ backend's
    # one call through both layers (bf16 with affine here: lif_backward_through_bn, ATen's formula
    # with other sums): equal up to rounding there
    through_bn = backend == "cpp" and dtype == torch.bfloat16 and affine
    if through_bn:
        torch.testing.assert_close(y.grad, y2.grad, rtol=1e-2, atol=1e-2 * y2.grad.abs().max().item())
    else:
        torch.testing.assert_close(y.grad, y2.grad, rtol=0, atol=0)
    for p, p2 in zip(bn.parameters(), bn2.parameters()):
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, p2.grad, rtol=1e-5 if through_bn else 1e-6, atol=0)
    fused = saved_bytes(lambda t: batch_norm_lif(t, bn, lif, 4), base.clone().requires_grad_())
    assert fused <= base.numel() * 2 + 4096  # the half-precision y only


SHAPES_AS_ATEN_LAYS_THEM = [((8, 6, 5, 3), True), ((4 * 10, 8), True), ((4, 3, 37), True), ((8, 48, 7, 7), True),
                            ((4, 40, 16), True), ((8, 6, 5, 3), False), ((4 * 30, 33), True), ((4, 5, 64), True)]


def bn_case(dtype, shape, affine, seed=0):
    """(y, grad_spikes [T, M], mean, invstd, weight, bias, lif_args) of a training-mode ATen BatchNorm."""
    from spikeops.ops.batch_norm_lif import _batch_norm
    from spikeops.ops.lif import SURROGATE_IDS
    g = torch.Generator().manual_seed(seed)
    y = inputs("bn2d", shape, seed).to(dtype)
    weight = torch.rand(shape[1], generator=g) + 0.5 if affine else None
    bias = torch.rand(shape[1], generator=g) - 0.5 if affine else None
    with torch.no_grad():  # fp32 running statistics (as nn.BatchNorm keeps them) give fp32 batch statistics
        _, mean, invstd, _, _ = _batch_norm(y, weight, bias, torch.zeros(shape[1]), torch.ones(shape[1]), True, 0.0,
                                            1e-5)
    T = 4 if shape[0] % 4 == 0 else 1
    grad = torch.randn(shape, generator=g).to(dtype).view(T, -1)
    return y, grad, mean, invstd, weight, bias, (2.0, 0.5, 0.0, True, True, True, SURROGATE_IDS["sigmoid"], 4.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape,affine", SHAPES_AS_ATEN_LAYS_THEM)
def test_cpp_backward_computes_the_batch_norm_output_as_aten_does(dtype, shape, affine):
    """Training on the C++ backend, backward computes BN(y) inside the LIF kernel from the forward's
    statistics instead of running BatchNorm again: the same dL/dZ, bit for bit, as the LIF backward
    of ATen's BN(y) (shapes with SIMD remainders, channels at dim 1 of [N, C, L] and [N, C] rows, as
    ATen lays them out; a BatchNorm without weight and bias)."""
    pytest.importorskip("spikeops._C", reason="the C++ extension is not built (make setup builds it)")
    from spikeops import backend
    from spikeops.ops import batch_norm_lif as module
    assert module._kernel_affine_matches_aten(dtype), "this torch's BatchNorm computes Z otherwise (kernel path off)"
    y, grad, mean, invstd, weight, bias, lif_args = bn_case(dtype, shape, affine)
    with torch.no_grad():
        z = module._batch_norm(y, weight, bias, torch.zeros(shape[1]), torch.ones(shape[1]), True, 0.0, 1e-5)[0]
    expected = backend.kernel("lif", "lif_backward_from_input", "cpp")(grad, z.view(grad.shape), *lif_args)
    assert torch.equal(module._lif_backward_from_bn_input(grad, y, mean, invstd, weight, bias, *lif_args), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape,affine", SHAPES_AS_ATEN_LAYS_THEM)
def test_cpp_forward_computes_the_batch_statistics_and_output_as_aten_does(dtype, shape, affine):
    """Training on the C++ backend, the forward takes ATen's statistics without its output pass and
    computes BN(y) inside the LIF kernel: the same batch statistics, running statistics and spikes,
    bit for bit, as ATen's BatchNorm followed by the LIF kernel."""
    pytest.importorskip("spikeops._C", reason="the C++ extension is not built (make setup builds it)")
    from spikeops import backend
    from spikeops.ops import batch_norm_lif as module
    assert module._kernel_forward_matches_aten(dtype), "this torch's BatchNorm differs (kernel path off)"
    y, grad, _, _, weight, bias, lif_args = bn_case(dtype, shape, affine)
    g = torch.Generator().manual_seed(3)
    running = torch.randn(shape[1], generator=g), torch.rand(shape[1], generator=g) + 0.5
    aten_running, ours_running = [r.clone() for r in running], [r.clone() for r in running]
    with torch.no_grad():
        z, mean, invstd, _, _ = module._batch_norm(y, weight, bias, *aten_running, True, 0.1, 1e-5)
    mean2, invstd2 = module._batch_stats(y, *ours_running, 0.1, 1e-5)
    assert torch.equal(mean2, mean) and torch.equal(invstd2, invstd)
    assert all(torch.equal(a, b) for a, b in zip(ours_running, aten_running))
    expected, _ = backend.kernel("lif", "lif_forward", "cpp")(z.view(grad.shape), *lif_args[:5], False, False)
    inner = y[0, 0].numel()
    spikes = module._lif_forward_from_bn_input(y.view(grad.shape), mean2, invstd2, weight, bias, inner, lif_args)
    assert torch.equal(spikes, expected) and 0 < spikes.sum() < spikes.numel()


def test_cpp_training_forward_runs_no_batch_norm_output_pass():
    pytest.importorskip("spikeops._C", reason="the C++ extension is not built (make setup builds it)")
    bn, lif = modules("bn2d", 6, "cpp")
    y = inputs("bn2d", SHAPES["bn2d"]).requires_grad_()
    batch_norm_lif(y, bn, lif, T=4)  # the first call checks ATen's BatchNorm once (it runs it): not profiled
    with torch.profiler.profile() as prof:
        batch_norm_lif(y, bn, lif, T=4)
    ops = {e.name for e in prof.events()}
    assert "aten::batch_norm_update_stats" in ops and "aten::native_batch_norm" not in ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape,affine", SHAPES_AS_ATEN_LAYS_THEM)
def test_cpp_backward_through_batch_norm_is_atens_up_to_rounding(dtype, shape, affine, monkeypatch):
    """The C++ backend's one call through LIF and BatchNorm in training mode (lif_backward_through_bn:
    BatchNorm's channel sums taken from dL/dZ chunk by chunk, ATen's formula): dL/dy, dL/dweight and
    dL/dbias within twice ATen's own error of the float64 BatchNorm backward of the same dL/dZ; and
    batch_norm_lif takes it, its gradients close to those of the path through ATen's BatchNorm."""
    pytest.importorskip("spikeops._C", reason="the C++ extension is not built (make setup builds it)")
    from spikeops.ops import batch_norm_lif as module
    y, grad, mean, invstd, weight, bias, lif_args = bn_case(dtype, shape, affine, seed=1)
    grad_z = module._lif_backward_from_bn_input(grad, y, mean, invstd, weight, bias, *lif_args).view(y.shape)
    w = torch.ones(shape[1]) if weight is None else weight
    exact = torch.ops.aten.native_batch_norm_backward(grad_z.double(), y.double(), w.double(), None, None,
                                                      mean.double(), invstd.double(), True, 1e-5, [True] * 3)
    aten = torch.ops.aten.native_batch_norm_backward(grad_z, y, w, None, None, mean, invstd, True, 1e-5, [True] * 3)
    ours = module._lif_backward_through_bn(grad, y, mean, invstd, weight, bias, True, *lif_args)
    for o, a, e in zip((ours[0].view(y.shape), *ours[1:]), aten, exact):
        assert o.dtype == a.dtype and o.shape == a.shape
        assert (o.double() - e).abs().max() <= 2 * (a.double() - e).abs().max() + 1e-6 * e.abs().max()

    calls, grads = [], {}
    through = module._lif_backward_through_bn
    monkeypatch.setattr(module, "_lif_backward_through_bn", lambda *a: calls.append(1) or through(*a))
    for fused in (True, False):
        monkeypatch.setitem(module._AFFINE_MATCHES_ATEN, dtype, fused)  # False: BatchNorm again, ATen's backward
        bn, lif = modules("bn1d" if len(shape) == 2 else "bn2d", shape[1], "cpp")
        if len(shape) == 3 or not affine:
            bn = (nn.BatchNorm1d if len(shape) == 3 else nn.BatchNorm2d)(shape[1], affine=affine)
        leaf = y.clone().requires_grad_()
        out = batch_norm_lif(leaf, bn, lif, T=grad.shape[0])
        out.backward(grad.view(out.shape))
        grads[fused] = [leaf.grad] + ([bn.weight.grad, bn.bias.grad] if affine else [])
    assert len(calls) == 1  # the first pass took it, the second did not
    for a, b in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, b, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                                   atol=(1e-2 if dtype == torch.bfloat16 else 1e-6) * b.abs().max().item())


def test_autocast_linear_bn_lif_keeps_only_the_half_precision_input_of_the_batch_norm():
    torch.manual_seed(0)
    layer = spikeops.nn.SpikeLinearBNLIF(32, 64, backend="cpp")
    x = (torch.rand(4, 2, 16, 32, generator=torch.Generator().manual_seed(1)) < 0.3).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kept = saved_bytes(layer, x.clone().requires_grad_())
        out = layer(x)
    assert out.dtype == torch.bfloat16 and bool(((out == 0) | (out == 1)).all())
    neurons = 4 * 2 * 16 * 64
    # the BN input in bf16 (2 bytes per neuron) + the spikes' bits + the weight's bf16 copy;
    # unfused it would also keep the neuron state (4 bytes per neuron)
    assert kept <= neurons * 2 + x.numel() // 8 + 64 * 32 * 2 + 4096
