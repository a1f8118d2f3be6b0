"""spikeops.pack_spikes / unpack_spikes / pack_if_binary on every backend, against the reference."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import spikeops
from spikeops import reference
from harness import device_for

BACKENDS = ("cpp", "triton", "torch")
SIZES = (1, 7, 63, 64, 65, 130, 200)  # around the 8/32/64-bit boundaries
HALF_AND_SINGLE = (torch.float32, torch.float16, torch.bfloat16)


def spikes(shape, density=0.3, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) < density).to(dtype).to(device)


def expected_words(x, dim):
    return reference.pack_spikes(x.movedim(dim, -1).cpu())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", HALF_AND_SINGLE)
def test_round_trip_is_exact_and_words_match_the_reference(backend, n, dtype):
    x = spikes((2, 3, n), dtype=dtype, device=device_for(backend), seed=n)
    packed = spikeops.pack_spikes(x, backend=backend)
    assert packed.words.dtype == torch.int64 and packed.words.shape == (2, 3, -(-n // 64))
    assert torch.equal(packed.words.cpu(), expected_words(x, -1))
    out = spikeops.unpack_spikes(packed, backend=backend)
    assert out.dtype == dtype and out.shape == x.shape and torch.equal(out, x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dim", [0, 1, 2, -1, -2, -3])
def test_round_trip_along_every_dim(backend, dim):
    x = spikes((65, 7, 130), device=device_for(backend), seed=dim + 3)
    packed = spikeops.pack_spikes(x, dim=dim, backend=backend)
    assert packed.dim == dim % 3 and packed.shape == x.shape
    assert torch.equal(packed.words.cpu(), expected_words(x, dim))
    assert torch.equal(spikeops.unpack_spikes(packed, backend=backend), x)


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("dim", [0, -1])
def test_float64_round_trips_on_the_reference(backend, dim):
    x = spikes((65, 130), dtype=torch.float64, seed=4)
    packed = spikeops.pack_spikes(x, dim=dim, backend=backend)
    assert torch.equal(packed.words, expected_words(x, dim))
    out = spikeops.unpack_spikes(packed, backend=backend)
    assert out.dtype == torch.float64 and torch.equal(out, x)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_kernel_backends_reject_float64(backend):
    with pytest.raises(TypeError, match="use backend='torch'"):
        spikeops.pack_spikes(torch.zeros(3, 5, dtype=torch.float64), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unpack_to_another_dtype(backend):
    x = spikes((4, 70), device=device_for(backend))
    out = spikeops.unpack_spikes(spikeops.pack_spikes(x, backend=backend), dtype=torch.bfloat16, backend=backend)
    assert out.dtype == torch.bfloat16 and torch.equal(out.float(), x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input(backend):
    x = spikes((9, 130, 4), device=device_for(backend)).transpose(0, 2)[:, ::2]
    assert not x.is_contiguous()
    packed = spikeops.pack_spikes(x, dim=1, backend=backend)
    assert torch.equal(packed.words.cpu(), expected_words(x, 1))
    assert torch.equal(spikeops.unpack_spikes(packed, backend=backend), x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", SIZES)
def test_padding_bits_are_zero(backend, n):
    packed = spikeops.pack_spikes(torch.ones(3, n, device=device_for(backend)), backend=backend)
    full, rest = divmod(n, 64)
    words = packed.words.cpu()
    assert (words[:, :full] == -1).all()  # all 64 bits set
    if rest:
        assert (words[:, full] == (1 << rest) - 1).all()  # only the low `rest` bits


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [0.5, 2.0, -1.0, float("nan"), -float("nan"), float("inf"), -float("inf"),
                                   1.0000001, 0.99999994, 1.0078125, 0.99609375, 1e-7, 1e-40, 1e-45, -1e-45, -0.0])
# one bad value in each part of a 76-wide row that a CPU path packs its own way: AVX2 a whole block
# of 32 (5), the 8 at a time after it (64-71) and the values one at a time (72-75); AVX-512 whole
# vectors of 16 (5) and the 12 values of the last, masked one (66, 74); fp16 / bf16 with AVX-512
# vectors of 32 (5) and the masked one of 12 (66, 74); and AVX-512's own loops for rows of 32 and
# 64 values (Spikformer's head widths): each vector of them
@pytest.mark.parametrize("n, position", [(76, 5), (76, 66), (76, 74), (32, 5), (32, 31), (64, 20), (64, 40)])
@pytest.mark.parametrize("dtype", HALF_AND_SINGLE)
def test_non_binary_input_raises_unless_check_is_off(backend, value, n, position, dtype, request):
    x = spikes((3, n), dtype=dtype, device=device_for(backend))
    x[1, position] = value
    if backend == "triton" and dtype == torch.bfloat16 and value == 1e-40 and x.device.type == "cpu":
        request.applymarker(pytest.mark.xfail(strict=True, reason=(
            "the Triton interpreter converts bf16 subnormals to fp32 wrongly (9.2e-41 -> 0, 3.0e-39 -> "
            "3.7e-40; checked with a load + .to(tl.float32) kernel), so the kernel sees 0; the test passes on a GPU (H100, 2026-11-27)")))
    if x[1, position] in (0.0, 1.0):  # -0, or rounded to a spike in this dtype (1e-45 in bf16): packed as one
        assert torch.equal(spikeops.pack_spikes(x, backend=backend).words.cpu(), expected_words(x, -1))
        return
    with pytest.raises(ValueError, match="0 and 1"):
        spikeops.pack_spikes(x, backend=backend)
    assert spikeops.pack_if_binary(x, backend=backend) is None
    # check=False packs every nonzero (NaN included) as 1
    packed = spikeops.pack_spikes(x, check=False, backend=backend)
    assert torch.equal(packed.words.cpu(), reference.pack_spikes((x != 0).float().cpu()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_pack_if_binary_packs_spikes(backend):
    x = spikes((5, 3, 70), device=device_for(backend))
    packed = spikeops.pack_if_binary(x, dim=1, backend=backend)
    assert isinstance(packed, spikeops.PackedSpikes)
    assert torch.equal(packed.words.cpu(), expected_words(x, 1))
    assert torch.equal(spikeops.unpack_spikes(packed, backend=backend), x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_zero_and_all_one_tensors_are_binary(backend):
    for x in (torch.zeros(2, 65), torch.ones(2, 65), -torch.zeros(2, 65)):
        x = x.to(device_for(backend))
        assert torch.equal(spikeops.unpack_spikes(spikeops.pack_spikes(x, backend=backend), backend=backend), x)


@pytest.mark.parametrize("fn", [spikeops.pack_spikes, spikeops.pack_if_binary])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.uint8])
def test_integer_and_bool_inputs_are_rejected(fn, dtype):
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        fn(torch.zeros(3, 4, dtype=dtype))


@pytest.mark.parametrize("fn", [spikeops.pack_spikes, spikeops.pack_if_binary])
@pytest.mark.parametrize(
    "x,dim,match",
    [
        (torch.tensor(1.0), -1, "0-d"),
        (torch.zeros(3, 0), -1, "empty"),
        (torch.zeros(0, 3), -1, "empty"),
        (torch.zeros(3, 4), 2, r"dim must be in \[-2, 1\]"),
        (torch.zeros(3, 4), -3, r"dim must be in \[-2, 1\]"),
    ],
)
def test_shapes_and_dims_that_cannot_be_packed_are_rejected(fn, x, dim, match):
    with pytest.raises(ValueError, match=match):
        fn(x, dim=dim)


def test_non_tensor_input_is_rejected():
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        spikeops.pack_spikes([[0.0, 1.0]])


@pytest.mark.parametrize("packed", [torch.zeros(3, 1, dtype=torch.int64), (torch.zeros(3, 1, dtype=torch.int64), (3, 5), 1)])
def test_unpack_of_anything_but_packed_spikes_is_rejected(packed):
    with pytest.raises(TypeError, match="PackedSpikes"):
        spikeops.unpack_spikes(packed)


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend must be one of"):
        spikeops.pack_spikes(torch.zeros(3, 4), backend="cuda")


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_spikes_take_one_32nd_of_float32(backend):
    n = 64 * 1024
    x = spikes((1, n), density=0.1, device=device_for(backend))
    packed = spikeops.pack_spikes(x, backend=backend)
    assert packed.words.numel() * 8 * 32 == x.numel() * x.element_size()
    assert packed.words.untyped_storage().nbytes() == n // 8


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_pack_op_passes_opcheck(backend):
    x = spikes((5, 70), device=device_for(backend))
    torch.library.opcheck(torch.ops.spikeops.pack_spikes.default, (x, True, backend))
    torch.library.opcheck(torch.ops.spikeops.pack_spikes.default, (x, False, backend))


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("dtype", HALF_AND_SINGLE)
def test_unpack_op_passes_opcheck(backend, dtype):
    words = reference.pack_spikes(spikes((5, 70))).to(device_for(backend))
    torch.library.opcheck(torch.ops.spikeops.unpack_spikes.default, (words, 70, dtype, backend))


@st.composite
def shapes_and_dims(draw):
    shape = tuple(draw(st.lists(st.integers(1, 150), min_size=1, max_size=4)))
    dim = draw(st.integers(-len(shape), len(shape) - 1))
    return shape, dim


@settings(max_examples=50, deadline=None)
@given(shape_dim=shapes_and_dims(), density=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from(HALF_AND_SINGLE))
def test_cpp_round_trip_property(shape_dim, density, seed, dtype):
    shape, dim = shape_dim
    if torch.Size(shape).numel() > 200_000:
        shape = shape[:2]  # keep examples quick
        dim = dim % len(shape) if dim >= 0 else max(dim, -len(shape))
    x = spikes(shape, density=density, dtype=dtype, seed=seed)
    packed = spikeops.pack_spikes(x, dim=dim, backend="cpp")
    assert torch.equal(packed.words, expected_words(x, dim))
    assert torch.equal(spikeops.unpack_spikes(packed, backend="cpp"), x)
