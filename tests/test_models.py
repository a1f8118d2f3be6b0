"""Spikformer V1 / V2 models, the registry and masked pre-training (MSViT/QKFormer: test_msvit.py)."""
import pytest
import torch

import spikeops
from spikeops.models import MaskedPretrainer, create_model, list_models

# reported parameter counts (papers.md); the models must be within 0.5%
REPORTED_PARAMS = {
    "spikformer_cifar_4_384": 9_330_874,
    "spikformer_8_384": 16.81e6,
    "spikformer_8_512": 29.68e6,
    "spikformer_10_512": 36.01e6,
    "spikformer_8_768": 66.34e6,
    "spikformer_v2_8_384": 29.11e6,
    "spikformer_v2_8_512": 51.55e6,
    "spikformer_v2_12_512": 64.18e6,
    "spikformer_v2_12_768": 143.89e6,
    "spikformer_v2_16_768": 172.28e6,
}

REQUIRED_NAMES = [
    "spikformer_cifar_4_384", "spikformer_cifar_4_256", "spikformer_cifar_2_384", "spikformer_8_384",
    "spikformer_8_512", "spikformer_10_512", "spikformer_8_768", "spikformer_dvs_2_256", "spikformer_v2_8_384",
    "spikformer_v2_8_512", "spikformer_v2_12_512", "spikformer_v2_12_768", "spikformer_v2_16_768",
    "msvit_cifar_4_384", "msvit_10_384", "msvit_10_512", "msvit_10_768", "qkformer_10_384",
]

# small versions of each family that run forward+backward in well under a second
TINY = {
    "spikformer_cifar_4_384": dict(dim=32, depth=2, num_heads=2, T=2),
    "spikformer_8_384": dict(dim=32, depth=1, num_heads=2, T=2, img_size=32, num_classes=5),
    "spikformer_dvs_2_256": dict(dim=32, depth=1, num_heads=4, T=3, img_size=32),
    "spikformer_v2_8_384": dict(dim=32, depth=2, num_heads=2, T=2, img_size=32, num_classes=5),
}


def param_count(model):
    return sum(p.numel() for p in model.parameters())


def tiny(name, **overrides):
    torch.manual_seed(0)
    return create_model(name, **{**TINY[name], **overrides})


def images(model, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, model.in_channels, model.img_size, model.img_size, generator=g)


def test_registry_has_every_required_name():
    assert set(REQUIRED_NAMES) <= set(list_models())


@pytest.mark.parametrize("name", sorted(REPORTED_PARAMS))
def test_parameter_count_matches_the_paper(name):
    with torch.device("meta"):
        model = create_model(name)
    assert abs(param_count(model) / REPORTED_PARAMS[name] - 1) <= 0.005, param_count(model)


def test_cifar_spikformer_count_is_the_reference_minus_its_unused_layernorms():
    with torch.device("meta"):
        model = create_model("spikformer_cifar_4_384")
    assert param_count(model) == 9_330_874 - 4 * 2 * (2 * 384)


@pytest.mark.parametrize("name", sorted(TINY))
def test_model_trains_forward_and_backward_on_cpu(name):
    model = tiny(name)
    logits = model(images(model))
    assert logits.shape == (2, model.head.fc.out_features)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_kernels_and_torch_backend_give_identical_outputs(name, train):
    fast, eager = tiny(name), tiny(name, backend="torch")
    eager.load_state_dict(fast.state_dict())
    fast.train(train), eager.train(train)
    x = images(fast)
    spikes = {}
    for tag, model in (("fast", fast), ("eager", eager)):
        feats = model.forward_features(x)
        spikes[tag] = feats
        model.head(feats).sum().backward()
    torch.testing.assert_close(spikes["fast"], spikes["eager"], rtol=0, atol=0)
    if train:  # BatchNorm running statistics moved the same way
        for (n, a), (_, b) in zip(fast.named_buffers(), eager.named_buffers()):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
    # a Linear bias before a BatchNorm has a ~0 gradient (rounding noise): tolerances on the global scale
    scale = max(float(p.grad.abs().max()) for p in eager.parameters())
    for (n, a), (_, b) in zip(fast.named_parameters(), eager.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5 * scale, msg=n)


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("grad", [True, False], ids=["train", "inference"])
def test_spikformer_stem_keeps_its_frames_channels_last_on_cpu(backend, grad):
    """Every stage of the SPS stem returns channels-last frames on CPU (oneDNN's NHWC convolutions
    then copy nothing), training and inference, and the tokens it returns are contiguous."""
    model = tiny("spikformer_cifar_4_384", backend=backend)
    outputs = []
    for stage in [*model.patch_embed.stages, model.patch_embed.rpe]:
        stage.register_forward_hook(lambda module, args, out: outputs.append(out))
    with torch.set_grad_enabled(grad):
        tokens = model.patch_embed(images(model).unsqueeze(0).expand(model.T, -1, -1, -1, -1))
    assert len(outputs) == 5 and tokens.is_contiguous()
    for out in outputs:
        assert out.flatten(0, 1).is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()


def test_images_are_repeated_over_time_and_frames_are_taken_as_given():
    model = tiny("spikformer_cifar_4_384").eval()
    x = images(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x.unsqueeze(0).expand(model.T, *x.shape)), rtol=0, atol=0)


def test_block_inputs_after_the_first_residual_are_integer_counts():
    model = tiny("spikformer_cifar_4_384")
    with torch.no_grad():
        tokens = model.forward_features(images(model))
    assert torch.equal(tokens, tokens.round()) and tokens.min() >= 0 and tokens.max() > 1


def test_unknown_model_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="spikformer_cifar_4_384"):
        create_model("spikformer_9_999")


@pytest.mark.parametrize("name,size", [("spikformer_cifar_4_384", 30), ("spikformer_8_384", 200), ("spikformer_v2_8_384", 40)])
def test_img_size_not_divisible_by_the_patch_grid_is_rejected(name, size):
    with pytest.raises(ValueError, match="img_size"):
        create_model(name, img_size=size)


def test_wrong_channel_count_is_rejected():
    model = tiny("spikformer_cifar_4_384")
    with pytest.raises(ValueError, match="in_channels=3"):
        model(torch.rand(1, 1, 32, 32))


# --- Spikformer V2 masked pre-training -------------------------------------------------------

def pretrainer(**kwargs):
    torch.manual_seed(0)
    encoder = create_model("spikformer_v2_8_384", dim=32, depth=1, num_heads=2, img_size=64, num_classes=5)
    return MaskedPretrainer(encoder, decoder_dim=16, decoder_depth=1, decoder_heads=2, **kwargs)


def test_pretraining_masks_every_stem_output_and_runs_the_blocks_on_visible_tokens():
    model = pretrainer()
    x = torch.rand(2, 3, 64, 64)
    mask = model.random_mask(2)
    assert int(mask.sum()) == 2 * 4  # 25% of the 4x4 patches per image
    stem_outputs, block_inputs = [], []
    for layer in model.encoder.stem.modules():
        if isinstance(layer, (spikeops.nn.MaskedConv2d, spikeops.nn.MaskedBatchNorm2d, spikeops.nn.LIF)):
            layer.register_forward_hook(lambda m, i, o: stem_outputs.append(o))
    model.encoder.blocks[0].register_forward_hook(lambda m, i, o: block_inputs.append(i[0]))
    loss, pred, masked = model(x, mask)
    loss.backward()
    assert len(stem_outputs) == 4 * 3 * 3
    for out in stem_outputs:  # [T*B or T, B, C, h, w]: masked patches exactly 0
        out = out.reshape(-1, 2, *out.shape[-3:])
        up = mask.repeat_interleave(out.shape[-1] // 4, 1).repeat_interleave(out.shape[-1] // 4, 2)
        assert (out * ~up[None, :, None]).abs().sum() == 0
    assert block_inputs[0].shape == (1, 2, 4, 32)  # T=1, visible tokens only
    assert torch.equal(masked, ~mask.view(2, 16))
    assert pred.shape == (2, 16, 16 * 16 * 3) and torch.isfinite(loss)


def test_pretraining_loss_covers_only_masked_patches():
    model = pretrainer()
    x = torch.rand(2, 3, 64, 64)
    mask = model.random_mask(2, generator=torch.Generator().manual_seed(3))
    loss, pred, masked = model(x, mask)
    target = model.patchify(x)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    expected = ((pred - target) ** 2).mean(-1)[masked].mean()
    torch.testing.assert_close(loss, expected)
    grad = torch.autograd.grad(loss, pred)[0]
    assert grad[~masked].abs().sum() == 0 and grad[masked].abs().sum() > 0


def test_pretrained_encoder_loads_into_a_fresh_model_for_finetuning():
    model = pretrainer()
    model(torch.rand(2, 3, 64, 64))[0].backward()
    state = model.encoder_state_dict()
    assert not any(k.startswith("head.") for k in state)
    fresh = create_model("spikformer_v2_8_384", dim=32, depth=1, num_heads=2, img_size=64, num_classes=7)
    result = fresh.load_state_dict(state, strict=False)
    assert set(result.missing_keys) == {"head.fc.weight", "head.fc.bias"} and not result.unexpected_keys
    torch.testing.assert_close(fresh.stem.blocks[0][0].conv.weight, model.encoder.stem.blocks[0][0].conv.weight)


def test_pretrainer_rejects_a_model_without_a_convolutional_stem_and_bad_ratios():
    with pytest.raises(TypeError, match="Spikformer V2"):
        MaskedPretrainer(tiny("spikformer_cifar_4_384"))
    encoder = create_model("spikformer_v2_8_384", dim=32, depth=1, num_heads=2, img_size=32)
    with pytest.raises(ValueError, match="mask_ratio"):
        MaskedPretrainer(encoder, mask_ratio=1.0)
    with pytest.raises(ValueError, match="images must be"):
        MaskedPretrainer(encoder)(torch.rand(1, 3, 64, 64))
