"""spikeops.memory: bytes autograd keeps for backward, each storage once."""
import gc

import torch

import spikeops
from spikeops.memory import saved_bytes, saved_tensors_report


def leaf(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype).requires_grad_()


def test_exp_saves_its_output():
    x = leaf(1000)
    assert saved_bytes(torch.exp, x) == 4000


def test_product_saves_both_factors():
    x, y = leaf(100), leaf(100, dtype=torch.float64)
    assert saved_bytes(torch.mul, x, y) == 400 + 800


def test_product_with_a_constant_saves_only_the_constant():
    x, c = leaf(100), torch.randn(100)
    assert saved_bytes(torch.mul, x, c) == 400  # d(x*c)/dx needs c only


def test_two_views_of_one_tensor_count_once():
    x, y = leaf(10, 10), leaf(10, 10)
    assert saved_bytes(lambda a, b: (a[:5] * b[:5]).sum() + (a.t()[3:] * b[3:]).sum(), x, y) == 2 * 400


def test_a_view_counts_its_whole_storage():
    x, y = leaf(10, 10), leaf(1, 10)
    assert saved_bytes(lambda a, b: a[:1] * b, x, y) == 400 + 40


def test_keyword_arguments_reach_fn():
    x = leaf(10, 7)
    assert saved_bytes(torch.softmax, x, dim=-1) == 280  # softmax saves its output


def test_nothing_is_saved_without_grad():
    x = torch.randn(100)
    assert saved_bytes(torch.exp, x) == 0
    with torch.no_grad():
        assert saved_bytes(torch.exp, x.requires_grad_()) == 0


def test_report_splits_by_dtype_and_counts_storages():
    x, y = leaf(100), leaf(100, dtype=torch.float16)
    report = saved_tensors_report(lambda a, b: a.exp() * b.float(), x, y)
    # exp saves its output (fp32); mul saves both factors: exp's output again and b.float() (fp32)
    assert report.total == 800 and report.storages == 2
    assert report.by_dtype == {torch.float32: 800}


def test_custom_function_tensors_saved_with_save_for_backward_are_counted():
    class Square(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            ctx.save_for_backward(a.to(torch.uint8))
            return a * a

        @staticmethod
        def backward(ctx, g):
            (a,) = ctx.saved_tensors
            return 2 * a.float() * g

    assert saved_tensors_report(Square.apply, leaf(64)).by_dtype == {torch.uint8: 64}


def test_graph_still_runs_backward_after_the_report():
    x = leaf(10)
    kept = []
    saved_bytes(lambda t: kept.append(t.exp().sum()), x)
    kept[0].backward()
    assert torch.equal(x.grad, x.detach().exp())


def test_exported_as_spikeops_memory():
    assert spikeops.memory.saved_bytes is saved_bytes


def test_the_measured_graph_is_freed_with_its_output():
    """The hooks must not tie saved outputs (exp's, the LIF's) to their own graph: a reference cycle
    through C++ that the garbage collector cannot free would leak every measured graph."""
    x = torch.randn(4, 1000, requires_grad=True)

    def live_tensors():  # ids: tensors that earlier tests left to the collector may go meanwhile
        gc.collect()
        return {id(o) for o in gc.get_objects() if isinstance(o, torch.Tensor)}

    for fn in (torch.exp, lambda a: spikeops.lif(a, backend="cpp"), lambda a: spikeops.lif(a, backend="torch")):
        before = live_tensors()
        assert spikeops.memory.saved_bytes(fn, x) > 0
        assert not live_tensors() - before, "tensors made by the measurement outlive it"
