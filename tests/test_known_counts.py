"""known_counts: what spikeops knows about a tensor's values without looking (spikes a neuron made,
sums of them), so compact / the attention ops skip their value checks (host syncs on a GPU)."""
import pytest
import torch
import torch.nn.functional as F

import spikeops
import spikeops.ops.compact as compact_mod
from spikeops.models import create_model
from spikeops.ops.compact import compact, restore
from spikeops.ops.known_counts import MAX_BOUND, add_counts, counts_bound, mark_counts, same_counts
from harness import KERNEL_BACKENDS, device_for


def _spikes(backend="cpp", shape=(4, 3, 70)):
    x = torch.randn(shape, device=device_for(backend)) * 2
    return spikeops.lif(x, backend=backend)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ("torch",))
def test_lif_output_and_its_views_are_known_spikes(backend):
    s = _spikes(backend)
    assert counts_bound(s) == 1
    assert counts_bound(s.view(12, 70)) == 1 and counts_bound(s.transpose(0, 2)) == 1 and counts_bound(s[1:]) == 1


def test_an_in_place_write_through_any_view_forgets_the_bound():
    s = _spikes()
    s.view(-1)[5] = 3.0
    assert counts_bound(s) is None and counts_bound(s[0]) is None
    t = _spikes()
    t[2].mul_(2)
    assert counts_bound(t) is None


def test_a_view_in_another_dtype_or_a_plain_copy_is_not_known():
    s = _spikes()
    assert counts_bound(s.view(torch.int32)) is None
    assert counts_bound(s.clone()) is None and counts_bound(s.detach()) is None and counts_bound(s * 1) is None
    assert counts_bound(torch.ones(3)) is None


def test_a_partial_view_of_a_larger_tensor_is_not_recorded():
    x = torch.zeros(4, 8)
    mark_counts(x[:2])
    assert counts_bound(x) is None and counts_bound(x[:2]) is None


def test_add_counts_adds_the_bounds_only_when_both_are_known():
    s, t = _spikes(), _spikes()
    two = add_counts(s, t)
    assert torch.equal(two, s + t) and counts_bound(two) == 2
    assert counts_bound(add_counts(two, s)) == 3
    assert counts_bound(add_counts(s, torch.rand_like(s))) is None
    assert counts_bound(add_counts(s, s.double())) is None  # promoted: another dtype


def test_bounds_beyond_uint8_are_not_recorded():
    x = torch.zeros(3)
    mark_counts(x, MAX_BOUND)
    big = add_counts(x, x)
    assert counts_bound(x) == MAX_BOUND and counts_bound(big) is None


def test_same_counts_carries_the_bound_to_copies_and_casts_of_known_tensors_only():
    s = _spikes()
    assert counts_bound(same_counts(s, s.transpose(0, 2).contiguous())) == 1
    assert counts_bound(same_counts(s, s.to(torch.bfloat16))) == 1
    u = torch.rand(5)
    assert counts_bound(same_counts(u, u.clone())) is None


def test_compact_saves_known_tensors_without_checking_their_values(monkeypatch):
    s = _spikes()
    counts = add_counts(add_counts(s, _spikes()), _spikes())

    real = compact_mod.pack_words

    def no_check(x, dim, check, backend):
        if check:
            raise AssertionError("compact checked the values of a known tensor")
        return real(x, dim, check, backend)

    monkeypatch.setattr(compact_mod, "pack_words", no_check)
    saved, meta = compact(s, dim=-1)
    assert meta.kind == "bits" and torch.equal(restore(saved, meta), s)
    saved, meta = compact(counts, dim=-1)
    assert meta.kind == "uint8" and saved.dtype == torch.uint8 and torch.equal(restore(saved, meta), counts)
    with pytest.raises(AssertionError, match="checked the values"):
        compact(torch.rand(4, 70))  # unknown: checked as before


def _watch_checks(monkeypatch) -> list:
    """The shapes of the tensors whose values compact checks (pack_words with check=True), appended
    as the checks happen; compact itself runs unchanged."""
    checks, real = [], compact_mod.pack_words

    def watched(x, dim, check, backend):
        if check:
            checks.append(x.shape)
        return real(x, dim, check, backend)

    monkeypatch.setattr(compact_mod, "pack_words", watched)
    return checks


def test_compact_checks_an_unknown_tensor_once_until_it_is_written_to(monkeypatch):
    checks = _watch_checks(monkeypatch)
    spikes = (torch.rand(4, 3, 70) < 0.3).float()
    counts = torch.randint(0, 4, (4, 70)).float()
    for x, kind in ((spikes, "bits"), (counts, "uint8")):
        checks.clear()
        for _ in range(3):
            saved, meta = compact(x, dim=-1)
            assert meta.kind == kind and torch.equal(restore(saved, meta), x)
        assert len(checks) == 1
        x.view(-1)[0] = 0.5  # no longer spikes or counts: checked again, saved as is
        saved, meta = compact(x, dim=-1)
        assert len(checks) == 2 and meta.kind == "plain" and saved is x
        assert counts_bound(x) is None


def test_spiking_self_attention_checks_its_unknown_input_once(monkeypatch):
    """q, k and v project the same x: the first projection checks it, the other two know it."""
    checks = _watch_checks(monkeypatch)
    torch.manual_seed(0)
    attn = spikeops.nn.SpikingSelfAttention(32, 2, backend="cpp")
    x = (torch.rand(2, 2, 16, 32) < 0.3).float().requires_grad_()
    attn(x).sum().backward()
    assert len(checks) == 1 and x.grad is not None


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_attention_ops_still_reject_known_spikes_written_to_afterwards(backend):
    dev = device_for(backend)
    q = spikeops.lif(torch.randn(2, 1, 2, 8, 16, device=dev) * 2, backend=backend)
    assert counts_bound(spikeops.ssa(q, q, q, backend=backend)) == 1
    assert counts_bound(spikeops.token_attention(q, q, backend=backend)) == 1
    q[0, 0, 0, 0, 0] = 2.0
    with pytest.raises(ValueError, match="only 0 and 1"):
        spikeops.ssa(q, q, q, backend=backend)
    with pytest.raises(ValueError, match="only 0 and 1"):
        spikeops.token_attention(q, q, backend=backend)


@pytest.mark.parametrize("name,kwargs", [
    ("spikformer_cifar_4_384", dict(depth=1, dim=64, num_heads=2)),
    ("spikformer_v2_8_384", dict(depth=2, dim=64, num_heads=2, img_size=32)),
    ("msvit_cifar_4_384", dict(embed_dim=64, num_heads=2, depths=(1, 1, 1), T=2)),  # stems with shortcut sums
    ("qkformer_cifar_4_384", dict(embed_dim=64, num_heads=2, depths=(1, 1, 1), T=2)),
    ("msvit_10_384", dict(embed_dim=96, num_heads=4, depths=(1, 1, 1), img_size=32, T=1)),  # ImageNet-style stem
])
def test_a_training_step_of_the_models_checks_no_layer_input_values(monkeypatch, name, kwargs):
    """Every Spike* layer input in these models is spikes or a residual sum of spikes, known so:
    compact never looks at the values (on a GPU each look is a host sync)."""
    checks = _watch_checks(monkeypatch)
    torch.manual_seed(0)
    model = create_model(name, backend="cpp", **kwargs)
    img = kwargs.get("img_size", 32)
    F.cross_entropy(model(torch.rand(2, 3, img, img)), torch.tensor([1, 2])).backward()
    assert checks == []


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_inference_tensors_are_never_known_and_the_ops_still_run(backend):
    """inference_mode tensors have no version counter: nothing is recorded, the checks run."""
    dev = device_for(backend)
    with torch.inference_mode():
        q = spikeops.lif(torch.randn(2, 1, 2, 8, 16, device=dev) * 2, backend=backend)
        a = spikeops.ssa(q, q, q, backend=backend)
        assert counts_bound(q) is None and counts_bound(a) is None
        assert torch.equal(a, spikeops.ssa(q.clone(), q.clone(), q.clone(), backend="torch"))
        with pytest.raises(ValueError, match="only 0 and 1"):
            spikeops.ssa(q * 2, q, q, backend=backend)
