"""spikeops.masked_batch_norm2d: gather visible -> BatchNorm1d -> scatter, every backend."""
import pytest
import torch
from torch import nn

import spikeops
from spikeops import reference
from harness import KERNEL_BACKENDS, assert_grads_close, device_for

ALL_BACKENDS = KERNEL_BACKENDS + ("torch",)


def dev(backend):
    return device_for(backend) if backend != "torch" else torch.device("cpu")


def inputs(N=4, C=6, H=16, W=16, mshape=(4, 4, 4), seed=0, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(N, C, H, W, generator=g) * 2 + 1).to(device, dtype)
    m = torch.rand(mshape[0], 1, *mshape[1:], generator=g) < 0.5
    m[0, 0, 0, 0], m[-1, 0, -1, -1] = True, False
    w, b = torch.randn(C, generator=g) + 1, torch.randn(C, generator=g)
    rm, rv = torch.randn(C, generator=g), torch.rand(C, generator=g) + 0.5
    return x, m.to(device), w.to(device), b.to(device), rm.to(device), rv.to(device)


def bn1d_reference(x, m, bn: nn.BatchNorm1d):
    """The issue's ground truth, spelled out with nn.BatchNorm1d: gather visible [P, C] -> BN1d -> scatter."""
    up = reference.upsample_mask(m, x.shape[0], x.shape[-2:])[:, 0]
    nhwc = x.permute(0, 2, 3, 1)
    out = torch.zeros_like(nhwc)
    out[up] = bn(nhwc[up])
    return out.permute(0, 3, 1, 2)


def grads_of(fn, tensors, grad):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(grad.to(out.dtype))
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_matches_gather_batchnorm1d_scatter(backend, training, affine):
    d = dev(backend)
    x, m, w, b, rm, rv = inputs(device=d)
    bn = nn.BatchNorm1d(x.shape[1], momentum=0.2, eps=1e-4, affine=affine).train(training)
    with torch.no_grad():
        bn.running_mean.copy_(rm.cpu())
        bn.running_var.copy_(rv.cpu())
        if affine:
            bn.weight.copy_(w.cpu())
            bn.bias.copy_(b.cpu())
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    rm_ours, rv_ours = rm.clone(), rv.clone()

    def ours(x_, w_, b_):
        return spikeops.masked_batch_norm2d(x_, m, rm_ours, rv_ours, w_ if affine else None, b_ if affine else None,
                                            training, 0.2, 1e-4, backend=backend)

    out, (gx, gw, gb) = grads_of(ours, [x, w, b], grad.to(d))
    xr = x.detach().cpu().requires_grad_()
    expected = bn1d_reference(xr, m.cpu(), bn)
    expected.backward(grad)
    up = reference.upsample_mask(m.cpu(), x.shape[0], x.shape[-2:]).expand(x.shape)
    assert bool((out.cpu()[~up] == 0).all()) and bool((gx.cpu()[~up] == 0).all())
    assert_grads_close(out, expected.detach())
    assert_grads_close(gx, xr.grad)
    if affine:
        assert_grads_close(gw, bn.weight.grad)
        assert_grads_close(gb, bn.bias.grad)
    else:
        assert gw is None and gb is None
    # running stats: updated from the visible positions only in training, untouched in eval
    assert_grads_close(rm_ours, bn.running_mean)
    assert_grads_close(rv_ours, bn.running_var)
    assert torch.equal(rm_ours.cpu(), rm.cpu()) != training


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_batch_statistics_ignore_masked_values(backend):
    """Changing x at masked positions changes nothing, visible stats give mean 0 / var 1."""
    d = dev(backend)
    x, m, *_ = inputs(C=37, device=d)  # several 16-channel tiles
    up = reference.upsample_mask(m, x.shape[0], x.shape[-2:]).expand(x.shape)
    y1 = spikeops.masked_batch_norm2d(x, m, training=True, backend=backend)
    y2 = spikeops.masked_batch_norm2d(torch.where(up, x, 1e3), m, training=True, backend=backend)
    assert torch.equal(y1, y2)
    vis = y1.permute(1, 0, 2, 3)[up.permute(1, 0, 2, 3)].view(x.shape[1], -1).double()
    torch.testing.assert_close(vis.mean(1), torch.zeros(x.shape[1], dtype=torch.float64, device=d), atol=1e-5, rtol=0)
    torch.testing.assert_close(vis.var(1, unbiased=False), torch.ones(x.shape[1], dtype=torch.float64, device=d),
                               atol=1e-3, rtol=0)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_mask_broadcast_over_time_and_resolutions(backend):
    """A [B, 1, h, w] mask serves x = [T*B, ...] (time-major) and any h | H grid (here 1x1 cells)."""
    d = dev(backend)
    T, B = 3, 2
    x, _, w, b, *_ = inputs(N=T * B, H=8, W=8, device=d)
    for mshape in [(B, 4, 4), (B, 8, 8), (B, 1, 2)]:
        m = torch.rand(mshape[0], 1, *mshape[1:], generator=torch.Generator().manual_seed(5)) < 0.5
        m[0, 0, 0, 0] = True
        m = m.to(d)
        grad = torch.randn(x.shape).to(d)
        out, grads = grads_of(lambda x_, w_, b_: spikeops.masked_batch_norm2d(x_, m, None, None, w_, b_, True,
                                                                              backend=backend), [x, w, b], grad)
        full = m.repeat(T, 1, 1, 1)
        expected, ref_grads = grads_of(lambda x_, w_, b_: reference.masked_batch_norm2d_reference(
            x_, full, None, None, w_, b_, True), [x, w, b], grad)
        assert_grads_close(out, expected)
        for g, rg in zip(grads, ref_grads):
            assert_grads_close(g, rg)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input_with_fp32_parameters(backend, dtype):
    d = dev(backend)
    x, m, w, b, rm, rv = inputs(device=d, dtype=dtype)
    grad = torch.randn(x.shape).to(d)
    out, (gx, gw, gb) = grads_of(lambda x_, w_, b_: spikeops.masked_batch_norm2d(
        x_, m, rm.clone(), rv.clone(), w_, b_, True, backend=backend), [x, w, b], grad)
    expected, (rx, rw, rb) = grads_of(lambda x_, w_, b_: reference.masked_batch_norm2d_reference(
        x_, m.cpu(), rm.cpu().clone(), rv.cpu().clone(), w_, b_, True), [x.float().cpu(), w.cpu(), b.cpu()], grad.cpu())
    assert out.dtype == gx.dtype == dtype and gw.dtype == torch.float32
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    assert_grads_close(out.float(), expected, rtol=tol)
    assert_grads_close(gx.float(), rx, rtol=tol)
    assert_grads_close(gw, rw, rtol=tol)
    assert_grads_close(gb, rb, rtol=tol)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_backward_keeps_only_the_visible_blocks(backend):
    d = dev(backend)
    x, m, w, b, *_ = inputs(N=4, C=8, H=16, W=16, mshape=(4, 4, 4), device=d)
    x.requires_grad_()
    w.requires_grad_()
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        spikeops.masked_batch_norm2d(x, m, None, None, w, b, True, backend=backend)
    visible = int(m.sum()) * 16  # 4x4 blocks
    activations = sum(v for v in saved.values()) - m.numel() - 3 * 8 * 4  # minus mask, weight, mean, invstd
    assert activations <= visible * 8 * 4 + 64 < x.numel() * 4


def test_bad_input_is_rejected():
    x, m, w, b, rm, rv = inputs()
    for backend in ALL_BACKENDS:
        d = dev(backend)
        with pytest.raises(ValueError, match=r"mask's spatial size \(3, 3\) must divide the input size \(16, 16\)"):
            spikeops.masked_batch_norm2d(x.to(d), m[..., :3, :3].to(d), training=True, backend=backend)
        with pytest.raises(ValueError, match="mask must be bool or hold only 0 and 1"):
            spikeops.masked_batch_norm2d(x.to(d), m.to(d).float() * 0.5, training=True, backend=backend)
    for backend in KERNEL_BACKENDS:  # the kernels count the visible positions
        one = torch.zeros_like(m)
        one[0, 0, 0, 0] = True
        with pytest.raises(ValueError, match="training needs more than 1 visible position"):
            spikeops.masked_batch_norm2d(x[:, :, :4, :4].to(dev(backend)), one.to(dev(backend)), training=True,
                                         backend=backend)
    with pytest.raises(ValueError, match="running_mean and running_var are needed when training=False"):
        spikeops.masked_batch_norm2d(x, m)
    with pytest.raises(ValueError, match="running_mean and running_var must be given together"):
        spikeops.masked_batch_norm2d(x, m, rm, None, training=True)
    with pytest.raises(ValueError, match=r"weight must be \[C=6\]"):
        spikeops.masked_batch_norm2d(x, m, rm, rv, w[:3])
    with pytest.raises(ValueError, match="momentum must be a number in"):
        spikeops.masked_batch_norm2d(x, m, rm, rv, training=True, momentum=2.0)
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        spikeops.masked_batch_norm2d(x, m, rm, rv, eps=0.0)
    with pytest.raises(ValueError, match=r"x must be a non-empty \[N, C, H, W\]"):
        spikeops.masked_batch_norm2d(x[0], m, rm, rv)
    with pytest.raises(ValueError, match="mask has batch 3"):
        spikeops.masked_batch_norm2d(x, torch.ones(3, 1, 4, 4, dtype=torch.bool), rm, rv)
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        spikeops.masked_batch_norm2d(x.long(), m, rm, rv)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_forward_op_passes_opcheck(backend):
    d = dev(backend)
    x, m, w, b, rm, rv = inputs(N=2, C=3, H=8, W=8, mshape=(2, 4, 4), device=d)
    full = m[:, 0].contiguous()
    torch.library.opcheck(torch.ops.spikeops.masked_batch_norm_forward.default,
                          (x.requires_grad_(), full, w.requires_grad_(), b, rm, rv, True, 1e-5, True, backend))
