"""spikeops.ops.max_pool: the C++ max pooling kernels against ATen's max_pool2d and
max_pool2d_with_indices_backward (values and gradients bit for bit, ATen's argmax tie-break)."""
import pytest
import torch

import spikeops
from spikeops.ops.max_pool import max_pool2d, max_pool2d_backward

C = pytest.importorskip("spikeops._C", reason="the C++ extension is not built (make setup builds it)")

# (kernel, stride, padding): the Spikformer / MSViT pooling (3, 2, 1) and others with clipped windows
GEOMETRIES = [(3, 2, 1), (2, 2, 0), (3, 1, 1), (5, 3, 2), (1, 1, 0), (2, 1, 1), (4, 3, 1)]
SHAPES = [(2, 3, 7, 9), (1, 2, 8, 8), (1, 1, 1, 5), (3, 1, 5, 1), (2, 37, 6, 5)]  # 37 channels: vector tails


def values(shape, dtype, seed=0):
    """Small integers (ties in most windows) with a few NaN and -inf: every branch of the argmax."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, shape, generator=g).float()
    spots = torch.rand(shape, generator=g)
    x[spots < 0.03] = float("nan")
    x[(spots > 0.97)] = -float("inf")
    return x.to(dtype)


def aten(x, args, grad):
    out, indices = torch.ops.aten.max_pool2d_with_indices(x, *args)
    return out, torch.ops.aten.max_pool2d_with_indices_backward(grad, x, *args, indices)


@pytest.mark.parametrize("geometry,shape", [(g, s) for g in GEOMETRIES for s in SHAPES
                                            if min(s[2:]) + 2 * g[2] >= g[0]])  # the padded input holds a window
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_cpp_kernels_equal_aten(geometry, shape, dtype, layout):
    k, s, p = geometry
    x = values(shape, dtype).contiguous(memory_format=layout)
    args = ((k, k), (s, s), (p, p), (1, 1), False)
    out = C.max_pool2d_forward(x, k, k, s, s, p, p)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype).contiguous(memory_format=layout)
    expected, expected_grad = aten(x, args, grad)
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
    grad_in = C.max_pool2d_backward(grad, x, k, k, s, s, p, p)
    assert torch.equal(grad_in, expected_grad)
    assert out.is_contiguous(memory_format=layout) and grad_in.is_contiguous(memory_format=layout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_channels_last_spikes_equal_aten(dtype):
    """The Spikformer stem's case: ties in nearly every window, some windows without a spike."""
    g = torch.Generator().manual_seed(7)
    x = (torch.rand(3, 70, 9, 8, generator=g) < 0.3).to(dtype).contiguous(memory_format=torch.channels_last)
    args = ((3, 3), (2, 2), (1, 1), (1, 1), False)
    out = max_pool2d(x, args)
    grad = torch.randn(out.shape, generator=g, dtype=dtype).contiguous(memory_format=torch.channels_last)
    expected, expected_grad = aten(x, args, grad)
    assert torch.equal(out, expected) and torch.equal(max_pool2d_backward(grad, x, args), expected_grad)


def test_rectangular_windows_equal_aten():
    x = values((2, 3, 11, 10), torch.float32, seed=2)
    args = ((3, 2), (2, 1), (1, 0), (1, 1), False)
    out = max_pool2d(x, args)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    expected, expected_grad = aten(x, args, grad)
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(max_pool2d_backward(grad, x, args), expected_grad)


@pytest.mark.parametrize("case", ["ceil_mode", "dilation", "other_strides", "float64", "non_contiguous_grad"])
def test_calls_the_kernels_do_not_cover_equal_aten(case):
    x = values((2, 4, 9, 9), torch.float64 if case == "float64" else torch.float32, seed=4)
    args = ((3, 3), (2, 2), (1, 1), (2, 2) if case == "dilation" else (1, 1), case == "ceil_mode")
    if case == "other_strides":  # neither contiguous nor channels-last
        x = x.transpose(2, 3)
    expected_out, _ = torch.ops.aten.max_pool2d_with_indices(x, *args)
    grad = torch.randn(expected_out.shape, generator=torch.Generator().manual_seed(5), dtype=x.dtype)
    if case == "non_contiguous_grad":
        grad = grad.transpose(2, 3).contiguous().transpose(2, 3)
    expected, expected_grad = aten(x, args, grad)
    torch.testing.assert_close(max_pool2d(x, args), expected, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(max_pool2d_backward(grad, x, args), expected_grad)


def test_kernels_reject_what_they_do_not_cover():
    x = torch.zeros(1, 1, 4, 4)
    with pytest.raises(RuntimeError, match="contiguous or channels-last"):
        C.max_pool2d_forward(x.transpose(2, 3), 3, 3, 2, 2, 1, 1)
    with pytest.raises(RuntimeError, match="channels-last"):  # grad_out in the other layout than the input's
        x_cl = torch.zeros(1, 2, 4, 4).contiguous(memory_format=torch.channels_last)
        C.max_pool2d_backward(torch.zeros(1, 2, 2, 2), x_cl, 3, 3, 2, 2, 1, 1)
    with pytest.raises(RuntimeError, match="padding"):
        C.max_pool2d_forward(x, 2, 2, 1, 1, 2, 2)
    with pytest.raises(RuntimeError, match="grad_out"):
        C.max_pool2d_backward(torch.zeros(1, 1, 3, 3), x, 3, 3, 2, 2, 1, 1)


@pytest.mark.parametrize("geometry", GEOMETRIES)
# 64 | numel; 5 x 4 planes straddle words; rows of 64 bits are one word each, rows of 96 bits not
@pytest.mark.parametrize("shape", [(2, 4, 8, 6), (1, 2, 16, 12), (4, 4, 5, 4), (1, 2, 5, 64), (1, 2, 3, 96)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_backward_from_bits_equals_aten(geometry, shape, dtype):
    k, s, p = geometry
    g = torch.Generator().manual_seed(6)
    x = (torch.rand(shape, generator=g) < 0.3).to(dtype)  # ties everywhere, some windows empty
    words = spikeops.pack_spikes(x.reshape(1, -1)).words  # the flat N C H W order
    args = ((k, k), (s, s), (p, p), (1, 1), False)
    out, _ = torch.ops.aten.max_pool2d_with_indices(x, *args)
    grad = torch.randn(out.shape, generator=g).to(dtype)
    _, expected = aten(x, args, grad)
    assert torch.equal(C.max_pool2d_backward_bits(grad, words, shape[2], shape[3], k, k, s, s, p, p), expected)
