"""spikeops.nn.LIF and spikeops.convert, with SpikingJelly 2.0 as an oracle where installed."""
import itertools
import warnings

import pytest
import torch
from torch import nn

import spikeops
from harness import KERNEL_BACKENDS, assert_grads_close, device_for, forward_backward

sj = pytest.importorskip("spikingjelly.activation_based", reason="SpikingJelly 2.0 is the oracle here (make setup installs it)")
from spikingjelly.activation_based import functional, neuron, surrogate  # noqa: E402

SJ_SURROGATES = {"sigmoid": surrogate.Sigmoid, "atan": surrogate.ATan}


def sj_lif(**kw):
    return neuron.LIFNode(step_mode="m", **kw)


def run_sj(node, x, grad):
    functional.reset_net(node)
    return forward_backward(node, x, grad)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize(
    "v_reset,decay_input,detach_reset,surrogate_name,tau,v_threshold",
    list(itertools.product((0.0, None, 0.2), (True, False), (True, False), ("sigmoid", "atan"), (2.0, 4.0), (1.0, 0.5))),
)
def test_module_matches_spikingjelly_lifnode(backend, v_reset, decay_input, detach_reset, surrogate_name, tau, v_threshold):
    device = device_for(backend)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(6, 3, 41, generator=g) * 1.5 + 0.6).to(device)
    grad = torch.randn(x.shape, generator=g).to(device)
    sj_kw = dict(tau=tau, decay_input=decay_input, v_threshold=v_threshold, v_reset=v_reset,
                 detach_reset=detach_reset, surrogate_function=SJ_SURROGATES[surrogate_name]())
    ours = spikeops.nn.LIF(backend=backend, **sj_kw)  # SpikingJelly's keyword names are accepted
    spikes, gx = forward_backward(ours, x, grad)
    sj_spikes, sj_gx = run_sj(sj_lif(**sj_kw), x.cpu(), grad.cpu())
    assert torch.equal(spikes.cpu(), sj_spikes)
    assert_grads_close(gx, sj_gx, rtol=1e-5)


def test_module_defaults_follow_the_spikformer_recipe():
    m = spikeops.nn.LIF()
    assert (m.tau, m.v_threshold, m.v_reset, m.detach_reset, m.surrogate, m.alpha) == (2.0, 1.0, 0.0, True, "sigmoid", 4.0)
    assert "tau=2.0" in repr(m)
    m.reset()  # no-op for code that calls reset_net / node.reset()
    x = torch.randn(4, 2, 8)
    assert torch.equal(m(x), spikeops.lif(x))


def test_surrogate_object_alpha_is_carried_over():
    m = spikeops.nn.LIF(surrogate_function=surrogate.ATan(alpha=3.0))
    assert (m.surrogate, m.alpha) == ("atan", 3.0)


def test_module_trains_inside_a_model_with_every_dtype():
    model = nn.Sequential(nn.Linear(8, 16), spikeops.nn.LIF(), nn.Linear(16, 2))
    x = torch.randn(4, 3, 8)
    for dtype in (torch.float32, torch.bfloat16):
        out = model.to(dtype)(x.to(dtype))
        out.float().sum().backward()
        assert model[0].weight.grad is not None and torch.isfinite(model[0].weight.grad.float()).all()
        model.zero_grad()


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.lif = sj_lif(tau=2.0, detach_reset=True, surrogate_function=surrogate.Sigmoid())
        self.inner = nn.Sequential(nn.Linear(8, 8), sj_lif(v_reset=None, surrogate_function=surrogate.ATan(alpha=3.0)))
        self.single_step = neuron.LIFNode(step_mode="s")
        self.odd_surrogate = sj_lif(surrogate_function=surrogate.PiecewiseQuadratic())

    def forward(self, x):
        return self.inner(self.lif(self.fc(x)))


def test_convert_replaces_multistep_lifnodes_and_reports_the_rest():
    torch.manual_seed(0)
    model = Block()
    x = torch.randn(4, 2, 8)
    functional.reset_net(model)
    expected = model(x)
    with pytest.warns(UserWarning, match="skipped 2"):
        report = spikeops.convert(model)
    assert report.model is model
    assert sorted(report.replaced) == ["inner.1", "lif"]
    assert dict(report.skipped).keys() == {"single_step", "odd_surrogate"}
    assert "step_mode" in dict(report.skipped)["single_step"]
    assert isinstance(model.lif, spikeops.nn.LIF) and isinstance(model.inner[1], spikeops.nn.LIF)
    assert (model.inner[1].v_reset, model.inner[1].surrogate, model.inner[1].alpha) == (None, "atan", 3.0)
    assert model.lif.detach_reset is True
    assert torch.equal(model(x), expected)
    assert "replaced lif" in str(report)


def test_convert_of_a_bare_lifnode_returns_the_new_module():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = spikeops.convert(sj_lif(tau=3.0))
    assert isinstance(report.model, spikeops.nn.LIF) and report.model.tau == 3.0
    assert report.replaced == [""]
