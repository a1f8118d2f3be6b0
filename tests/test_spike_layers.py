"""spikeops.nn.SpikeLinear / SpikeConv1d / SpikeConv2d: the torch layer's results, a smaller saved input."""
import pytest
import torch
from torch import nn

import spikeops
from spikeops import reference
from spikeops.memory import saved_bytes
from spikeops.nn import SpikeConv1d, SpikeConv2d, SpikeLinear
from spikeops.ops.compact import compact, restore, to_counts
from spikeops.ops.known_counts import mark_counts

# (torch layer, spikeops layer, constructor args, input shape)
LAYERS = {
    "linear_TBNC": (nn.Linear, SpikeLinear, dict(in_features=96, out_features=40), (4, 2, 10, 96)),
    "linear_2d_no_bias": (nn.Linear, SpikeLinear, dict(in_features=70, out_features=33, bias=False), (5, 70)),
    "linear_1d": (nn.Linear, SpikeLinear, dict(in_features=130, out_features=7), (130,)),
    "conv1d": (nn.Conv1d, SpikeConv1d, dict(in_channels=6, out_channels=8, kernel_size=3, padding=1), (2, 6, 19)),
    "conv1d_same_even_kernel": (nn.Conv1d, SpikeConv1d,
                                dict(in_channels=6, out_channels=8, kernel_size=4, padding="same", dilation=3), (2, 6, 19)),
    "conv1d_strided_groups_circular": (nn.Conv1d, SpikeConv1d,
                                       dict(in_channels=6, out_channels=4, kernel_size=3, stride=2, padding=2,
                                            groups=2, padding_mode="circular"), (3, 6, 17)),
    "conv1d_unbatched": (nn.Conv1d, SpikeConv1d, dict(in_channels=6, out_channels=8, kernel_size=3), (6, 19)),
    "conv2d": (nn.Conv2d, SpikeConv2d, dict(in_channels=6, out_channels=8, kernel_size=3, padding=1), (2, 6, 9, 9)),
    "conv2d_many_channels_1x1": (nn.Conv2d, SpikeConv2d, dict(in_channels=130, out_channels=8, kernel_size=1), (2, 130, 5, 5)),
    "conv2d_mixed_settings": (nn.Conv2d, SpikeConv2d,
                              dict(in_channels=6, out_channels=8, kernel_size=(3, 2), stride=(2, 1), padding=(1, 0),
                                   dilation=(1, 2), groups=2, bias=False), (2, 6, 11, 9)),
    "conv2d_same_even_kernel": (nn.Conv2d, SpikeConv2d,
                                dict(in_channels=6, out_channels=8, kernel_size=4, padding="same"), (2, 6, 9, 8)),
    "conv2d_valid": (nn.Conv2d, SpikeConv2d, dict(in_channels=6, out_channels=8, kernel_size=3, padding="valid"), (2, 6, 9, 9)),
    "conv2d_reflect": (nn.Conv2d, SpikeConv2d,
                       dict(in_channels=6, out_channels=8, kernel_size=3, padding=2, padding_mode="reflect"), (2, 6, 9, 9)),
    "conv2d_depthwise": (nn.Conv2d, SpikeConv2d, dict(in_channels=6, out_channels=6, kernel_size=3, groups=6), (2, 6, 7, 7)),
    "conv2d_unbatched": (nn.Conv2d, SpikeConv2d, dict(in_channels=6, out_channels=8, kernel_size=3), (6, 9, 9)),
}

INPUTS = {
    "spikes": lambda shape, g: (torch.rand(shape, generator=g) < 0.3).float(),
    "integers_0_to_4": lambda shape, g: torch.randint(0, 5, shape, generator=g).float(),
    "generic_float": lambda shape, g: torch.randn(shape, generator=g),
}


def make_pair(name, dtype=torch.float32):
    """(torch layer, spikeops layer with the same weights), and the input shape."""
    torch_cls, spike_cls, kwargs, shape = LAYERS[name]
    torch.manual_seed(0)
    ref = torch_cls(**kwargs).to(dtype)
    ours = spike_cls(**kwargs).to(dtype)
    ours.load_state_dict(ref.state_dict())
    return ref, ours, shape


def make_input(kind, shape, dtype=torch.float32, seed=0):
    return INPUTS[kind](shape, torch.Generator().manual_seed(seed)).to(dtype)


def run(layer, x, grad=None, input_grad=True):
    """Output and (grad_input, grad_weight, grad_bias) of ``layer`` on a fresh copy of ``x``."""
    layer.zero_grad(set_to_none=True)
    leaf = x.clone().requires_grad_(input_grad)
    out = layer(leaf)
    out.backward(torch.ones_like(out) if grad is None else grad)
    bias = None if layer.bias is None else layer.bias.grad
    return out.detach(), (leaf.grad, layer.weight.grad, bias)


def assert_all_equal(actual, expected):
    for a, e in zip(actual, expected):
        assert (a is None and e is None) or torch.equal(a, e)


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("kind", INPUTS)
def test_output_and_grads_equal_the_torch_layer(name, kind):
    ref, ours, shape = make_pair(name)
    x = make_input(kind, shape)
    grad = make_input("generic_float", ref(x).shape, seed=1)
    ref_out, ref_grads = run(ref, x, grad)
    out, grads = run(ours, x, grad)
    assert torch.equal(out, ref_out)
    assert_all_equal(grads, ref_grads)


@pytest.mark.parametrize("name", ["linear_TBNC", "conv2d"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("kind", INPUTS)
def test_other_dtypes_give_the_torch_layer_results(name, dtype, kind):
    ref, ours, shape = make_pair(name, dtype)
    x = make_input(kind, shape, dtype)
    grad = make_input("generic_float", ref(x).shape, dtype, seed=1)
    ref_out, ref_grads = run(ref, x, grad)
    out, grads = run(ours, x, grad)
    assert out.dtype == dtype and torch.equal(out, ref_out)
    assert_all_equal(grads, ref_grads)


@pytest.mark.parametrize("name", ["linear_TBNC", "conv2d", "conv1d_same_even_kernel", "conv2d_reflect"])
@pytest.mark.parametrize("needs", [(True, False), (False, True)])  # (input, weight) require grad
def test_grads_equal_when_only_the_input_or_only_the_weight_needs_one(name, needs):
    ref, ours, shape = make_pair(name)
    for layer in (ref, ours):
        layer.weight.requires_grad_(needs[1])
        layer.bias.requires_grad_(needs[1])
    x = make_input("spikes", shape)
    grad = make_input("generic_float", ref(x).shape, seed=1)
    ref_out, ref_grads = run(ref, x, grad, input_grad=needs[0])
    out, grads = run(ours, x, grad, input_grad=needs[0])
    assert torch.equal(out, ref_out)
    assert_all_equal(grads, ref_grads)


def test_channels_last_input_gives_the_torch_layer_results():
    ref, ours, shape = make_pair("conv2d")
    x = make_input("spikes", shape).contiguous(memory_format=torch.channels_last)
    grad = make_input("generic_float", ref(x).shape, seed=1)
    ref_out, ref_grads = run(ref, x, grad)
    out, grads = run(ours, x, grad)
    assert torch.equal(out, ref_out)
    assert_all_equal(grads, ref_grads)


def test_non_contiguous_input_gives_the_torch_layer_results():
    ref, ours, _ = make_pair("linear_TBNC")
    x = make_input("spikes", (96, 10, 2, 4)).permute(3, 2, 1, 0)
    grad = make_input("generic_float", ref(x).shape, seed=1)
    ref_out, ref_grads = run(ref, x, grad)
    out, grads = run(ours, x, grad)
    torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-6)
    for a, e in zip(grads, ref_grads):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)


# ---- what backward keeps: compare the difference to the torch layer (both also save the weight)


def saved_input_bytes(layer, x):
    leaf = x.clone().requires_grad_()
    return saved_bytes(layer, leaf) - layer.weight.untyped_storage().nbytes()


@pytest.mark.parametrize("name,shape", [("linear_TBNC", (4, 2, 10, 96)), ("conv2d_many_channels_1x1", (2, 130, 5, 5)),
                                        ("linear_2d_no_bias", (5, 70))])
def test_spike_input_is_saved_as_bits_along_the_channels(name, shape):
    ref, ours, _ = make_pair(name)
    x = make_input("spikes", shape)
    channels = shape[-1] if name.startswith("linear") else shape[1]
    rows = x.numel() // channels
    words = -(-channels // 64)
    assert saved_input_bytes(ref, x) == x.numel() * 4
    assert saved_input_bytes(ours, x) == rows * words * 8  # 1 bit per spike, rows padded to 64 bits


@pytest.mark.parametrize("layer", [SpikeLinear(128, 16), SpikeConv2d(64, 8, 3)])
def test_spike_input_with_whole_words_of_channels_takes_one_32nd(layer):
    shape = (4, 2, 10, 128) if isinstance(layer, nn.Linear) else (2, 64, 6, 6)
    x = make_input("spikes", shape)
    assert saved_input_bytes(layer, x) * 32 == x.numel() * 4


@pytest.mark.parametrize("name", ["linear_TBNC", "conv2d"])
def test_small_integer_input_is_saved_as_uint8(name):
    ref, ours, shape = make_pair(name)
    x = make_input("integers_0_to_4", shape)
    x.view(-1)[0] = 255  # the largest value that fits
    assert saved_input_bytes(ours, x) * 4 == saved_input_bytes(ref, x) == x.numel() * 4


@pytest.mark.parametrize("name", ["linear_TBNC", "conv2d"])
def test_generic_input_is_saved_as_is(name):
    ref, ours, shape = make_pair(name)
    x = make_input("generic_float", shape)
    assert saved_input_bytes(ours, x) == saved_input_bytes(ref, x) == x.numel() * 4


def test_input_is_not_saved_when_the_weight_needs_no_grad():
    layer = SpikeLinear(96, 40).requires_grad_(False)
    assert saved_input_bytes(layer, make_input("generic_float", (4, 96))) == 0


def test_input_that_needs_no_grad_is_still_saved_compactly():
    layer = SpikeLinear(128, 16)
    x = make_input("spikes", (10, 128))
    assert saved_bytes(layer, x) - layer.weight.untyped_storage().nbytes() == 10 * 2 * 8


@pytest.mark.parametrize("values", ["spikes", "integers_0_to_4"])
def test_layers_fed_the_same_input_keep_one_compact_copy(values):
    q, k, v = (SpikeLinear(96, 32) for _ in range(3))  # Spikformer's projections of one input
    x = make_input(values, (4, 2, 10, 96)).requires_grad_()
    weights = sum(layer.weight.untyped_storage().nbytes() for layer in (q, k, v))
    one = saved_bytes(q, x) - q.weight.untyped_storage().nbytes()
    assert saved_bytes(lambda t: q(t) + k(t) + v(t), x) - weights == one
    out = q(x)
    with torch.no_grad():
        x.mul_(0)  # changed in place: the next layer compacts the new values, not the remembered ones
    x.grad = None
    (k(x) + out).sum().backward()
    assert torch.equal(k.weight.grad, torch.zeros_like(k.weight))  # dL/dW = grad^T x, x all zeros now
    assert not torch.equal(q.weight.grad, torch.zeros_like(q.weight))  # q saved x before the change


# ---- the shared helper: compact / restore


@pytest.mark.parametrize(
    "values,kind",
    [
        ([0.0, 1.0], "bits"),
        ([0.0, 1.0, 2.0, 255.0], "uint8"),
        ([0.0, 256.0], "plain"),
        ([0.0, -1.0], "plain"),
        ([0.0, 0.5], "plain"),
        ([0.0, float("nan")], "plain"),
        ([1.0, float("inf")], "plain"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_compact_picks_the_smallest_exact_form_and_restore_inverts_it(values, kind, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.tensor(values, dtype=dtype)[torch.randint(0, len(values), (3, 70, 5), generator=g)]
    x.view(-1)[: len(values)] = torch.tensor(values, dtype=dtype)  # every value occurs
    saved, meta = compact(x, dim=1)
    assert meta.kind == kind
    back = restore(saved, meta)
    assert back.dtype == dtype and back.shape == x.shape
    torch.testing.assert_close(back, x, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 15, 17, 2048, 2049, 70001])  # vector tails, the kernel's blocks of 2048
def test_to_counts_kernel_equals_the_reference_one_bad_value_at_a_time(dtype, n):
    x = torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)).to(dtype)
    x[-1] = 255
    counts, integers = to_counts(x, True, "cpp")
    assert integers and torch.equal(counts, reference.to_counts(x)[0])
    for pos in sorted({0, n // 2, n - 1}):
        for bad in (0.5, -0.5, -1.0, 255.5, 256.0, 1e9, float("nan"), float("inf"), float("-inf")):
            y = x.clone()
            y[pos] = bad
            assert to_counts(y, True, "cpp")[1] is False and reference.to_counts(y)[1] is False, (pos, bad)
        y = x.clone()
        y[pos] = -0.0  # an integer: saved as 0, restored as 0 (== -0), as by the cast
        assert to_counts(y, True, "cpp")[1] is True and reference.to_counts(y)[1] is True


def test_restore_keeps_the_channels_last_layout():
    x = make_input("spikes", (2, 70, 4, 3)).contiguous(memory_format=torch.channels_last)
    back = restore(*compact(x, dim=1))
    assert back.is_contiguous(memory_format=torch.channels_last) and torch.equal(back, x)


def test_compact_saves_an_empty_tensor_as_is():
    x = torch.zeros(0, 5)
    saved, meta = compact(x)
    assert meta.kind == "plain" and saved is x


@pytest.mark.parametrize("known", [False, True])
def test_compact_saves_a_0d_tensor_as_is(known):
    x = torch.tensor(1.0)
    if known:
        mark_counts(x, 1)
    saved, meta = compact(x)
    assert meta.kind == "plain" and saved is x and restore(saved, meta) is x


# ---- drop-in: parameters, state_dict, no grad, autocast, torch.compile


@pytest.mark.parametrize("name", ["linear_TBNC", "conv1d", "conv2d_mixed_settings"])
def test_state_dict_and_parameters_are_the_torch_layers(name):
    torch_cls, spike_cls, kwargs, _ = LAYERS[name]
    ref, ours = torch_cls(**kwargs), spike_cls(**kwargs)
    assert isinstance(ours, torch_cls)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert list(ours.buffers()) == []
    ours.load_state_dict(ref.state_dict())  # strict: same keys and shapes
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), ref.state_dict().values()))
    fresh = torch_cls(**kwargs)
    fresh.load_state_dict(ours.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), ref.state_dict().values()))
    assert repr(ours).split("(", 1)[1] == repr(ref).split("(", 1)[1]


@pytest.mark.parametrize("name", ["linear_TBNC", "conv2d"])
def test_without_grad_the_torch_forward_runs(name):
    ref, ours, shape = make_pair(name)
    x = make_input("spikes", shape)
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))
    assert saved_bytes(ours.requires_grad_(False), x) == 0
    assert ours(x).grad_fn is None


@pytest.mark.parametrize("name", ["linear_TBNC", "conv2d", "conv1d_same_even_kernel"])
@pytest.mark.parametrize("kind", INPUTS)
def test_bf16_autocast_matches_the_torch_layer_under_autocast(name, kind):
    ref, ours, shape = make_pair(name)
    x = make_input(kind, shape)
    outs, grads = [], []
    for layer in (ref, ours):
        layer.zero_grad(set_to_none=True)
        leaf = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(leaf)
        out.backward(make_input("generic_float", out.shape, out.dtype, seed=1))
        outs.append(out.detach())
        grads.append((leaf.grad, layer.weight.grad, layer.bias.grad))
    assert outs[1].dtype == torch.bfloat16 and torch.equal(outs[1], outs[0])
    assert grads[1][1].dtype == torch.float32  # the fp32 master weight gets an fp32 grad
    assert_all_equal(grads[1], grads[0])


def spiking_block(linear, conv):
    torch.manual_seed(0)
    return nn.Sequential(conv(4, 8, 3, padding=1), nn.Flatten(2), nn.Unflatten(2, (6, 6)), spikeops.nn.LIF(),
                         nn.Flatten(1), linear(8 * 36, 10))


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_model_matches_eager_without_graph_breaks(compiler):
    # under torch.compile the layers run their torch parent's forward (the compact saved form
    # depends on the input's values, which a graph cannot branch on): fullgraph=True compiles
    # training, with the same outputs and gradients and the standard memory
    ref, ours = spiking_block(nn.Linear, nn.Conv2d), spiking_block(SpikeLinear, SpikeConv2d)
    x = make_input("spikes", (3, 4, 6, 6))
    ref_out = ref(x)
    ref_out.sum().backward()
    torch._dynamo.reset()
    out = torch.compile(ours, fullgraph=True, backend=compiler)(x)
    out.sum().backward()
    if compiler == "aot_eager":  # the same aten kernels: bit for bit
        assert torch.equal(out, ref_out)
        for a, e in zip(ours.parameters(), ref.parameters()):
            assert torch.equal(a.grad, e.grad)
    else:  # inductor generates its own kernels: spikes may flip only within rounding of the threshold
        assert (out != ref_out).float().mean() < 0.01
        for a, e in zip(ours.parameters(), ref.parameters()):
            torch.testing.assert_close(a.grad, e.grad, rtol=1e-4, atol=1e-4 * e.grad.abs().max().item())


def test_inference_compiles_with_fullgraph():
    ref, ours = spiking_block(nn.Linear, nn.Conv2d), spiking_block(SpikeLinear, SpikeConv2d)
    x = make_input("spikes", (3, 4, 6, 6))
    torch._dynamo.reset()
    with torch.no_grad():
        assert torch.equal(torch.compile(ours, fullgraph=True, backend="aot_eager")(x), ref(x))


@pytest.mark.parametrize("kind", ["spikes", "integers"])
@pytest.mark.parametrize("ceil_mode", [False, True])
@pytest.mark.parametrize("layout", ["9x9", "8x8", "channels_last"])  # packed: rows of C H W / rows of H W / along C
def test_spike_max_pool_equals_torch_and_keeps_bits_not_indices(kind, ceil_mode, layout):
    g = torch.Generator().manual_seed(0)
    size = 8 if layout == "8x8" else 9
    base = (torch.rand(2, 64, size, size, generator=g) < 0.3).float()  # many ties: the argmax tie-break matters
    if kind == "integers":
        base = base * torch.randint(0, 3, base.shape, generator=g)
    if layout == "channels_last":
        base = base.contiguous(memory_format=torch.channels_last)
    ours, ref = spikeops.nn.SpikeMaxPool2d(3, 2, 1, ceil_mode=ceil_mode), nn.MaxPool2d(3, 2, 1, ceil_mode=ceil_mode)
    x, x2 = base.clone().requires_grad_(), base.clone().requires_grad_()
    out, expected = ours(x), ref(x2)
    assert torch.equal(out, expected)
    grad = torch.randn(out.shape, generator=g)
    out.backward(grad)
    expected.backward(grad)
    assert torch.equal(x.grad, x2.grad)
    kept = saved_bytes(ours, base.clone().requires_grad_())
    assert kept <= base.numel() // (8 if kind == "spikes" else 1) + 64
    assert saved_bytes(ref, base.clone().requires_grad_()) >= base.numel() * 4


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("ceil_mode", [False, True])  # ceil_mode: ATen's kernel (the C++ ones take floor sizes)
def test_spike_max_pool_without_grad_equals_torch(layout, ceil_mode):
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(2, 24, 9, 9, generator=g) < 0.3).float().contiguous(memory_format=layout)
    ours, ref = spikeops.nn.SpikeMaxPool2d(3, 2, 1, ceil_mode=ceil_mode), nn.MaxPool2d(3, 2, 1, ceil_mode=ceil_mode)
    with torch.no_grad():
        out = ours(x)
    assert torch.equal(out, ref(x)) and out.is_contiguous(memory_format=layout)


def test_spike_max_pool_rejects_return_indices():
    with pytest.raises(ValueError, match="return_indices"):
        spikeops.nn.SpikeMaxPool2d(2, return_indices=True)
