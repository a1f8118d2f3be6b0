"""spikeops.masked_conv2d: dense conv then mask, computed on the visible blocks only, every backend."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import spikeops
from spikeops import reference
from harness import KERNEL_BACKENDS, assert_grads_close, device_for

ALL_BACKENDS = KERNEL_BACKENDS + ("torch",)

# name: (N, C, C_out, H, W, kernel, stride, padding, mask (N_m, h, w), bias)
CONFIGS = {
    # the SCS shapes: 3x3/pad 1 with 4x4 and 8x8 blocks (C++ "window" path), 2x2 blocks and
    # per-pixel mask (C++ "pixel" path); 2x2/stride 2 downsampling
    "3x3_p1_blocks4": (2, 4, 8, 16, 16, 3, 1, 1, (2, 4, 4), True),
    "3x3_p1_blocks8": (2, 5, 6, 32, 32, 3, 1, 1, (2, 4, 4), False),
    "3x3_p1_blocks4_wide": (2, 20, 18, 16, 16, 3, 1, 1, (2, 4, 4), True),  # several 16-channel tiles
    "3x3_p1_blocks2": (2, 6, 4, 8, 8, 3, 1, 1, (2, 4, 4), True),
    "3x3_p1_pixel_mask": (2, 4, 5, 8, 8, 3, 1, 1, (2, 8, 8), False),
    "2x2_s2_blocks4": (2, 4, 8, 32, 32, 2, 2, 0, (2, 4, 4), False),
    "2x2_s2_blocks1": (2, 8, 4, 8, 8, 2, 2, 0, (2, 4, 4), True),
    "2x2_s2_blocks2_wide": (2, 17, 33, 16, 16, 2, 2, 0, (2, 4, 4), False),
    # generic: 1x1, strided 3x3, rectangular kernel / grid, T folded into N (mask over B only)
    "1x1": (2, 7, 3, 12, 12, 1, 1, 0, (2, 3, 3), True),
    "3x3_s2_p1": (2, 4, 6, 16, 16, 3, 2, 1, (2, 2, 2), True),
    "rect_3x1_grid_4x6": (2, 4, 5, 16, 24, (3, 1), 1, (1, 0), (2, 4, 6), False),
    "time_folded_T2": (4, 4, 4, 16, 16, 3, 1, 1, (2, 4, 4), True),
}


def make_inputs(cfg, device, dtype=torch.float32, seed=0, ratio=0.5):
    N, C, Co, H, W, k, s, p, mshape, bias = cfg
    g = torch.Generator().manual_seed(seed)
    kh, kw = (k, k) if isinstance(k, int) else k
    x = torch.randn(N, C, H, W, generator=g)
    w = torch.randn(Co, C, kh, kw, generator=g) / (C * kh * kw) ** 0.5
    b = torch.randn(Co, generator=g) if bias else None
    m = torch.rand(mshape[0], 1, *mshape[1:], generator=g) >= ratio
    m[0, 0, 0, 0], m[-1, 0, -1, -1] = True, False  # at least one visible and one masked cell
    cast = lambda t: None if t is None else t.to(device, dtype)  # noqa: E731
    return cast(x), cast(w), cast(b), m.to(device), s, p


def run(fn, x, w, b, grad):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    out = fn(*leaves)
    out.backward(grad.to(out.dtype))
    return out.detach(), [t.grad if t is not None else None for t in leaves]


def receptive_field(mask_up, x_shape, weight_shape, stride, padding):
    """Input positions that some visible output reads (bool [N, 1, H, W])."""
    probe = torch.zeros(x_shape[0], 1, *x_shape[2:], dtype=torch.float64, requires_grad=True)
    ones = torch.ones(1, 1, *weight_shape[2:], dtype=torch.float64)
    (F.conv2d(probe, ones, stride=stride, padding=padding) * mask_up.double().cpu()).sum().backward()
    return probe.grad > 0


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_dense_conv_then_mask(backend, name):
    device = device_for(backend) if backend != "torch" else torch.device("cpu")
    x, w, b, m, s, p = make_inputs(CONFIGS[name], device)
    ref_out = reference.masked_conv2d_reference(x.cpu(), w.cpu(), m.cpu(), None if b is None else b.cpu(), s, p)
    grad = torch.randn(ref_out.shape, generator=torch.Generator().manual_seed(1))

    out, (gx, gw, gb) = run(lambda x_, w_, b_: spikeops.masked_conv2d(x_, w_, m, b_, s, p, backend=backend),
                            x, w, b, grad.to(device))
    expected, (rx, rw, rb) = run(lambda x_, w_, b_: reference.masked_conv2d_reference(x_, w_, m.cpu(), b_, s, p),
                                 x.cpu(), w.cpu(), None if b is None else b.cpu(), grad)
    up = reference.upsample_mask(m.cpu(), x.shape[0], out.shape[-2:]).expand(out.shape)
    assert out.shape == expected.shape and out.dtype == x.dtype
    assert bool((out.cpu()[~up] == 0).all()), "masked outputs must be exactly 0"
    assert bool((out.cpu()[up] != 0).any())
    assert_grads_close(out, expected)
    assert_grads_close(gx, rx)
    assert_grads_close(gw, rw)
    if b is not None:
        assert_grads_close(gb, rb)
    # input positions no visible output reads: exactly 0 gradient, as in the reference
    rf = receptive_field(reference.upsample_mask(m.cpu(), x.shape[0], out.shape[-2:]), x.shape, w.shape, s, p)
    outside = ~rf.expand(x.shape)
    assert bool(outside.any())
    assert bool((gx.cpu()[outside] == 0).all()) and bool((rx[outside] == 0).all())


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_all_masked_and_all_visible(backend):
    device = device_for(backend)
    x, w, b, _, s, p = make_inputs(CONFIGS["3x3_p1_blocks4"], device)
    x.requires_grad_()
    none = torch.zeros(2, 1, 4, 4, dtype=torch.bool, device=device)
    out = spikeops.masked_conv2d(x, w, none, b, s, p, backend=backend)
    assert out.shape == (2, 8, 16, 16) and not out.any()
    (gx,) = torch.autograd.grad(out.sum(), x)
    assert not gx.any()
    full = spikeops.masked_conv2d(x, w, ~none, b, s, p, backend=backend)
    assert_grads_close(full.detach(), F.conv2d(x, w, b, s, p).detach())


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_mask_forms_agree(backend):
    """bool [N, 1, h, w], bool [N, h, w], float 0/1 and int 0/1 masks give the same result."""
    device = device_for(backend)
    x, w, b, m, s, p = make_inputs(CONFIGS["3x3_p1_blocks2"], device)
    base = spikeops.masked_conv2d(x, w, m, b, s, p, backend=backend)
    for form in (m[:, 0], m.float(), m.to(torch.int64), m.to(torch.uint8)):
        assert torch.equal(spikeops.masked_conv2d(x, w, form, b, s, p, backend=backend), base)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["3x3_p1_blocks4", "3x3_p1_blocks2", "2x2_s2_blocks4"])
def test_half_precision(backend, dtype, name):
    device = device_for(backend)
    x, w, b, m, s, p = make_inputs(CONFIGS[name], device, dtype)
    grad = torch.randn(spikeops.masked_conv2d(x, w, m, b, s, p, backend="torch").shape)
    out, grads = run(lambda x_, w_, b_: spikeops.masked_conv2d(x_, w_, m, b_, s, p, backend=backend), x, w, b,
                     grad.to(device))
    f32 = lambda t: None if t is None else t.float().cpu()  # noqa: E731
    expected, ref_grads = run(lambda x_, w_, b_: reference.masked_conv2d_reference(x_, w_, m.cpu(), b_, s, p),
                              f32(x), f32(w), f32(b), grad)
    assert out.dtype == dtype
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    assert_grads_close(out.float(), expected, rtol=tol)
    for g, rg in zip(grads, ref_grads):
        if rg is not None:
            assert g.dtype == dtype
            assert_grads_close(g.float(), rg, rtol=tol)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_partial_gradients_and_saved_input(backend):
    """Only what is needed is computed; x is saved only when the weight needs a gradient."""
    device = device_for(backend)
    x, w, b, m, s, p = make_inputs(CONFIGS["3x3_p1_blocks4"], device)
    ref = lambda x_, w_: reference.masked_conv2d_reference(x_, w_, m.cpu(), None, s, p)  # noqa: E731
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    xl, wl = x.cpu().requires_grad_(), w.cpu().requires_grad_()
    (gw,) = torch.autograd.grad(spikeops.masked_conv2d(x, wg, m, None, s, p, backend=backend).sum(), wg)
    (rgw,) = torch.autograd.grad(ref(x.cpu(), wl).sum(), wl)
    assert_grads_close(gw, rgw)
    (gx,) = torch.autograd.grad(spikeops.masked_conv2d(xg, w, m, None, s, p, backend=backend).sum(), xg)
    (rgx,) = torch.autograd.grad(ref(xl, w.cpu()).sum(), xl)
    assert_grads_close(gx, rgx)

    def saved_storages(x_, w_):
        seen = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t.data_ptr()) or t, lambda t: t):
            spikeops.masked_conv2d(x_, w_, m, None, s, p, backend=backend)
        return seen

    assert x.data_ptr() not in saved_storages(xg.detach().requires_grad_(), w)
    assert xg.data_ptr() in saved_storages(xg, wg)


def test_bad_input_is_rejected():
    x, w, b, m, s, p = make_inputs(CONFIGS["3x3_p1_blocks4"], "cpu")
    for backend in ALL_BACKENDS:
        dev = device_for(backend) if backend != "torch" else torch.device("cpu")
        xd, wd, md = x.to(dev), w.to(dev), m.to(dev)
        with pytest.raises(ValueError, match=r"mask's spatial size \(3, 3\) must divide the output size \(16, 16\)"):
            spikeops.masked_conv2d(xd, wd, md[..., :3, :3], padding=1, backend=backend)
        with pytest.raises(ValueError, match="mask must be bool or hold only 0 and 1"):
            spikeops.masked_conv2d(xd, wd, md.float() * 2, padding=1, backend=backend)
    with pytest.raises(ValueError, match="mask's spatial size .* must divide the output size \\(14, 14\\)"):
        spikeops.masked_conv2d(x, w, m)  # no padding: 14x14 output, a 4x4 mask does not tile it
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        spikeops.masked_conv2d(x, w, m.to(torch.complex64), padding=1)
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        spikeops.masked_conv2d(x, w, m.tolist(), padding=1)
    with pytest.raises(ValueError, match=r"mask must be \[N, 1, h, w\]"):
        spikeops.masked_conv2d(x, w, m[:, 0, 0], padding=1)
    with pytest.raises(ValueError, match="mask has batch 3, which must equal x's batch N=2 or divide it"):
        spikeops.masked_conv2d(x, w, torch.ones(3, 1, 4, 4, dtype=torch.bool), padding=1)
    with pytest.raises(ValueError, match="weight has C_in=4 input channels but x has C=3 .*channel mismatch"):
        spikeops.masked_conv2d(x[:, :3], w, m, padding=1)
    with pytest.raises(ValueError, match="dilation must be 1"):
        spikeops.masked_conv2d(x, w, m, padding=2, dilation=2)
    with pytest.raises(ValueError, match="groups must be 1"):
        spikeops.masked_conv2d(x, w[:, :2], m, padding=1, groups=2)
    with pytest.raises(ValueError, match=r"x must be a non-empty \[N, C, H, W\]"):
        spikeops.masked_conv2d(x[0], w, m, padding=1)
    with pytest.raises(ValueError, match=r"bias must be \[C_out=8\]"):
        spikeops.masked_conv2d(x, w, m, torch.zeros(3), padding=1)
    with pytest.raises(ValueError, match="stride must be an int >= 1"):
        spikeops.masked_conv2d(x, w, m, stride=0, padding=1)
    with pytest.raises(ValueError, match="padding must be an int >= 0"):
        spikeops.masked_conv2d(x, w, m, padding=(1, 1, 1))
    with pytest.raises(ValueError, match="weight must share x's dtype"):
        spikeops.masked_conv2d(x, w.double(), m, padding=1)
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        spikeops.masked_conv2d(x.to(torch.int32), w, m, padding=1)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_ops_pass_opcheck(backend):
    device = device_for(backend)
    x, w, b, m, s, p = make_inputs(CONFIGS["3x3_p1_blocks4"], device)
    args = (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), m[:, 0].contiguous(), [s, s], [p, p], backend)
    torch.library.opcheck(torch.ops.spikeops.masked_conv2d_forward.default, args)


def test_auto_runs_the_torch_path_of_the_masked_ops_on_cuda_and_triton_stays_selectable():
    # on CUDA the torch paths (cuDNN's dense conv; the reference masked BatchNorm) beat the Triton
    # kernels (BENCHMARKS.md), so "auto" picks them there for these ops only; resolve reads just
    # the device and dtype
    cuda = SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32)
    assert spikeops.backend.resolve(cuda, "auto", op="masked_conv2d") == "torch"
    assert spikeops.backend.resolve(cuda, "auto", op="masked_batch_norm2d") == "torch"
    if spikeops.backend.TRITON_INSTALLED:
        assert spikeops.backend.resolve(cuda, "auto") == "triton"
        assert spikeops.backend.resolve(cuda, "triton", op="masked_conv2d") == "triton"
    on_cpu = "cpp" if spikeops.backend.cpp_available() else "torch"
    assert spikeops.backend.resolve(torch.zeros(1), "auto", op="masked_conv2d") == on_cpu
