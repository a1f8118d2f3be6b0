"""spikeops.spike_matmul: AND+popcount products equal the float64 product exactly on every backend."""
import pytest
import torch

import spikeops
from spikeops.backend import has_kernel
from spikeops import reference
from harness import KERNEL_BACKENDS, device_for

BACKENDS = KERNEL_BACKENDS + ("torch",)


def spikes(shape, density=0.4, seed=0, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) < density).to(dtype).to(device)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "a_shape,b_shape",
    [((5, 70), (70, 9)), ((1, 1), (1, 1)), ((3, 7, 64), (3, 64, 13)), ((2, 1, 4, 65), (3, 65, 33)), ((6, 200), (200, 3))],
)
def test_counts_equal_the_exact_product(backend, a_shape, b_shape):
    device = device_for(backend) if backend != "torch" else torch.device("cpu")
    a, b = spikes(a_shape, device=device), spikes(b_shape, density=0.6, seed=1, device=device)
    out = spikeops.spike_matmul(a, b, backend=backend)
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    expected = reference.spike_matmul(a.cpu().expand(*batch, *a.shape[-2:]), b.cpu())
    assert out.dtype == torch.int32
    assert torch.equal(out.cpu(), expected)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_all_ones_reach_k(backend):
    device = device_for(backend)
    a, b = torch.ones(3, 300, device=device), torch.ones(300, 4, device=device)
    assert torch.equal(spikeops.spike_matmul(a, b, backend=backend).cpu(), torch.full((3, 4), 300, dtype=torch.int32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_output_dtype_on_request(dtype):
    a, b = spikes((4, 10)), spikes((10, 5), seed=2)
    out = spikeops.spike_matmul(a.to(dtype), b.to(dtype), out_dtype=torch.float32)
    assert out.dtype == torch.float32 and torch.equal(out, a @ b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_binary_operand_is_named(backend):
    device = device_for(backend) if backend != "torch" else torch.device("cpu")
    a, b = spikes((4, 10), device=device), spikes((10, 5), device=device)
    with pytest.raises(ValueError, match="b must hold only 0 and 1"):
        spikeops.spike_matmul(a, b * 2, backend=backend)
    with pytest.raises(ValueError, match="a must hold only 0 and 1"):
        spikeops.spike_matmul(a - 0.5, b, backend=backend)
    with pytest.raises(ValueError, match="a must hold only 0 and 1"):  # 1 in fp16: checked before any cast
        spikeops.spike_matmul(a * 1.0001, b, backend=backend)


def test_bad_shapes_and_types_are_rejected():
    a, b = spikes((4, 10)), spikes((10, 5))
    with pytest.raises(ValueError, match="K=10"):
        spikeops.spike_matmul(a, spikes((9, 5)))
    with pytest.raises(ValueError, match="at least 2-d"):
        spikeops.spike_matmul(a[0], b)
    with pytest.raises(ValueError, match="share device and dtype"):
        spikeops.spike_matmul(a, b.half())
    with pytest.raises(TypeError, match="a must be a floating tensor"):
        spikeops.spike_matmul(a.int(), b)
    with pytest.raises(TypeError, match="out_dtype"):
        spikeops.spike_matmul(a, b, out_dtype=torch.int8)
    with pytest.raises(ValueError, match="non-empty"):
        spikeops.spike_matmul(spikes((0, 10)), b)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_raw_kernel_passes_opcheck(backend):
    """C++ multiplies packed words (spike_matmul_packed), Triton the 0/1 floats (spike_matmul_spikes)."""
    device = device_for(backend)
    a, b = spikes((2, 5, 70), device=device), spikes((2, 70, 6), seed=1, device=device)
    if has_kernel("spike_matmul", "spike_matmul_spikes", backend):
        for args in ((a, b, True, backend), (a, b.mT.contiguous().mT, False, backend)):
            torch.library.opcheck(torch.ops.spikeops.spike_matmul_spikes.default, args)
    else:
        aw = spikeops.pack_spikes(a).words
        bw = spikeops.pack_spikes(b, dim=-2).words
        torch.library.opcheck(torch.ops.spikeops.spike_matmul_packed.default, (aw, bw, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_transposed_views_multiply_as_their_values(backend):
    """K^T V and Q K^T of [N, d] spikes, as SSA forms them: operands that are transposed views."""
    device = device_for(backend) if backend != "torch" else torch.device("cpu")
    k, v = spikes((3, 70, 9), device=device), spikes((3, 70, 9), density=0.6, seed=1, device=device)
    for a, b in ((k.mT, v), (k, v.mT)):
        out = spikeops.spike_matmul(a, b, backend=backend)
        assert torch.equal(out.cpu(), reference.spike_matmul(a.cpu(), b.cpu()))
