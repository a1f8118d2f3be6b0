"""spikeops.ops.op: plain eager calls run the kernels without the custom op's dispatch, with the same
results and gradients; anything that traces still goes through the custom op."""
import importlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import spikeops
from spikeops.ops.op import eager_call_ok
from harness import random_currents, random_spikes

lif_ops = importlib.import_module("spikeops.ops.lif")  # spikeops.ops.lif is also the name of the function
ssa_ops = importlib.import_module("spikeops.ops.ssa")


class PassThrough(torch.overrides.TorchFunctionMode):
    """A torch-function mode that changes nothing (while one is active, ops take their custom op)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class CountingOp:
    """Stands in for an Op's custom op, counting the calls that reach it."""

    def __init__(self, op):
        self.op, self.calls = op, 0

    def __call__(self, *args):
        self.calls += 1
        return self.op(*args)


@pytest.fixture
def lif_op_calls(monkeypatch):
    counting = CountingOp(lif_ops._lif_forward.op)
    monkeypatch.setattr(lif_ops._lif_forward, "op", counting)
    return counting


def test_eager_call_ok_only_for_plain_tensors_with_nothing_tracing():
    x = torch.zeros(2, 3)
    assert eager_call_ok(x, x.clone().requires_grad_())
    with FakeTensorMode():
        assert not eager_call_ok(torch.zeros(2, 3))
    with PassThrough():
        assert not eager_call_ok(x)
    seen = []  # inside functorch transforms (their tensors are wrapped)
    torch.func.grad(lambda t: (seen.append(eager_call_ok(t)), t.sum())[1])(x)
    torch.func.vmap(lambda t: (seen.append(eager_call_ok(t)), t)[1])(x)
    assert seen == [False, False]


def test_eager_calls_with_and_without_grad_skip_the_custom_op(lif_op_calls):
    x = random_currents(4, 8, 16).requires_grad_()
    spikeops.lif(x).sum().backward()
    with torch.no_grad():
        spikeops.lif(x)
    assert lif_op_calls.calls == 0 and x.grad is not None


def test_calls_under_a_mode_go_through_the_custom_op(lif_op_calls):
    x = random_currents(4, 8, 16).requires_grad_()
    with PassThrough():
        spikeops.lif(x).sum().backward()
    assert lif_op_calls.calls == 1


def both_paths(fn, inputs):
    """fn's outputs and input gradients called plainly, then through the custom ops (a mode forces them)."""
    results = []
    for forced in (False, True):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        if forced:
            with PassThrough():
                out = fn(*leaves)
        else:
            out = fn(*leaves)
        out.backward(torch.linspace(-1, 1, out.numel()).view(out.shape))
        results.append((out.detach(), [leaf.grad for leaf in leaves]))
    return results


@pytest.mark.parametrize("op", ["lif", "ssa", "token_attention"])
def test_plain_and_custom_op_paths_agree_bit_for_bit(op):
    if op == "lif":
        fn, inputs = spikeops.lif, [random_currents(4, 2, 3, 5)]
    else:
        inputs = [random_spikes(3, 2, 2, 20, 8, seed=s) for s in range(3)]
        fn = spikeops.ssa if op == "ssa" else spikeops.token_attention
    (out, grads), (op_out, op_grads) = both_paths(fn, inputs)
    assert torch.equal(out, op_out)
    assert all(torch.equal(g, og) for g, og in zip(grads, op_grads))


def test_second_order_gradients_raise_instead_of_being_silently_zero():
    q, k, v = (random_spikes(2, 1, 2, 12, 8, seed=s).requires_grad_() for s in range(3))
    (dq,) = torch.autograd.grad(spikeops.ssa(q, k, v).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        dq.sum().backward()


def test_default_arguments_reach_setup_context():
    q, k, v = (random_spikes(2, 1, 2, 12, 8, seed=s).view(2, 2, 12, 8).requires_grad_() for s in range(3))
    out = ssa_ops._ssa_forward(q, k, v, 0.125, 0.5, 2.0, True, "cpp")  # `check` left to its default
    out[0].sum().backward()
    assert q.grad is not None
