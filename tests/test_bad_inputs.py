"""Bad input to every public function and module of spikeops: a table of cases, each run on every
backend (tests/harness.py KERNEL_BACKENDS, plus the "torch" reference).

Every case ends in one of:

* ``Raises(TypeError | ValueError, regex)``: the message must name the argument;
* ``Same``: the case returns (actual, expected), which must be equal (NaN where NaN): e.g. a
  non-contiguous or channels-last input against the contiguous one, or a kernel against the
  reference on NaN/Inf input;
* ``Check(fn)``: ``fn(result)`` asserts what the documented behaviour is.

Cases marked ``isolated`` run in a child process (``python -c`` with a timeout): a segfault,
abort or hang there fails that case instead of killing the test run. They are the ones that
once corrupted memory, read past a buffer, or would allocate gigabytes if their guard broke.

Sizes above 2^31 elements are tested without the memory: stride-0 ``expand`` views for ops
that check shapes before touching data (spike_matmul), and ``FakeTensorMode`` for the others
(the whole Python path - validation, views, dispatch to the op's fake kernel - with no storage).
The C++ kernels index in int64 throughout and the Triton kernels from int64 program ids
(``ssa`` and the masked ops number pixels / in-head offsets in int32 and refuse larger
inputs, see below); running the kernels themselves at that size would need > 16 GB, so that
part is documented, not run.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch import nn

import spikeops
import spikeops.nn as snn
from spikeops import reference
from spikeops.models import create_model
from spikeops.ops.batch_norm_lif import batch_norm_lif
from harness import KERNEL_BACKENDS, device_for

BACKENDS = KERNEL_BACKENDS + ("torch",)
NAN, INF = math.nan, math.inf
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


# ---- what a case expects --------------------------------------------------------------------


@dataclass(frozen=True)
class Raises:
    exc: type
    match: str


@dataclass(frozen=True)
class Check:
    fn: Callable


SAME = "same"  # bit for bit (NaN where NaN)
CLOSE = "close"  # spikes bit for bit, gradients to 1e-5 of their scale (NaN where NaN): different kernels


@dataclass(frozen=True)
class Case:
    name: str
    run: Callable  # run(backend) -> result
    expect: object  # Raises | Check | SAME, or a function backend -> one of them
    isolated: bool = False


def assert_same(actual, expected, rtol=0.0):
    if isinstance(expected, (tuple, list)):
        assert isinstance(actual, (tuple, list)) and len(actual) == len(expected)
        for a, e in zip(actual, expected):
            assert_same(a, e, rtol)
    elif expected is None:
        assert actual is None
    else:
        assert actual.shape == expected.shape and actual.dtype == expected.dtype, (actual.shape, expected.shape)
        actual, expected = actual.cpu(), expected.cpu()
        finite = expected[torch.isfinite(expected)] if expected.is_floating_point() else expected
        scale = finite.abs().max().item() if finite.numel() else 1.0
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * (scale or 1.0), equal_nan=True)


def evaluate(case: Case, backend: str) -> None:
    expect = case.expect(backend) if callable(case.expect) and not isinstance(case.expect, (Raises, Check)) \
        else case.expect
    if isinstance(expect, Raises):
        with pytest.raises(expect.exc, match=expect.match):
            case.run(backend)
    elif isinstance(expect, Check):
        expect.fn(case.run(backend))
    else:
        assert expect in (SAME, CLOSE)
        actual, expected = case.run(backend)
        assert_same(actual, expected, 0.0 if expect == SAME else 1e-5)


# ---- inputs -----------------------------------------------------------------------------------


def dev(be):
    return device_for(be)


def spikes(*shape, be="cpp", seed=0, p=0.4, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) < p).to(dtype).to(dev(be))


def currents(*shape, be="cpp", seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 1.5 + 0.7).to(dtype).to(dev(be))


def grad_pair(fn, x, seed=1):
    """(output, dL/dx) of fn on a fresh leaf copy of x, for a fixed random upstream gradient."""
    leaf = x.detach().clone().requires_grad_(True)
    out = fn(leaf)
    g = torch.Generator().manual_seed(seed)
    out.backward(torch.randn(out.shape, generator=g).to(out.device, out.dtype))
    return out.detach(), leaf.grad


def qkv(be, shape=(2, 2, 2, 5, 4)):
    return [spikes(*shape, be=be, seed=s) for s in range(3)]


def mask(be, shape=(2, 1, 4, 4), seed=3):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(shape, generator=g) < 0.5
    m.view(-1)[0] = True
    return m.to(dev(be))


def conv_inputs(be):
    return currents(4, 3, 8, 8, be=be), currents(5, 3, 3, 3, be=be, seed=1)


def stats(be, C=3):
    return torch.zeros(C, device=dev(be)), torch.ones(C, device=dev(be))


def strided(x):
    """x's values in a non-contiguous tensor (every other element of a twice-as-long last dim)."""
    wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
    wide[..., ::2] = x
    out = wide[..., ::2]
    assert not out.is_contiguous()
    return out


def ref_backend(be):
    """The reference for a case run on backend ``be`` (the same reference everywhere)."""
    return "torch"


def seeded(cls, *args, **kwargs):
    torch.manual_seed(0)
    return cls(*args, **kwargs)


def module(cls, *args, be, **kwargs):
    torch.manual_seed(0)
    return cls(*args, backend=be, **kwargs).to(dev(be))


# ---- NaN / Inf --------------------------------------------------------------------------------


def lif_non_finite(be):
    # NaN: never fires, the state stays NaN. +Inf: fires, and the hard reset 1*r + 0*Inf is NaN
    # (as in the reference and SpikingJelly), so the neuron goes silent. -Inf: never fires, next
    # step -Inf + Inf = NaN. Gradients through a non-finite state are NaN. The C++/Triton kernels
    # give exactly the reference's spikes and NaN pattern.
    x = torch.tensor([[NAN, INF, -INF, 1.5, INF, 0.0], [0.0, 0.0, 0.0, 0.0, 5.0, INF], [3.0] * 6]).to(dev(be))
    out = []
    for backend in (be, "torch"):
        for v_reset in (0.0, None):
            o, g = grad_pair(lambda t: spikeops.lif(t, v_reset=v_reset, backend=backend), x)
            out.append((o, g))
    return out[:2], out[2:]


def lif_non_finite_documented(result):
    (hard, _), _ = result
    spikes_, grad = hard
    assert spikes_[:, 3].tolist() == [0.0, 0.0, 1.0]  # a finite neuron is untouched by its neighbours
    assert spikes_[0, 1] == 1 and spikes_[2, 1] == 0  # fired on +Inf, then silent (NaN state)
    assert spikes_[:, 0].sum() == 0 and torch.isnan(grad[:, 0]).all()
    assert torch.isfinite(grad[:, 3]).all()


def masked_conv_nan(be):
    x, w = conv_inputs(be)
    x[0, 0, 0, 0] = NAN
    x[1, 1, 2, 2] = INF
    m = mask(be)
    out = spikeops.masked_conv2d(x, w, m, padding=1, backend=be)
    up = reference.upsample_mask(m, 4, (8, 8)).expand_as(out)
    return out, up


def masked_positions_exactly_zero(result):
    out, up = result
    assert (out[~up] == 0).all()  # masked outputs are 0 even where the receptive field holds NaN/Inf
    assert torch.isnan(out[up]).any()  # visible NaNs propagate as in conv2d


def energy_of_nan_input(be):
    lin = nn.Linear(4, 3)
    return spikeops.energy.profile(lin, torch.tensor([[NAN, 1.0, 0.0, 1.0]]))


def nan_counts_as_real(report):
    (row,) = report.rows
    assert row.op == "MAC" and row.sops == 0 and row.flops_mac == 12


# ---- modules and models ---------------------------------------------------------------------


def module_same_on_strided(make, x):
    """Output and input gradient of a module on a non-contiguous view equal those on x."""
    outs = []
    for inp in (x, strided(x)):
        m = make()
        outs.append(grad_pair(m, inp))
    return outs[1], outs[0]


def model_forward(be, x_fn):
    torch.manual_seed(0)
    m = create_model("spikformer_cifar_4_384", dim=16, depth=1, num_heads=2, T=2, backend=be).to(dev(be))
    return m(x_fn(be))


def in_masking(m, layer, x):
    with spikeops.masking(m):
        return layer(x)


def kernel_rejects_f64(be, name="x_seq"):
    if be == "torch":
        return Check(lambda out: None)
    return Raises(TypeError, f"backend='{be}' has kernels for float32.*use backend='torch'")


def auto_f64_is_reference(fn, make):
    def run(be):
        args = make(be)
        return fn(*args, backend="auto"), fn(*args, backend="torch")
    return run


# ---- the table --------------------------------------------------------------------------------

CASES = [
    # spikeops.lif / nn.LIF
    Case("lif_int", lambda be: spikeops.lif(torch.ones(3, 4, dtype=torch.int64, device=dev(be)), backend=be),
         Raises(TypeError, "x_seq must be a floating tensor")),
    Case("lif_bool", lambda be: spikeops.lif(torch.ones(3, 4, dtype=torch.bool, device=dev(be)), backend=be),
         Raises(TypeError, "x_seq must be a floating tensor")),
    Case("lif_complex", lambda be: spikeops.lif(torch.ones(3, 4, dtype=torch.complex64, device=dev(be)), backend=be),
         Raises(TypeError, "x_seq must be a floating tensor")),
    Case("lif_float64_forced", lambda be: spikeops.lif(currents(3, 4, be=be, dtype=torch.float64), backend=be),
         kernel_rejects_f64),
    Case("lif_float64_auto_is_reference",
         auto_f64_is_reference(spikeops.lif, lambda be: [currents(3, 5, be=be, dtype=torch.float64)]), SAME),
    Case("lif_0d", lambda be: spikeops.lif(torch.tensor(1.0, device=dev(be)), backend=be),
         Raises(ValueError, "x_seq must have a leading time dimension")),
    Case("lif_T0", lambda be: spikeops.lif(torch.zeros(0, 4, device=dev(be)), backend=be),
         Raises(ValueError, "x_seq has T=0")),
    Case("lif_zero_size_dim", lambda be: spikeops.lif(torch.zeros(3, 4, 0, device=dev(be)), backend=be),
         Raises(ValueError, "x_seq is empty")),
    Case("lif_tau_one", lambda be: spikeops.lif(currents(3, 4, be=be), tau=1.0, backend=be),
         Raises(ValueError, "tau must be > 1")),
    Case("lif_negative_alpha", lambda be: spikeops.lif(currents(3, 4, be=be), alpha=-4.0, backend=be),
         Raises(ValueError, "alpha must be > 0")),
    Case("lif_inf_threshold", lambda be: spikeops.lif(currents(3, 4, be=be), v_threshold=INF, backend=be),
         Raises(ValueError, "v_threshold must be finite")),
    Case("lif_bad_state_dtype", lambda be: spikeops.lif(currents(3, 4, be=be), state_dtype=torch.float16, backend=be),
         Raises(ValueError, "state_dtype must be")),
    Case("lif_non_contiguous",
         lambda be: (grad_pair(lambda t: spikeops.lif(t, backend=be), strided(currents(4, 3, 10, be=be))),
                     grad_pair(lambda t: spikeops.lif(t, backend=be), currents(4, 3, 10, be=be))), SAME),
    Case("lif_channels_last",
         lambda be: (grad_pair(lambda t: spikeops.lif(t, backend=be),
                               currents(4, 3, 5, 6, be=be).contiguous(memory_format=torch.channels_last)),
                     grad_pair(lambda t: spikeops.lif(t, backend=be), currents(4, 3, 5, 6, be=be))), SAME),
    Case("lif_nan_inf_equals_reference", lif_non_finite, CLOSE, isolated=True),
    Case("lif_nan_inf_documented", lif_non_finite, Check(lif_non_finite_documented)),
    Case("nn_lif_tau", lambda be: snn.LIF(tau=0.5, backend=be), Raises(ValueError, "tau must be > 1")),
    Case("nn_lif_surrogate", lambda be: snn.LIF(surrogate="relu", backend=be), Raises(ValueError, "surrogate must be")),
    Case("nn_lif_int_input", lambda be: snn.LIF(backend=be)(torch.ones(2, 3, dtype=torch.int32, device=dev(be))),
         Raises(TypeError, "x_seq must be a floating tensor")),

    # pack_spikes / unpack_spikes / pack_if_binary
    Case("pack_int", lambda be: spikeops.pack_spikes(torch.ones(3, 4, dtype=torch.int32, device=dev(be)), backend=be),
         Raises(TypeError, "x must be a floating tensor")),
    Case("pack_bool", lambda be: spikeops.pack_spikes(torch.ones(3, 4, dtype=torch.bool, device=dev(be)), backend=be),
         Raises(TypeError, "x must be a floating tensor")),
    Case("pack_non_binary", lambda be: spikeops.pack_spikes(spikes(3, 70, be=be) * 2, backend=be),
         Raises(ValueError, "x must hold only 0 and 1")),
    Case("pack_nan", lambda be: spikeops.pack_spikes(torch.tensor([1.0, NAN, 0.0], device=dev(be)), backend=be),
         Raises(ValueError, "x must hold only 0 and 1")),
    Case("pack_if_binary_half", lambda be: spikeops.pack_if_binary(spikes(3, 70, be=be) * 0.5, backend=be),
         Check(lambda r: r is None or pytest.fail("0.5 is not a spike"))),
    Case("pack_0d", lambda be: spikeops.pack_spikes(torch.tensor(1.0, device=dev(be)), backend=be),
         Raises(ValueError, "x must have at least one dimension")),
    Case("pack_empty", lambda be: spikeops.pack_spikes(torch.zeros(3, 0, device=dev(be)), backend=be),
         Raises(ValueError, "x is empty")),
    Case("pack_bad_dim", lambda be: spikeops.pack_spikes(spikes(3, 4, be=be), dim=2, backend=be),
         Raises(ValueError, "dim must be in")),
    Case("pack_non_contiguous",
         lambda be: (spikeops.pack_spikes(strided(spikes(3, 5, 70, be=be)), dim=1, backend=be).words,
                     spikeops.pack_spikes(spikes(3, 5, 70, be=be), dim=1, backend=be).words), SAME),
    Case("pack_channels_last_round_trip",
         lambda be: (spikeops.unpack_spikes(spikeops.pack_spikes(
             spikes(2, 67, 3, 3, be=be).contiguous(memory_format=torch.channels_last), dim=1, backend=be), backend=be),
             spikes(2, 67, 3, 3, be=be)), SAME),
    Case("unpack_not_packed", lambda be: spikeops.unpack_spikes(spikes(3, 4, be=be), backend=be),
         Raises(TypeError, "packed must be the PackedSpikes")),
    Case("unpack_int_dtype",
         lambda be: spikeops.unpack_spikes(spikeops.pack_spikes(spikes(3, 70, be=be)), dtype=torch.int32, backend=be),
         Raises(TypeError, "dtype must be a floating dtype")),
    Case("unpack_str_dtype",
         lambda be: spikeops.unpack_spikes(spikeops.pack_spikes(spikes(3, 70, be=be)), dtype="float32", backend=be),
         Raises(TypeError, "dtype must be a floating dtype")),
    # the Triton kernel used to leave columns 64..69 unwritten (garbage) for these words
    Case("unpack_words_too_short",
         lambda be: spikeops.unpack_spikes((lambda p: p._replace(words=p.words[:, :1]))(
             spikeops.pack_spikes(spikes(3, 70, be=be))), backend=be),
         Raises(ValueError, "packed.words has shape"), isolated=True),
    Case("unpack_float_words",
         lambda be: spikeops.unpack_spikes((lambda p: p._replace(words=p.words.float()))(
             spikeops.pack_spikes(spikes(3, 70, be=be))), backend=be),
         Raises(TypeError, "packed.words must be an int64 tensor")),

    # spike_matmul
    Case("matmul_int", lambda be: spikeops.spike_matmul(torch.ones(2, 3, dtype=torch.int32, device=dev(be)),
                                                        spikes(3, 2, be=be), backend=be),
         Raises(TypeError, "a must be a floating tensor")),
    Case("matmul_dtype_mismatch", lambda be: spikeops.spike_matmul(spikes(2, 3, be=be), spikes(3, 2, be=be).half(),
                                                                   backend=be),
         Raises(ValueError, "a and b must share device and dtype")),
    Case("matmul_device_mismatch", lambda be: spikeops.spike_matmul(spikes(2, 3, be=be), torch.ones(3, 2, device="meta"),
                                                                    backend=be),
         Raises(ValueError, "a and b must share device and dtype")),
    Case("matmul_1d", lambda be: spikeops.spike_matmul(spikes(3, be=be), spikes(3, 2, be=be), backend=be),
         Raises(ValueError, "a and b must be at least 2-d")),
    Case("matmul_k_mismatch", lambda be: spikeops.spike_matmul(spikes(2, 3, be=be), spikes(4, 2, be=be), backend=be),
         Raises(ValueError, r"a's last dim \(K=3\)")),
    Case("matmul_batch_mismatch", lambda be: spikeops.spike_matmul(spikes(2, 2, 3, be=be), spikes(3, 3, 2, be=be),
                                                                   backend=be),
         Raises(ValueError, "batch dims of a")),
    Case("matmul_empty", lambda be: spikeops.spike_matmul(spikes(0, 3, be=be), spikes(3, 2, be=be), backend=be),
         Raises(ValueError, "must be non-empty")),
    Case("matmul_non_binary", lambda be: spikeops.spike_matmul(spikes(2, 70, be=be), spikes(70, 2, be=be) * 3,
                                                               backend=be),
         Raises(ValueError, "b must hold only 0 and 1")),
    Case("matmul_nan", lambda be: spikeops.spike_matmul(spikes(2, 3, be=be) * NAN, spikes(3, 2, be=be), backend=be),
         Raises(ValueError, "a must hold only 0 and 1")),
    Case("matmul_bad_out_dtype", lambda be: spikeops.spike_matmul(spikes(2, 3, be=be), spikes(3, 2, be=be),
                                                                  out_dtype=torch.bool, backend=be),
         Raises(TypeError, "out_dtype must be one of")),
    Case("matmul_non_contiguous",
         lambda be: (spikeops.spike_matmul(spikes(2, 70, 5, be=be).transpose(-1, -2), strided(spikes(70, 3, be=be)),
                                           backend=be),
                     reference.spike_matmul(spikes(2, 70, 5, be=be).transpose(-1, -2), spikes(70, 3, be=be))), SAME),

    # ssa
    Case("ssa_int", lambda be: spikeops.ssa(*[x.int() for x in qkv(be)], backend=be),
         Raises(TypeError, "q must be a floating tensor")),
    Case("ssa_4d", lambda be: spikeops.ssa(*[x[0] for x in qkv(be)], backend=be),
         Raises(ValueError, r"q must be \[T, B, H, N, d\]")),
    Case("ssa_T0", lambda be: spikeops.ssa(*[x[:0] for x in qkv(be)], backend=be), Raises(ValueError, "q has T=0")),
    Case("ssa_empty_tokens", lambda be: spikeops.ssa(*[x[:, :, :, :0] for x in qkv(be)], backend=be),
         Raises(ValueError, "q is empty")),
    Case("ssa_shape_mismatch", lambda be: spikeops.ssa(*(lambda q, k, v: (q, k[..., :3], v))(*qkv(be)), backend=be),
         Raises(ValueError, "k must have q's shape")),
    Case("ssa_dtype_mismatch", lambda be: spikeops.ssa(*(lambda q, k, v: (q, k, v.half()))(*qkv(be)), backend=be),
         Raises(ValueError, "v must share q's dtype and device")),
    Case("ssa_device_mismatch", lambda be: spikeops.ssa(*(lambda q, k, v: (q, k.to("meta"), v))(*qkv(be)), backend=be),
         Raises(ValueError, "k must share q's dtype and device")),
    Case("ssa_non_binary_v", lambda be: spikeops.ssa(*(lambda q, k, v: (q, k, v * 2))(*qkv(be)), backend=be),
         Raises(ValueError, "v must hold only 0 and 1")),
    Case("ssa_nan_q", lambda be: spikeops.ssa(*(lambda q, k, v: (q * NAN, k, v))(*qkv(be)), backend=be),
         Raises(ValueError, "q must hold only 0 and 1")),
    Case("ssa_tau", lambda be: spikeops.ssa(*qkv(be), tau=1.0, backend=be), Raises(ValueError, "tau must be > 1")),
    Case("ssa_inf_scale", lambda be: spikeops.ssa(*qkv(be), scale=INF, backend=be),
         Raises(ValueError, "scale must be finite")),
    Case("ssa_float64_forced", lambda be: spikeops.ssa(*[x.double() for x in qkv(be)], backend=be), kernel_rejects_f64),
    Case("ssa_non_contiguous",
         lambda be: (spikeops.ssa(*[x.transpose(-1, -2).contiguous().transpose(-1, -2) for x in qkv(be)], backend=be),
                     spikeops.ssa(*qkv(be), backend=be)), SAME),

    # token_attention
    Case("ta_int_k", lambda be: spikeops.token_attention(qkv(be)[0], qkv(be)[1].long(), backend=be),
         Raises(TypeError, "k must be a floating tensor")),
    Case("ta_non_binary_p", lambda be: spikeops.token_attention(*(lambda q, k, p: (q, k, p * 2))(*qkv(be)), backend=be),
         Raises(ValueError, "p must hold only 0 and 1")),
    Case("ta_p_shape", lambda be: spikeops.token_attention(*(lambda q, k, p: (q, k, p[..., :3]))(*qkv(be)), backend=be),
         Raises(ValueError, "p must have q's shape")),
    Case("ta_mode", lambda be: spikeops.token_attention(*qkv(be)[:2], mode="head", backend=be),
         Raises(ValueError, "mode must be one of")),
    Case("ta_nan_threshold", lambda be: spikeops.token_attention(*qkv(be)[:2], v_threshold=NAN, backend=be),
         Raises(ValueError, "v_threshold must be finite")),
    Case("ta_channel_mode_non_contiguous",
         lambda be: (spikeops.token_attention(*[strided(x) for x in qkv(be)], mode="channel", backend=be),
                     spikeops.token_attention(*qkv(be), mode="channel", backend="torch")), SAME),

    # masked_conv2d
    Case("mconv_int_x", lambda be: spikeops.masked_conv2d(conv_inputs(be)[0].int(), conv_inputs(be)[1], mask(be),
                                                          backend=be),
         Raises(TypeError, "x must be a floating tensor")),
    Case("mconv_complex_weight", lambda be: spikeops.masked_conv2d(conv_inputs(be)[0], conv_inputs(be)[1].cfloat(),
                                                                   mask(be), backend=be),
         Raises(TypeError, "weight must be a floating tensor")),
    Case("mconv_3d_x", lambda be: spikeops.masked_conv2d(conv_inputs(be)[0][0], conv_inputs(be)[1], mask(be),
                                                         backend=be),
         Raises(ValueError, r"x must be a non-empty \[N, C, H, W\]")),
    Case("mconv_zero_batch", lambda be: spikeops.masked_conv2d(conv_inputs(be)[0][:0], conv_inputs(be)[1], mask(be),
                                                               backend=be),
         Raises(ValueError, r"x must be a non-empty \[N, C, H, W\]")),
    Case("mconv_mask_two_channels", lambda be: spikeops.masked_conv2d(*conv_inputs(be), mask(be, (2, 2, 4, 4)),
                                                                      padding=1, backend=be),
         Raises(ValueError, r"mask must be \[N, 1, h, w\]")),
    Case("mconv_mask_batch", lambda be: spikeops.masked_conv2d(*conv_inputs(be), mask(be, (3, 1, 4, 4)), padding=1,
                                                               backend=be),
         Raises(ValueError, "mask has batch 3")),
    Case("mconv_mask_size", lambda be: spikeops.masked_conv2d(*conv_inputs(be), mask(be, (2, 1, 3, 3)), padding=1,
                                                              backend=be),
         Raises(ValueError, "mask's spatial size")),
    Case("mconv_mask_values", lambda be: spikeops.masked_conv2d(*conv_inputs(be), mask(be).float() * 2, padding=1,
                                                                backend=be),
         Raises(ValueError, "mask must be bool or hold only 0 and 1")),
    Case("mconv_mask_device", lambda be: spikeops.masked_conv2d(*conv_inputs(be), mask(be).to("meta"), padding=1,
                                                                backend=be),
         Raises(ValueError, "mask must be on x's device")),
    Case("mconv_weight_dtype", lambda be: spikeops.masked_conv2d(conv_inputs(be)[0], conv_inputs(be)[1].half(),
                                                                 mask(be), padding=1, backend=be),
         Raises(ValueError, "weight must share x's dtype and device")),
    Case("mconv_bias_shape", lambda be: spikeops.masked_conv2d(*conv_inputs(be), mask(be), padding=1,
                                                               bias=torch.zeros(4, device=dev(be)), backend=be),
         Raises(ValueError, r"bias must be \[C_out=5\]")),
    Case("mconv_stride_zero", lambda be: spikeops.masked_conv2d(*conv_inputs(be), mask(be), stride=0, backend=be),
         Raises(ValueError, "stride must be an int >= 1")),
    Case("mconv_groups", lambda be: spikeops.masked_conv2d(*conv_inputs(be), mask(be), padding=1, groups=3, backend=be),
         Raises(ValueError, "groups must be 1")),
    Case("mconv_channels_last",
         lambda be: (grad_pair(lambda t: spikeops.masked_conv2d(t, conv_inputs(be)[1], mask(be), padding=1, backend=be),
                               conv_inputs(be)[0].contiguous(memory_format=torch.channels_last)),
                     grad_pair(lambda t: spikeops.masked_conv2d(t, conv_inputs(be)[1], mask(be), padding=1, backend=be),
                               conv_inputs(be)[0])),
         lambda be: SAME if be != "torch" else CLOSE),  # the reference: torch's dense conv picks another algorithm
    Case("mconv_nan_masked_exactly_zero", masked_conv_nan, Check(masked_positions_exactly_zero)),

    # masked_batch_norm2d
    Case("mbn_weight_half", lambda be: spikeops.masked_batch_norm2d(
        conv_inputs(be)[0], mask(be), *stats(be), weight=torch.ones(3, device=dev(be)).half(), backend=be),
         Raises(ValueError, "weight must be torch.float32")),
    Case("mbn_running_mean_shape", lambda be: spikeops.masked_batch_norm2d(
        conv_inputs(be)[0], mask(be), torch.zeros(4, device=dev(be)), stats(be)[1], backend=be),
         Raises(ValueError, r"running_mean must be \[C=3\]")),
    Case("mbn_eval_without_stats", lambda be: spikeops.masked_batch_norm2d(conv_inputs(be)[0], mask(be), backend=be),
         Raises(ValueError, "running_mean and running_var are needed")),
    Case("mbn_momentum", lambda be: spikeops.masked_batch_norm2d(conv_inputs(be)[0], mask(be), *stats(be),
                                                                 training=True, momentum=-0.1, backend=be),
         Raises(ValueError, "momentum must be a number in")),
    Case("mbn_eps", lambda be: spikeops.masked_batch_norm2d(conv_inputs(be)[0], mask(be), *stats(be), eps=0.0,
                                                            backend=be),
         Raises(ValueError, "eps must be a finite number > 0")),
    Case("mbn_one_visible", lambda be: spikeops.masked_batch_norm2d(
        currents(1, 3, 1, 1, be=be), torch.ones(1, 1, 1, 1, dtype=torch.bool, device=dev(be)), training=True,
        backend=be), Raises(ValueError, "more than 1 (visible position|value per channel)")),
    Case("mbn_mask_rank", lambda be: spikeops.masked_batch_norm2d(conv_inputs(be)[0], mask(be)[None], *stats(be),
                                                                  backend=be),
         Raises(ValueError, r"mask must be \[N, 1, h, w\]")),
    Case("mbn_channels_last",
         lambda be: (spikeops.masked_batch_norm2d(conv_inputs(be)[0].contiguous(memory_format=torch.channels_last),
                                                  mask(be), training=True, backend=be),
                     spikeops.masked_batch_norm2d(conv_inputs(be)[0], mask(be), training=True, backend=be)), SAME),

    # batch_norm_lif
    # aten's batch-norm kernel does not check the weight's size: this case used to corrupt the heap
    Case("bnlif_channel_mismatch", lambda be: batch_norm_lif(currents(8, 4, 3, 3, be=be).requires_grad_(),
                                                             nn.BatchNorm2d(3).to(dev(be)), snn.LIF(backend=be), 2),
         Raises(ValueError, "y has C=4 channels.*num_features=3"), isolated=True),
    Case("bnlif_T_float", lambda be: batch_norm_lif(currents(8, 3, be=be), nn.BatchNorm1d(3).to(dev(be)),
                                                    snn.LIF(backend=be), 2.0),
         Raises(TypeError, "T must be an int")),
    Case("bnlif_T_not_dividing", lambda be: batch_norm_lif(currents(8, 3, be=be), nn.BatchNorm1d(3).to(dev(be)),
                                                           snn.LIF(backend=be), 3),
         Raises(ValueError, "T=3 dividing")),
    Case("bnlif_int_y", lambda be: batch_norm_lif(torch.ones(8, 3, dtype=torch.int32, device=dev(be)),
                                                  nn.BatchNorm1d(3).to(dev(be)), snn.LIF(backend=be), 2),
         Raises(TypeError, "y must be a floating tensor")),
    Case("bnlif_empty", lambda be: batch_norm_lif(torch.zeros(8, 3, 0, device=dev(be), requires_grad=True),
                                                  nn.BatchNorm1d(3).to(dev(be)), snn.LIF(backend=be), 2),
         Raises(ValueError, "y is empty")),
    Case("bnlif_channels_last",
         lambda be: tuple(grad_pair(lambda t: batch_norm_lif(t, nn.BatchNorm2d(3).to(dev(be)), snn.LIF(backend=be), 2),
                                    y) for y in (currents(4, 3, 5, 5, be=be).contiguous(memory_format=torch.channels_last),
                                                 currents(4, 3, 5, 5, be=be))), CLOSE),  # fused vs unfused backward

    # attention modules
    Case("ssa_module_heads", lambda be: snn.SpikingSelfAttention(8, 3, backend=be),
         Raises(ValueError, r"num_heads \(3\) must be a positive divisor")),
    Case("ssa_module_scale", lambda be: snn.SpikingSelfAttention(8, 2, scale=NAN, backend=be),
         Raises(ValueError, "scale must be finite")),
    Case("ssa_module_threshold", lambda be: snn.SpikingSelfAttention(8, 2, attn_v_threshold=INF, backend=be),
         Raises(ValueError, "attn_v_threshold must be finite")),
    Case("ssa_module_int_input", lambda be: module(snn.SpikingSelfAttention, 8, 2, be=be)(
        spikes(2, 2, 5, 8, be=be).int()), Raises(TypeError, "x must be a floating tensor")),
    Case("ssa_module_channels", lambda be: module(snn.SpikingSelfAttention, 8, 2, be=be)(spikes(2, 2, 5, 4, be=be)),
         Raises(ValueError, "x has 4 channels, expected dim=8")),
    Case("ssa_module_T0", lambda be: module(snn.SpikingSelfAttention, 8, 2, be=be)(spikes(0, 2, 5, 8, be=be)),
         Raises(ValueError, "x has T=0")),
    Case("ssa_module_non_contiguous",
         lambda be: module_same_on_strided(lambda: module(snn.SpikingSelfAttention, 8, 2, be=be),
                                           spikes(2, 2, 5, 8, be=be)), SAME),
    Case("mlp_hidden_zero", lambda be: snn.SpikingMLP(8, 0, backend=be), Raises(ValueError, "hidden_features must be")),
    Case("mlp_channels", lambda be: module(snn.SpikingMLP, 8, 16, be=be)(spikes(2, 2, 5, 4, be=be)),
         Raises(ValueError, r"x must be \[T, B, N, C=8\]")),
    Case("mlp_empty_tokens", lambda be: module(snn.SpikingMLP, 8, 16, be=be)(spikes(2, 2, 0, 8, be=be)),
         Raises(ValueError, "x is empty")),
    Case("qk_module_int_input", lambda be: module(snn.QKTokenAttention, 8, 2, be=be)(spikes(2, 2, 8, 5, be=be).long()),
         Raises(TypeError, "x must be a floating tensor")),
    Case("qk_module_no_tokens", lambda be: module(snn.QKTokenAttention, 8, 2, be=be)(spikes(2, 2, 8, 0, be=be)),
         Raises(ValueError, "x is empty")),
    Case("qk_module_tau", lambda be: snn.QKTokenAttention(8, 2, tau=1.0, backend=be), Raises(ValueError, "tau")),
    Case("mssa_even_kernel", lambda be: snn.MultiScaleSpikingAttention(8, 2, p_kernel_size=2, backend=be),
         Raises(ValueError, "p_kernel_size must be a positive odd number")),
    Case("mssa_float_kernel", lambda be: snn.MultiScaleSpikingAttention(8, 2, p_kernel_size=3.0, backend=be),
         Raises(ValueError, "p_kernel_size must be a positive odd number")),
    Case("mssa_non_contiguous",
         lambda be: module_same_on_strided(lambda: module(snn.MultiScaleSpikingAttention, 8, 2, be=be),
                                           spikes(2, 2, 8, 6, be=be)), SAME),

    # spike layers
    Case("spike_linear_int", lambda be: snn.SpikeLinear(8, 4).to(dev(be))(spikes(2, 3, 8, be=be).int()),
         Raises(TypeError, "SpikeLinear: input must be a floating tensor")),
    Case("spike_linear_features", lambda be: snn.SpikeLinear(8, 4).to(dev(be))(spikes(2, 3, 5, be=be)),
         Raises(ValueError, "SpikeLinear: input must have in_features=8")),
    Case("spike_conv1d_rank", lambda be: snn.SpikeConv1d(8, 4, 1).to(dev(be))(spikes(2, 2, 8, 5, be=be)),
         Raises(ValueError, "SpikeConv1d: input must be 2-d")),
    Case("spike_conv2d_channels", lambda be: snn.SpikeConv2d(8, 4, 3).to(dev(be))(spikes(2, 3, 5, 5, be=be)),
         Raises(ValueError, "SpikeConv2d: input must have in_channels=8")),
    Case("spike_conv2d_channels_last",
         lambda be: tuple(grad_pair(seeded(snn.SpikeConv2d, 4, 6, 3, padding=1).to(dev(be)), x) for x in (
             spikes(2, 4, 5, 5, be=be).contiguous(memory_format=torch.channels_last), spikes(2, 4, 5, 5, be=be))),
         CLOSE),  # oneDNN's channels-last convolution sums in another order, as for nn.Conv2d
    Case("spike_maxpool_rank", lambda be: snn.SpikeMaxPool2d(2)(spikes(2, 2, 3, 4, 4, be=be).requires_grad_()),
         Raises(ValueError, "SpikeMaxPool2d: input must be 3-d")),
    Case("spike_maxpool_return_indices", lambda be: snn.SpikeMaxPool2d(2, return_indices=True),
         Raises(ValueError, "return_indices")),
    Case("spike_maxpool_channels_last",
         lambda be: tuple(grad_pair(snn.SpikeMaxPool2d(3, 2, 1), x) for x in (
             spikes(2, 4, 7, 7, be=be).contiguous(memory_format=torch.channels_last), spikes(2, 4, 7, 7, be=be))), SAME),

    # masked modules
    Case("masked_conv_groups", lambda be: snn.MaskedConv2d(4, 4, 3, groups=2, backend=be),
         Raises(ValueError, "MaskedConv2d: masked convolution supports groups=1")),
    Case("masked_conv_mask_size", lambda be: in_masking(mask(be, (2, 1, 3, 3)),
                                                        snn.MaskedConv2d(3, 4, 3, padding=1, backend=be).to(dev(be)),
                                                        conv_inputs(be)[0]),
         Raises(ValueError, "mask's spatial size")),
    Case("masked_conv_rank", lambda be: in_masking(mask(be), snn.MaskedConv2d(3, 4, 3, padding=1, backend=be).to(dev(be)),
                                                   conv_inputs(be)[0][None, None]),
         Raises(ValueError, r"MaskedConv2d: x must be \[N, C, H, W\] or \[T, B, C, H, W\]")),
    Case("masked_bn_mask_batch", lambda be: in_masking(mask(be, (3, 1, 4, 4)), snn.MaskedBatchNorm2d(3, backend=be).to(
        dev(be)), conv_inputs(be)[0]), Raises(ValueError, "mask has batch 3")),
    Case("masking_non_binary", lambda be: spikeops.masking(torch.full((2, 1, 2, 2), 2.0)).__enter__(),
         Raises(ValueError, "mask must be bool or hold only 0 and 1")),

    # energy.profile
    Case("energy_model", lambda be: spikeops.energy.profile("model", torch.ones(2)),
         Raises(TypeError, "model must be a torch.nn.Module")),
    Case("energy_x", lambda be: spikeops.energy.profile(nn.Linear(2, 2), [1.0, 2.0]),
         Raises(TypeError, "x must be a torch.Tensor")),
    Case("energy_negative_e_mac", lambda be: spikeops.energy.profile(nn.Linear(2, 2), torch.ones(2), e_mac=-1e-12),
         Raises(ValueError, "e_mac must be a finite energy")),
    Case("energy_nan_e_ac", lambda be: spikeops.energy.profile(nn.Linear(2, 2), torch.ones(2), e_ac=NAN),
         Raises(ValueError, "e_ac must be a finite energy")),
    Case("energy_max_count", lambda be: spikeops.energy.profile(nn.Linear(2, 2), torch.ones(2), max_count=True),
         Raises(ValueError, "max_count must be an integer")),
    Case("energy_nothing_to_count", lambda be: spikeops.energy.profile(nn.ReLU(), torch.ones(2)),
         Raises(ValueError, "has no nn.Conv1d")),
    Case("energy_nan_input", energy_of_nan_input, Check(nan_counts_as_real)),

    # models
    Case("model_unknown", lambda be: create_model("spikformer_xl"), Raises(ValueError, "unknown model 'spikformer_xl'")),
    Case("model_bad_override", lambda be: create_model("spikformer_cifar_4_384", depht=1),
         Raises(TypeError, "depht")),
    Case("model_heads", lambda be: create_model("spikformer_cifar_4_384", dim=32, num_heads=3),
         Raises(ValueError, "num_heads=3")),
    Case("model_img_size", lambda be: create_model("spikformer_cifar_4_384", img_size=30),
         Raises(ValueError, "img_size=30")),
    Case("model_input_channels", lambda be: model_forward(be, lambda b: currents(1, 1, 32, 32, be=b)),
         Raises(ValueError, "x has 1 channels")),
    Case("model_input_rank", lambda be: model_forward(be, lambda b: currents(3, 32, 32, be=b)),
         Raises(ValueError, r"x must be \[B, C, H, W\] images")),
    Case("model_input_size", lambda be: model_forward(be, lambda b: currents(1, 3, 30, 30, be=b)),
         Raises(ValueError, "image size")),
]

CASES_BY_NAME = {c.name: c for c in CASES}
assert len(CASES_BY_NAME) == len(CASES), "case names must be unique"


def run_isolated(name: str, backend: str, timeout: float = 240) -> None:
    """Run a case in a child interpreter: a crash (signal, abort) or hang fails the case."""
    code = ("import sys; sys.path.insert(0, %r); import test_bad_inputs as t; t.evaluate(t.CASES_BY_NAME[%r], %r); "
            "print('CASE-PASSED')" % (TESTS_DIR, name, backend))
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("TRITON_INTERPRET", "1")
    try:
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout,
                              cwd=TESTS_DIR)
    except subprocess.TimeoutExpired:
        pytest.fail(f"case {name} on {backend} did not finish in {timeout} s (hang?)")
    assert proc.returncode == 0 and "CASE-PASSED" in proc.stdout, (
        f"case {name} on {backend} failed in a child process (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES_BY_NAME))
def test_bad_input(name, backend):
    case = CASES_BY_NAME[name]
    if case.isolated:
        run_isolated(name, backend)
    else:
        evaluate(case, backend)


def test_every_public_entry_point_has_cases():
    covered = " ".join(CASES_BY_NAME)
    for prefix in ("lif", "nn_lif", "pack", "pack_if_binary", "unpack", "matmul", "ssa", "ta", "mconv", "mbn",
                   "bnlif", "ssa_module", "mlp", "qk_module", "mssa", "spike_linear", "spike_conv1d", "spike_conv2d",
                   "spike_maxpool", "masked_conv", "masked_bn", "masking", "energy", "model"):
        assert f"{prefix}_" in covered, prefix
    assert len(CASES) >= 30


# ---- sizes beyond 2^31 elements -------------------------------------------------------------

BIG = 2**31 + 64


def test_spike_matmul_refuses_k_beyond_int32_counts():
    # stride-0 views: 2^31 elements each, 4 bytes of storage; the check runs before any data is read
    code = ("import torch, spikeops\n"
            "a = torch.ones(1, 1).expand(1, 2**31); b = torch.ones(1, 1).expand(2**31, 1)\n"
            "for be in ('cpp', 'triton', 'torch', 'auto'):\n"
            "    try:\n"
            "        spikeops.spike_matmul(a, b, backend=be)\n"
            "    except ValueError as e:\n"
            "        assert 'K=2147483648' in str(e), e\n"
            "    else:\n"
            "        raise AssertionError('no error')\n"
            "print('CASE-PASSED')\n")
    env = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0 and "CASE-PASSED" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_spike_matmul_beyond_fp32_exact_counts(backend):
    # K = 2^24 + 1: a count fp32 cannot hold. C++ counts in int32 (exact); the Triton kernel
    # accumulates in fp32, so it refuses (and "auto" would use the reference instead).
    K = 2**24 + 1
    d = device_for(backend)
    a, b = torch.ones(1, 1, device=d).expand(1, K), torch.ones(1, 1, device=d).expand(K, 1)
    if backend == "triton":
        with pytest.raises(ValueError, match="K <= 2\\^24"):
            spikeops.spike_matmul(a, b, backend=backend)
    else:
        assert spikeops.spike_matmul(a, b, backend=backend).item() == K


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_ops_accept_more_than_2_31_elements_without_the_memory(backend):
    from torch._subclasses.fake_tensor import FakeTensorMode

    d = device_for(backend)
    with FakeTensorMode():
        x = torch.empty(2, BIG // 2, requires_grad=True, device=d)
        s = spikeops.lif(x, backend=backend)
        assert s.shape == x.shape and s.numel() > 2**31
        s.sum().backward()
        assert x.grad.shape == x.shape
        q = torch.empty(1, 1, 1, 2**25 + 1, 64, device=d)
        assert spikeops.token_attention(q, q, backend=backend).shape == q.shape
        if backend == "cpp":
            assert spikeops.ssa(q, q, q, backend=backend).shape == q.shape
        big_x = torch.empty(2**15 + 1, 1, 256, 256, device=d)  # N*H*W = 2^31 + 65536 pixels
        w, m = torch.empty(2, 1, 1, 1, device=d), torch.ones(1, 1, 16, 16, dtype=torch.bool, device=d)
        stat = torch.empty(1, device=d)
        if backend == "cpp":  # 64-bit pixel arithmetic
            assert spikeops.masked_conv2d(big_x, w, m, backend=backend).shape == (2**15 + 1, 2, 256, 256)
            assert spikeops.masked_batch_norm2d(big_x, m, stat, stat, backend=backend).shape \
                == big_x.shape
        else:  # the Triton kernels number pixels / in-head offsets in int32: a clear refusal
            with pytest.raises(ValueError, match="numbers pixels in int32"):
                spikeops.masked_conv2d(big_x, w, m, backend=backend)
            with pytest.raises(ValueError, match="numbers pixels in int32"):
                spikeops.masked_batch_norm2d(big_x, m, stat, stat, backend=backend)
            with pytest.raises(ValueError, match="N\\*d <="):
                spikeops.ssa(q, q, q, backend=backend)


# ---- models


@pytest.mark.parametrize("name", ["spikformer_cifar_4_384", "spikformer_v2_8_384", "msvit_cifar_4_384"])
def test_model_rejects_integer_images_empty_batches_and_zero_time_steps(name):
    small = {"spikformer_cifar_4_384": dict(dim=16, depth=1, num_heads=2),
             "spikformer_v2_8_384": dict(dim=16, depth=1, num_heads=2, img_size=32),
             "msvit_cifar_4_384": dict(embed_dim=32, depths=(1, 1, 1), num_heads=2)}[name]
    model = create_model(name, T=2, **small)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        model(torch.randint(0, 255, (1, 3, 32, 32)))
    with pytest.raises(ValueError, match="at least one time step and one sample"):
        model(torch.rand(0, 3, 32, 32))
    with pytest.raises(ValueError, match="T"):
        create_model(name, T=0, **small)
