"""spikeops.nn.MaskedConv2d / MaskedBatchNorm2d, spikeops.masking and to_masked / from_masked."""
import copy

import pytest
import torch
from torch import nn

import spikeops
from spikeops import reference
from spikeops.nn import MaskedBatchNorm2d, MaskedConv2d, from_masked, masking, to_masked
from spikeops.nn.masked import current_mask
from harness import KERNEL_BACKENDS, assert_grads_close, device_for


def tiny_stem(widths=(3, 4, 8), ratio=2):
    """An SCS-shaped stem: per block conv2x2/s2 -> BN -> ReLU, conv3x3 (x ratio) -> BN -> ReLU,
    conv3x3 back -> BN -> ReLU (ReLU stands in for the LIF; the masking does not depend on it)."""
    layers = []
    for cin, c in zip(widths[:-1], widths[1:]):
        layers += [nn.Conv2d(cin, c, 2, 2, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                   nn.Conv2d(c, ratio * c, 3, 1, 1, bias=False), nn.BatchNorm2d(ratio * c), nn.ReLU(),
                   nn.Conv2d(ratio * c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
    return nn.Sequential(*layers)


def reference_stem(stem: nn.Sequential, x, mask):
    """The same stem through the reference ops (dense conv then mask; gather -> BN -> scatter)."""
    for layer in stem:
        if isinstance(layer, nn.Conv2d):
            x = reference.masked_conv2d_reference(x, layer.weight, mask, layer.bias, layer.stride, layer.padding)
        elif isinstance(layer, nn.BatchNorm2d):
            x = reference.masked_batch_norm2d_reference(x, mask, layer.running_mean, layer.running_var, layer.weight,
                                                        layer.bias, layer.training, layer.momentum, layer.eps)
        else:
            x = layer(x)
    return x


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ("torch",))
def test_masked_stem_matches_reference_and_trains(backend):
    device = device_for(backend) if backend != "torch" else torch.device("cpu")
    torch.manual_seed(0)
    dense = tiny_stem().to(device)
    twin = copy.deepcopy(dense)
    stem = to_masked(dense, backend=backend)
    assert all(type(m) in (MaskedConv2d, MaskedBatchNorm2d, nn.ReLU) for m in stem)
    x = torch.randn(2, 3, 32, 32, device=device)
    mask = torch.rand(2, 1, 4, 4, device=device) < 0.5  # 8x8 -> x2 (stride-2 conv 1), x1 (block 2 at 8x8 / 4x4)
    mask[0, 0, 0, 0] = True
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    with masking(mask):
        out = stem(x1)
    ref = reference_stem(twin, x2, mask)
    up = reference.upsample_mask(mask, 2, out.shape[-2:]).expand(out.shape)
    assert bool((out[~up] == 0).all())
    assert_grads_close(out.detach(), ref.detach(), rtol=1e-4)
    g = torch.randn(out.shape, device=device)
    out.backward(g)
    ref.backward(g)
    assert_grads_close(x1.grad, x2.grad, rtol=1e-4)
    for (name, p), (_, p2) in zip(stem.named_parameters(), twin.named_parameters()):
        assert_grads_close(p.grad, p2.grad, rtol=1e-4)
    for (name, b), (_, b2) in zip(stem.named_buffers(), twin.named_buffers()):
        if name.endswith("num_batches_tracked"):  # the reference functions do not count batches
            assert int(b) == 1
        else:
            assert_grads_close(b, b2, rtol=1e-4)  # running stats from the visible positions


def test_to_masked_shares_parameters_and_round_trips():
    torch.manual_seed(0)
    stem = tiny_stem()
    stem[1].momentum = None  # cumulative average survives the round trip
    params = {n: p for n, p in stem.named_parameters()}
    state = {k: v.clone() for k, v in stem.state_dict().items()}
    masked = to_masked(stem)
    assert masked is stem  # children replaced in place
    assert [type(m) for m in masked][:3] == [MaskedConv2d, MaskedBatchNorm2d, nn.ReLU]
    assert all(p is params[n] for n, p in masked.named_parameters())  # the same Parameter objects
    assert masked.state_dict().keys() == state.keys()
    assert masked[1].momentum is None and masked[0].stride == (2, 2) and masked[3].padding == (1, 1)
    back = from_masked(masked)
    assert [type(m) for m in back][:3] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    assert all(p is params[n] for n, p in back.named_parameters())
    for k, v in back.state_dict().items():
        assert torch.equal(v, state[k])
    single = to_masked(nn.Conv2d(3, 4, 3, padding=1))
    assert type(single) is MaskedConv2d
    assert type(from_masked(single)) is nn.Conv2d


def test_unmasked_layers_are_their_dense_parents():
    torch.manual_seed(0)
    conv, bn = MaskedConv2d(3, 4, 3, padding=1), MaskedBatchNorm2d(4)
    dense_conv, dense_bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
    dense_conv.load_state_dict(conv.state_dict())
    x = torch.randn(2, 3, 8, 8)
    assert current_mask() is None
    assert torch.equal(bn(conv(x)), dense_bn(dense_conv(x)))
    assert torch.equal(bn.running_mean, dense_bn.running_mean)
    with masking(torch.ones(2, 1, 2, 2, dtype=torch.bool)):
        with masking(None):
            assert current_mask() is None
            assert torch.equal(conv(x), dense_conv(x))
        assert current_mask().shape == (2, 1, 2, 2)
    assert current_mask() is None


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_time_steps_share_the_mask(backend):
    """[T, B, C, H, W] input and its folded [T*B, ...] view give the same result with a [B, ...] mask."""
    device = device_for(backend)
    torch.manual_seed(0)
    conv = MaskedConv2d(3, 4, 3, padding=1, backend=backend).to(device)
    bn = MaskedBatchNorm2d(4, backend=backend).to(device)
    T, B = 3, 2
    x = torch.randn(T, B, 3, 8, 8, device=device)
    mask = torch.rand(B, 1, 4, 4, device=device) < 0.5
    mask[0, 0, 0, 0] = True
    with masking(mask):
        y5 = bn(conv(x))
        bn.reset_running_stats()
        y4 = bn(conv(x.flatten(0, 1)))
    assert y5.shape == (T, B, 4, 8, 8)
    assert torch.equal(y5.flatten(0, 1), y4)
    expected = reference.masked_batch_norm2d_reference(
        reference.masked_conv2d_reference(x.flatten(0, 1), conv.weight, mask, conv.bias, 1, 1), mask, None, None,
        bn.weight, bn.bias, True)
    assert_grads_close(y4.detach(), expected.detach())
    for t in range(T):  # each time step sees the same mask
        up = reference.upsample_mask(mask, B, (8, 8)).expand(B, 4, 8, 8)
        assert bool((y5[t][~up] == 0).all())


def test_eval_mode_uses_running_stats():
    torch.manual_seed(0)
    bn = MaskedBatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 2)
    bn.eval()
    x, mask = torch.randn(2, 4, 8, 8), torch.rand(2, 1, 2, 2) < 0.5
    mask[0, 0, 0, 0] = True
    before = bn.running_mean.clone()
    with masking(mask):
        y = bn(x)
    dense = nn.functional.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False)
    up = reference.upsample_mask(mask, 2, (8, 8)).expand(x.shape)
    assert torch.equal(bn.running_mean, before) and int(bn.num_batches_tracked) == 0
    assert_grads_close(y, dense * up)


def test_configuration_errors():
    with pytest.raises(ValueError, match="MaskedConv2d: masked convolution supports groups=1.*got groups=2"):
        MaskedConv2d(4, 4, 3, groups=2)
    with pytest.raises(ValueError, match="dilation=\\(2, 2\\)"):
        MaskedConv2d(4, 4, 3, dilation=2)
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        MaskedConv2d(4, 4, 3, padding=1, padding_mode="reflect")
    with pytest.raises(ValueError, match="padding='same' with an even kernel"):
        MaskedConv2d(4, 4, 2, padding="same")
    stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)))
    with pytest.raises(ValueError, match="to_masked: 1.0: .*groups=2"):
        to_masked(stem)
    with pytest.raises(ValueError, match="mask must be bool or hold only 0 and 1"):
        with masking(torch.full((2, 1, 2, 2), 0.5)):
            pass
    conv = MaskedConv2d(3, 4, 3, padding="same")
    with masking(torch.ones(2, 1, 3, 3, dtype=torch.bool)):
        with pytest.raises(ValueError, match="must divide the output size \\(8, 8\\)"):
            conv(torch.randn(2, 3, 8, 8))
        with pytest.raises(ValueError, match=r"x must be \[N, C, H, W\] or \[T, B, C, H, W\]"):
            conv(torch.randn(3, 8, 8))
