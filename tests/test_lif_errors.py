"""Bad input to spikeops.lif / spikeops.nn.LIF raises a clear error naming the argument."""
import math

import pytest
import torch

import spikeops
from spikeops import backend as backend_mod


def good():
    return torch.randn(3, 4)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.uint8])
def test_integer_and_bool_inputs_are_rejected(dtype):
    with pytest.raises(TypeError, match="x_seq must be a floating tensor"):
        spikeops.lif(torch.zeros(3, 4, dtype=dtype))


def test_non_tensor_input_is_rejected():
    with pytest.raises(TypeError, match="x_seq must be a torch.Tensor"):
        spikeops.lif([[0.0, 1.0]])


@pytest.mark.parametrize(
    "x,match",
    [
        (torch.tensor(1.0), "leading time dimension"),
        (torch.zeros(0, 4), "T=0"),
        (torch.zeros(3, 0), "empty"),
    ],
)
def test_shapes_without_time_steps_or_neurons_are_rejected(x, match):
    with pytest.raises(ValueError, match=match):
        spikeops.lif(x)


@pytest.mark.parametrize("tau", [1.0, 0.5, -2.0, 0.0])
def test_tau_at_most_one_is_rejected(tau):
    with pytest.raises(ValueError, match="tau must be > 1"):
        spikeops.lif(good(), tau=tau)


@pytest.mark.parametrize("name", ["tau", "v_threshold", "v_reset", "alpha"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_settings_are_rejected(name, value):
    with pytest.raises(ValueError, match=f"{name} must be finite"):
        spikeops.lif(good(), **{name: value})


@pytest.mark.parametrize("name", ["tau", "v_threshold", "v_reset", "alpha"])
def test_non_numeric_settings_are_rejected(name):
    with pytest.raises(TypeError, match=f"{name} must be a real number"):
        spikeops.lif(good(), **{name: "1.0"})


def test_non_positive_alpha_is_rejected():
    with pytest.raises(ValueError, match="alpha must be > 0"):
        spikeops.lif(good(), alpha=0.0)


def test_unknown_surrogate_is_rejected():
    with pytest.raises(ValueError, match="surrogate must be one of"):
        spikeops.lif(good(), surrogate="triangle")


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="backend must be one of"):
        spikeops.lif(good(), backend="cuda")


def test_triton_on_cpu_without_the_interpreter_is_rejected(monkeypatch):
    monkeypatch.setattr(backend_mod, "TRITON_INTERPRET", False)
    with pytest.raises(ValueError, match="backend='triton' runs on CUDA tensors.*TRITON_INTERPRET=1"):
        spikeops.lif(good(), backend="triton")


def test_cpp_on_a_non_cpu_device_is_rejected():
    with pytest.raises(ValueError, match="backend='cpp' runs on CPU tensors"):
        backend_mod.resolve(torch.empty(3, 4, device="meta"), "cpp")


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_kernel_backends_reject_float64_with_a_hint(backend):
    with pytest.raises(TypeError, match="use backend='torch'"):
        spikeops.lif(good().double(), backend=backend)


def test_missing_cpp_build_is_explained(monkeypatch):
    monkeypatch.setattr(backend_mod, "_cpp", None)
    with pytest.raises(RuntimeError, match="make setup"):
        spikeops.lif(good(), backend="cpp")
    assert backend_mod.resolve(good(), "auto") == "torch"


def test_module_checks_its_settings_at_construction():
    with pytest.raises(ValueError, match="tau must be > 1"):
        spikeops.nn.LIF(tau=0.9)
    with pytest.raises(ValueError, match="step_mode must be 'm'"):
        spikeops.nn.LIF(step_mode="s")
    with pytest.raises(ValueError, match="backend must be one of"):
        spikeops.nn.LIF(backend="gpu")
    with pytest.raises(ValueError, match="surrogate_function must be"):
        spikeops.nn.LIF(surrogate_function=torch.sigmoid)


def test_module_settings_are_keyword_only():
    # SpikingJelly's positional order (tau, decay_input, v_threshold, ...) differs from ours
    with pytest.raises(TypeError):
        spikeops.nn.LIF(2.0, True)
