"""Mixed precision (autocast fp16/bf16), determinism and thread-count independence.

AMP bounds (measured when written, on the C++ and Triton-interpreter backends; the bounds
leave 2-4x headroom and are documented in README.md "Robustness"):

* spiking modules (neurons firing at 2-20%): a spike may differ from the fp32 run where a
  neuron's input lies within rounding of the threshold, and a flipped spike changes what the
  next layer sees. The fraction of differing output spikes is <= 1% under fp16 (measured
  <= 0.25%) and <= 5% under bf16 (measured <= 2.4%, SpikingSelfAttention: three LIF layers deep;
  a lone LIF on bf16 input <= 0.06%).
* layers with real-valued output (SpikeLinear/SpikeConv*): max error <= 2e-3 (fp16) / 1.6e-2
  (bf16) of the output's scale, as for the torch layer under autocast.
* the masked ops (MaskedConv2d/MaskedBatchNorm2d inside ``masking``) and SpikeMaxPool2d are not
  cast by autocast: they compute in the input's dtype (fp32 here), so they equal the fp32 run.
* every gradient is finite, parameters get fp32 gradients.

Determinism: two runs of every op, forward and backward, are bit-identical on CPU (C++ kernels,
and the Triton kernels under the interpreter). Thread count: the C++ kernels give the same
spikes and gradients bit for bit with 1, 2 and 3 threads: each neuron/row/block is computed
by one thread in a fixed order. The exceptions are reductions done by torch's own kernels
(masked_conv2d's weight gradient, a BLAS GEMM over pixels; masked_batch_norm2d's batch
statistics, native_batch_norm): they change with the thread count in the last bits (<= 1e-6 of
the scale), as torch's own conv/BatchNorm do, and are asserted to 1e-5.
"""
import pytest
import torch
from torch import nn

import spikeops
import spikeops.nn as snn
from spikeops.ops.batch_norm_lif import batch_norm_lif
from harness import KERNEL_BACKENDS, Masked, device_for, random_currents, random_spikes

AMP_DTYPES = (torch.float16, torch.bfloat16)
SPIKE_MISMATCH_BOUND = {torch.float16: 0.01, torch.bfloat16: 0.05}
REAL_ERROR_BOUND = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


spikes, currents = random_spikes, random_currents


def mask(batch=4, size=8):
    return torch.rand(batch, 1, size, size, generator=torch.Generator().manual_seed(5)) < 0.5


# name -> (factory(backend), input, output kind); sizes give >= ~10^4 spikes so fractions mean something,
# smaller for the Triton interpreter
def modules(backend):
    s = 1 if backend == "cpp" else 2  # shrink for the interpreter
    return {
        "LIF": (lambda: snn.LIF(backend=backend), currents(4, 64, 64 // s), "spikes"),
        "SpikingSelfAttention": (lambda: snn.SpikingSelfAttention(64 // s, 4, backend=backend),
                                 spikes(4, 4, 32 // s, 64 // s), "spikes"),
        "SpikingMLP": (lambda: snn.SpikingMLP(64 // s, 128 // s, backend=backend), spikes(4, 4, 32 // s, 64 // s),
                       "spikes"),
        "QKTokenAttention": (lambda: snn.QKTokenAttention(64 // s, 4, backend=backend), spikes(4, 4, 64 // s, 32 // s),
                             "spikes"),
        "MultiScaleSpikingAttention": (lambda: snn.MultiScaleSpikingAttention(64 // s, 4, backend=backend),
                                       spikes(4, 4, 64 // s, 32 // s), "spikes"),
        "SpikeLinear": (lambda: snn.SpikeLinear(64, 32), spikes(4, 8, 64), "real"),
        "SpikeConv1d": (lambda: snn.SpikeConv1d(16, 8, 3, padding=1), spikes(4, 16, 20), "real"),
        "SpikeConv2d": (lambda: snn.SpikeConv2d(16, 8, 3, padding=1), spikes(4, 16, 10, 10), "real"),
        "SpikeMaxPool2d": (lambda: snn.SpikeMaxPool2d(3, 2, 1), spikes(4, 16, 10, 10), "exact"),
        "MaskedConv2d": (lambda: Masked(snn.MaskedConv2d(16, 8, 3, padding=1, backend=backend), mask()),
                         currents(8, 16, 16 // s, 16 // s), "exact"),
        "MaskedBatchNorm2d": (lambda: Masked(snn.MaskedBatchNorm2d(16, backend=backend), mask()),
                              currents(8, 16, 16 // s, 16 // s), "exact"),
    }


MODULE_NAMES = list(modules("cpp"))


def firing(module):
    """BatchNorm weights of 2.5 (init 1): the block's neurons fire at ~10-40%, so a mismatch
    fraction is measured on a firing population (at init most of them stay silent)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
            with torch.no_grad():
                m.weight.fill_(2.5)
    return module


def run(make, x, autocast_dtype=None, device="cpu"):
    torch.manual_seed(0)
    module = firing(make()).to(device)
    leaf = x.clone().to(device).requires_grad_()
    inp = leaf
    if autocast_dtype is not None and isinstance(module, snn.LIF):
        inp = leaf.to(autocast_dtype)  # an elementwise neuron: autocast leaves it alone; feed it the AMP dtype
    with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        out = module(inp)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    out.float().backward(g)
    return out, leaf.grad, [p.grad for p in module.parameters()]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", AMP_DTYPES, ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", MODULE_NAMES)
def test_autocast_accuracy_bound(name, dtype, backend):
    device = device_for(backend)
    make, x, kind = modules(backend)[name]
    ref, ref_gx, _ = run(make, x, None, device)
    out, gx, gparams = run(make, x, dtype, device)
    assert out.shape == ref.shape
    out32 = out.float()
    if kind == "spikes":
        assert bool(((out32 == 0) | (out32 == 1)).all())
        mismatch = (out32 != ref).float().mean().item()
        assert mismatch <= SPIKE_MISMATCH_BOUND[dtype], f"{mismatch:.4%} of the spikes differ"
        assert ref.sum() > 0.01 * ref.numel()  # the fraction is measured on a firing population
    elif kind == "real":
        assert out.dtype == dtype
        err = ((out32 - ref).abs().max() / ref.abs().max()).item()
        assert err <= REAL_ERROR_BOUND[dtype], err
    else:  # not cast by autocast: computed in the input's dtype, equal to the fp32 run
        assert out.dtype == torch.float32 and torch.equal(out, ref)
        assert torch.equal(gx, ref_gx)
    assert gx is not None and bool(torch.isfinite(gx).all())
    for p in gparams:
        if p is not None:
            assert p.dtype == torch.float32 and bool(torch.isfinite(p).all())


# ---- determinism and thread count -----------------------------------------------------------------


def op_runs(backend):
    """name -> function () -> tuple of tensors (outputs and gradients) of one op, forward + backward."""
    d = device_for(backend)
    big = backend == "cpp"  # large enough for the C++ kernels to split the work across threads

    def fb(fn, *inputs, seed=1):
        leaves = [t.detach().clone().to(d).requires_grad_() if t.is_floating_point() else t.to(d) for t in inputs]
        out = fn(*leaves)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(d))
        return (out.detach(), *[t.grad for t in leaves if t.requires_grad])

    n = 40000 if big else 300
    x = currents(4, n)
    qkv = [spikes(2, 2, 4, 96 if big else 12, 16, seed=i) for i in range(3)]
    xc, w = currents(8, 8, 16, 16), currents(6, 8, 3, 3, seed=1)
    m = mask(4, 4).to(d)
    bn_y = currents(4 * 8, 16, 10, 10)

    def bn_lif(y):
        torch.manual_seed(0)
        return batch_norm_lif(y, nn.BatchNorm2d(16).to(d), snn.LIF(backend=backend), 4)

    return {
        "lif": lambda: fb(lambda t: spikeops.lif(t, backend=backend), x),
        "lif_soft_atan_bf16": lambda: fb(lambda t: spikeops.lif(t, v_reset=None, surrogate="atan", backend=backend,
                                                                state_dtype=torch.bfloat16), x),
        "pack_unpack": lambda: (lambda p: (p.words, spikeops.unpack_spikes(p, backend=backend)))(
            spikeops.pack_spikes(spikes(64, n // 16).to(d), backend=backend)),
        "spike_matmul": lambda: (spikeops.spike_matmul(spikes(4, 64, 200).to(d), spikes(4, 200, 48, seed=1).to(d),
                                                       backend=backend),),
        "ssa": lambda: fb(lambda q, k, v: spikeops.ssa(q, k, v, backend=backend), *qkv),
        "token_attention": lambda: fb(lambda q, k, p: spikeops.token_attention(q, k, p, backend=backend), *qkv),
        "masked_conv2d": lambda: fb(lambda t, wt: spikeops.masked_conv2d(t, wt, m, padding=1, backend=backend), xc, w),
        "masked_batch_norm2d": lambda: fb(lambda t: spikeops.masked_batch_norm2d(t, m, training=True, backend=backend),
                                          xc),
        "batch_norm_lif": lambda: fb(bn_lif, bn_y),
    }


OP_NAMES = list(op_runs("cpp"))


def assert_identical(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x, y) or torch.equal(x.isnan(), y.isnan()) and torch.equal(x.nan_to_num(), y.nan_to_num())


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("name", OP_NAMES)
def test_two_runs_are_bit_identical(name, backend):
    fn = op_runs(backend)[name]
    first, second = fn(), fn()
    assert any(t.abs().sum() > 0 for t in first)
    assert_identical(first, second)


# Reductions that torch's own kernels split across threads: masked_conv2d's weight gradient (a GEMM
# over the visible pixels in BLAS) and masked_batch_norm2d's batch statistics (native_batch_norm on the
# gathered blocks, hence its output and dx). They differ with the thread count in the last bits
# (measured <= 1e-6 of the scale), as torch's own conv / BatchNorm do; everything else is exact.
REDUCTION_ORDER = {"masked_conv2d": {2}, "masked_batch_norm2d": {0, 1}}  # which results (by index)


@pytest.mark.parametrize("name", OP_NAMES)
def test_cpp_results_do_not_depend_on_the_thread_count(name):
    fn = op_runs("cpp")[name]
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(fn())
    finally:
        torch.set_num_threads(before)
    loose = REDUCTION_ORDER.get(name, set())
    for other in results[1:]:
        assert len(other) == len(results[0])
        for i, (a, e) in enumerate(zip(other, results[0])):
            if i in loose:
                torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5 * e.abs().max().item())
            else:
                assert_identical((a,), (e,))

