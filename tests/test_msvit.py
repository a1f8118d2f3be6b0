"""MSViT / QKFormer models (models/msvit.py): sizes, forward/backward, eager baseline, errors."""
import pytest
import torch
from torch import nn

import spikeops.nn as snn
from spikeops.models import create_model, list_models
from spikeops.models.msvit import MSViT, QKFormer

# (name, overrides, reported parameter count, source)
REPORTED = [
    ("qkformer_10_384", {}, 16.47e6, "QKFormer paper"),
    ("qkformer_10_512", {}, 29.08e6, "QKFormer paper"),
    ("qkformer_10_768", {}, 64.96e6, "QKFormer paper"),
    ("qkformer_cifar_4_384", {}, 6_706_234, "QKFormer CIFAR-10 log"),
    ("msvit_10_384", {}, 17.69e6, "MSViT paper"),
    ("msvit_10_512", {}, 31.23e6, "MSViT code (its README says 30.23M)"),
    ("msvit_10_768", {}, 69.80e6, "MSViT paper"),
    ("msvit_cifar_4_384", {}, 7.59e6, "MSViT paper (CIFAR-10 head: 7,558,762, -0.41%)"),
    ("msvit_cifar_4_384", {"num_classes": 100}, 7.59e6, "MSViT paper (CIFAR-100 head: 7,593,412)"),
]
CIFAR = ["msvit_cifar_4_384", "qkformer_cifar_4_384"]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,overrides,reported,source", REPORTED,
                         ids=[n + "".join(f"-{k}{v}" for k, v in o.items()) for n, o, _, _ in REPORTED])
def test_parameter_count_matches_reported(name, overrides, reported, source):
    with torch.device("meta"):  # no memory, no init cost
        model = create_model(name, **overrides)
    count = n_params(model)
    assert abs(count - reported) <= 0.005 * reported, f"{name}: {count:,} vs {reported:,.0f} ({source})"


def test_registered_names():
    names = set(list_models())
    for name in ["msvit_cifar_4_384", "msvit_10_384", "msvit_10_512", "msvit_10_768",
                 "qkformer_cifar_4_384", "qkformer_10_384", "qkformer_10_512", "qkformer_10_768"]:
        assert name in names


def test_architecture_widths_and_defaults():
    with torch.device("meta"):
        ms, qk = create_model("msvit_10_384"), create_model("qkformer_10_384")
        cifar = create_model("qkformer_cifar_4_384")
    assert isinstance(ms, MSViT) and isinstance(qk, QKFormer)
    assert ms.dims == (192, 192, 384) and qk.dims == (96, 192, 384)
    assert ms.depths == qk.depths == (1, 2, 7) and cifar.depths == (1, 1, 2)
    assert (ms.T, ms.num_classes, ms.img_size, ms.in_channels, ms.backend) == (4, 1000, 224, 3, "auto")
    assert (cifar.num_classes, cifar.img_size, cifar.num_heads, cifar.patch_grid) == (10, 32, 8, 4)
    assert isinstance(ms.stage1[0].attn, snn.MultiScaleSpikingAttention)
    assert isinstance(qk.stage2[1].attn, snn.QKTokenAttention)
    assert isinstance(qk.stage3[6].attn, snn.SpikingSelfAttention)
    # the attention neurons' threshold is a parameter, shared by token attention and SSA
    with torch.device("meta"):
        m = create_model("msvit_cifar_4_384", attn_v_threshold=1.0)
    assert m.stage1[0].attn.attn_v_threshold == 1.0 and m.stage3[0].attn.attn_v_threshold == 1.0
    assert ms.stage1[0].attn.attn_v_threshold == 0.5


@pytest.mark.parametrize("name,img_size", [("msvit_cifar_4_384", 32), ("qkformer_cifar_4_384", 24)])
def test_forward_backward_every_parameter_gets_a_gradient(name, img_size):
    torch.manual_seed(0)
    model = create_model(name, T=2, img_size=img_size)
    x = torch.rand(2, 3, img_size, img_size)
    logits = model(x)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    logits.logsumexp(1).sum().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, n
        assert torch.isfinite(p.grad).all(), n
    # weights (not the pre-BN biases, whose gradient is 0 up to rounding) get a real gradient
    dead = [n for n, p in model.named_parameters() if n.endswith("weight") and p.grad.abs().sum() == 0]
    assert not dead, dead


@pytest.mark.parametrize("name", CIFAR)
def test_torch_backend_is_the_same_model(name):
    """backend="torch" (plain torch layers, reference ops) vs "auto" (spikeops kernels) on the same
    weights: identical logits (train and eval), running stats and gradients. 24x24 images keep it
    cheap; at random init the stage-3 SSA (6x6 tokens) rarely reaches 0.5, so the attention neurons
    fire at 0.25 here, making every attention layer fire."""
    torch.manual_seed(0)
    cfg = dict(T=2, img_size=24, attn_v_threshold=0.25)
    fast = create_model(name, backend="auto", **cfg)
    eager = create_model(name, backend="torch", **cfg)
    eager.load_state_dict(fast.state_dict())
    assert not any(isinstance(m, (snn.SpikeConv1d, snn.SpikeConv2d, snn.SpikeLinear)) for m in eager.modules())
    assert isinstance(fast.patch_embed2.conv0.conv, snn.SpikeConv2d)
    assert type(fast.patch_embed1.conv0.conv) is nn.Conv2d  # pixels in: nothing to pack
    x = torch.rand(2, 3, 24, 24)

    fired = {}
    hooks = [m.register_forward_hook(lambda m, inp, out, n=n: fired.__setitem__(n, bool(inp[0].any())))
             for n, m in fast.named_modules() if n.endswith("attn.proj")]
    out_f, out_e = fast(x), eager(x)  # train mode: batch statistics
    for h in hooks:
        h.remove()
    assert len(fired) == 4 and all(fired.values()), fired  # the attention neurons fire in every block
    assert torch.equal(out_f, out_e)
    out_f.square().sum().backward()
    out_e.square().sum().backward()
    for (n, pf), pe in zip(fast.named_parameters(), eager.parameters()):
        torch.testing.assert_close(pf.grad, pe.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")
    for bf, be in zip(fast.buffers(), eager.buffers()):
        assert torch.equal(bf, be)

    fast.eval(), eager.eval()
    with torch.no_grad():
        assert torch.equal(fast(x), eager(x))


def test_time_major_input_and_per_sample_semantics():
    """[T, B, C, H, W] frames equal the repeated images; in eval mode every sample is independent
    of the others in its batch (the released stage-3 proj_lif mixed them)."""
    torch.manual_seed(0)
    model = create_model("qkformer_cifar_4_384", T=2, embed_dim=128).eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(model(x.unsqueeze(0).repeat(2, 1, 1, 1, 1)), out, rtol=0, atol=0)
        torch.testing.assert_close(model(x[1:2]), out[1:2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,embed_dim", [("msvit_10_384", 96), ("qkformer_10_384", 96)])
def test_imagenet_style_small(name, embed_dim):
    """The ImageNet-style stem (patch grid 16) on a small image: 32 -> 8 -> 4 -> 2 tokens per side."""
    torch.manual_seed(0)
    model = create_model(name, embed_dim=embed_dim, num_heads=4, depths=(1, 1, 1), img_size=32, T=1, num_classes=5)
    x = torch.rand(2, 3, 32, 32)
    assert model.forward_features(x).shape == (1, 2, 4, embed_dim)
    out = model(x)
    assert out.shape == (2, 5)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="img_size"):
        create_model("msvit_cifar_4_384", img_size=30)  # not a multiple of 4
    with pytest.raises(ValueError, match="img_size"):
        create_model("qkformer_10_384", img_size=200)  # not a multiple of 16
    with pytest.raises(ValueError, match="in_channels"):
        create_model("msvit_cifar_4_384", in_channels=0)
    with pytest.raises(ValueError, match="embed_dim"):
        create_model("qkformer_cifar_4_384", embed_dim=100)
    with pytest.raises(ValueError, match="num_heads"):
        create_model("msvit_cifar_4_384", num_heads=7)
    with pytest.raises(ValueError, match="backend"):
        create_model("msvit_cifar_4_384", backend="cuda")
    model = create_model("qkformer_cifar_4_384", embed_dim=64, T=1)
    with pytest.raises(ValueError, match="in_channels=3"):
        model(torch.rand(1, 1, 32, 32))  # grayscale into an RGB model
    with pytest.raises(ValueError, match="multiple of 4"):
        model(torch.rand(1, 3, 30, 30))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        model(torch.rand(3, 32, 32))
