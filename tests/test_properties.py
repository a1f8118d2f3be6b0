"""Hypothesis property tests: random shapes (1 and odd sizes included) and settings, on every kernel
backend, against spikeops.reference: spikes bit for bit, gradients to 1e-5 of their scale,
exact pack/unpack round trips and exact spike products.

Few examples for the Triton backend (the interpreter runs it on CPU here); derandomized so that
CI runs the same examples every time (pass --hypothesis-seed / edit EXAMPLES to explore more).
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import spikeops
from spikeops import reference
from harness import KERNEL_BACKENDS, assert_grads_close, device_for

EXAMPLES = {"cpp": 25, "triton": 5}
FLOAT_TYPES = [torch.float32, torch.float16, torch.bfloat16]


def run_settings(backend, scale=1):
    return settings(max_examples=max(2, EXAMPLES[backend] // scale), deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def per_backend(**strategies):
    """``@given(**strategies)``, run on each kernel backend with that backend's example budget."""
    def deco(body):
        @pytest.mark.parametrize("backend", KERNEL_BACKENDS)
        def test(backend):
            run_settings(backend)(given(**strategies)(lambda **kw: body(backend, **kw)))()

        test.__name__, test.__doc__ = body.__name__, body.__doc__
        return test
    return deco


sizes = st.integers(1, 9)
seeds = st.integers(0, 2**31 - 1)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def random_spikes(shape, seed, p=0.4, dtype=torch.float32, device="cpu"):
    return (torch.rand(shape, generator=gen(seed)) < p).to(dtype).to(device)


def forward_backward(fn, x, seed):
    leaf = x.detach().clone().requires_grad_(True)
    out = fn(leaf)
    out.backward(torch.randn(out.shape, generator=gen(seed + 1)).to(out.device, out.dtype))
    return out.detach(), leaf.grad


# ---- LIF ----------------------------------------------------------------------------------------


@per_backend(T=st.integers(1, 6), trailing=st.lists(sizes, min_size=0, max_size=3), seed=seeds,
       tau=st.floats(1.05, 8.0), v_threshold=st.floats(-0.5, 2.0),
       v_reset=st.one_of(st.none(), st.floats(-0.5, 0.5)), decay_input=st.booleans(), detach_reset=st.booleans(),
       surrogate=st.sampled_from(["sigmoid", "atan"]), alpha=st.one_of(st.none(), st.floats(0.5, 8.0)),
       dtype=st.sampled_from(FLOAT_TYPES))
def test_lif_matches_the_reference(backend, T, trailing, seed, tau, v_threshold, v_reset, decay_input, detach_reset,
                                   surrogate, alpha, dtype):
    x = (torch.randn((T, *trailing), generator=gen(seed)) * 1.5 + 0.5).to(dtype).to(device_for(backend))
    kw = dict(tau=tau, v_threshold=v_threshold, v_reset=v_reset, decay_input=decay_input, detach_reset=detach_reset,
              surrogate=surrogate, alpha=alpha)
    out, gx = forward_backward(lambda t: spikeops.lif(t, backend=backend, **kw), x, seed)
    ref, rgx = forward_backward(lambda t: reference.lif(t, **kw), x, seed)
    assert torch.equal(out, ref)
    # fp32 state and math for every input dtype; the gradient is rounded to the input dtype at the end
    assert_grads_close(gx, rgx, rtol=1e-5 if dtype == torch.float32 else 1e-2)


@per_backend(T=st.integers(1, 5), n=st.integers(1, 40), seed=seeds, tau=st.floats(1.05, 8.0),
       v_threshold=st.floats(0.1, 2.0))
def test_lif_bf16_state_keeps_spikes_exact(backend, T, n, seed, tau, v_threshold):
    x = (torch.randn(T, n, generator=gen(seed)) * 2).to(device_for(backend))
    out, gx = forward_backward(lambda t: spikeops.lif(t, tau=tau, v_threshold=v_threshold, backend=backend,
                                                      state_dtype=torch.bfloat16), x, seed)
    ref, rgx = forward_backward(lambda t: reference.lif(t, tau=tau, v_threshold=v_threshold), x, seed)
    assert torch.equal(out, ref)
    assert_grads_close(gx, rgx, rtol=5e-2)  # H - v_th kept in bf16 (8 significant bits)


# ---- pack / unpack / spike_matmul -------------------------------------------------------------------


@per_backend(shape=st.lists(st.integers(1, 140), min_size=1, max_size=3), seed=seeds, data=st.data(),
       dtype=st.sampled_from(FLOAT_TYPES), p=st.sampled_from([0.0, 0.3, 1.0]))
def test_pack_unpack_round_trip(backend, shape, seed, data, dtype, p):
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = random_spikes(shape, seed, p, dtype, device_for(backend))
    packed = spikeops.pack_spikes(x, dim=dim, backend=backend)
    assert torch.equal(packed.words.cpu(), reference.pack_spikes(x.movedim(dim, -1)).cpu())
    back = spikeops.unpack_spikes(packed, backend=backend)
    assert back.dtype == dtype and torch.equal(back, x)
    other = data.draw(st.sampled_from(FLOAT_TYPES))
    assert torch.equal(spikeops.unpack_spikes(packed, dtype=other, backend=backend), x.to(other))
    assert spikeops.pack_if_binary(x + 0.5, dim=dim, backend=backend) is None


@per_backend(M=st.integers(1, 70), K=st.integers(1, 140), N=st.integers(1, 70), batch=st.sampled_from([(), (1,), (2,)]),
       b_batch=st.sampled_from([(), (1,), (2,)]), seed=seeds, dtype=st.sampled_from(FLOAT_TYPES))
def test_spike_matmul_counts_exactly(backend, M, K, N, batch, b_batch, seed, dtype):
    d = device_for(backend)
    a = random_spikes((*batch, M, K), seed, dtype=dtype, device=d)
    b = random_spikes((*b_batch, K, N), seed + 1, p=0.6, dtype=dtype, device=d)
    assert torch.equal(spikeops.spike_matmul(a, b, backend=backend), reference.spike_matmul(a, b))


# ---- attention --------------------------------------------------------------------------------


@per_backend(T=st.integers(1, 3), B=st.integers(1, 2), H=st.integers(1, 2), N=st.integers(1, 9), d=st.integers(1, 9),
       seed=seeds, scale=st.sampled_from([0.125, 0.25, 0.3, 1.0]), v_threshold=st.floats(0.1, 1.5),
       tau=st.floats(1.1, 4.0))
def test_ssa_matches_the_reference(backend, T, B, H, N, d, seed, scale, v_threshold, tau):
    dev = device_for(backend)
    q, k, v = (random_spikes((T, B, H, N, d), seed + i, 0.5, device=dev).requires_grad_() for i in range(3))
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = spikeops.ssa(q, k, v, scale, v_threshold, tau, backend=backend)
    ref = reference.ssa(q2, k2, v2, scale, v_threshold, tau)
    assert torch.equal(out, ref)
    g = torch.randn(out.shape, generator=gen(seed)).to(dev)
    out.backward(g)
    ref.backward(g)
    for a, e in ((q.grad, q2.grad), (k.grad, k2.grad), (v.grad, v2.grad)):
        assert_grads_close(a, e)


@per_backend(T=st.integers(1, 3), B=st.integers(1, 2), H=st.integers(1, 2), N=st.integers(1, 9), d=st.integers(1, 9),
       seed=seeds, with_p=st.booleans(), mode=st.sampled_from(["token", "channel"]), v_threshold=st.floats(0.1, 4.0),
       tau=st.floats(1.1, 4.0))
def test_token_attention_matches_the_reference(backend, T, B, H, N, d, seed, with_p, mode, v_threshold, tau):
    dev = device_for(backend)
    n_in = 3 if with_p else 2
    xs = [random_spikes((T, B, H, N, d), seed + i, 0.5, device=dev).requires_grad_() for i in range(n_in)]
    xs2 = [t.detach().clone().requires_grad_() for t in xs]
    args = lambda ts: (ts[0], ts[1], ts[2] if with_p else None)  # noqa: E731
    out = spikeops.token_attention(*args(xs), v_threshold=v_threshold, tau=tau, mode=mode, backend=backend)
    ref = reference.token_attention(*args(xs2), v_threshold=v_threshold, tau=tau, mode=mode)
    assert torch.equal(out, ref)
    g = torch.randn(out.shape, generator=gen(seed)).to(dev)
    out.backward(g)
    ref.backward(g)
    for a, e in zip(xs, xs2):
        assert_grads_close(a.grad, e.grad)


# ---- masked conv / BN -------------------------------------------------------------------------------


@st.composite
def conv_setting(draw):
    k = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 2))
    padding = draw(st.integers(0, k - 1))
    h, w = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    bh, bw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    Ho, Wo = h * bh, w * bw  # the output the mask tiles; the input size that gives it:
    H, W = (Ho - 1) * stride + k - 2 * padding, (Wo - 1) * stride + k - 2 * padding
    if H < 1 or W < 1 or (H + 2 * padding - k) // stride + 1 != Ho or (W + 2 * padding - k) // stride + 1 != Wo:
        H, W, padding = (Ho - 1) * stride + k, (Wo - 1) * stride + k, 0
    B, T = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    C, C_out = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    return dict(k=k, stride=stride, padding=padding, h=h, w=w, H=H, W=W, B=B, T=T, C=C, C_out=C_out,
                bias=draw(st.booleans()))


def masked_conv_props(backend, s, seed):
    dev = device_for(backend)
    N = s["T"] * s["B"]
    x = torch.randn(N, s["C"], s["H"], s["W"], generator=gen(seed)).to(dev)
    w = torch.randn(s["C_out"], s["C"], s["k"], s["k"], generator=gen(seed + 1)).to(dev)
    b = torch.randn(s["C_out"], generator=gen(seed + 2)).to(dev) if s["bias"] else None
    mask = (torch.rand(s["B"], 1, s["h"], s["w"], generator=gen(seed + 3)) < 0.6).to(dev)
    results = []
    for fn in (lambda *a: spikeops.masked_conv2d(*a[:3], bias=a[3], stride=s["stride"], padding=s["padding"],
                                                 backend=backend),
               lambda *a: reference.masked_conv2d_reference(a[0], a[1], a[2], a[3], s["stride"], s["padding"])):
        leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
        out = fn(leaves[0], leaves[1], mask, leaves[2])
        out.backward(torch.randn(out.shape, generator=gen(seed + 4)).to(dev))
        results.append((out.detach(), *[t.grad if t is not None else None for t in leaves]))
    return results, reference.upsample_mask(mask, N, results[0][0].shape[-2:]).expand_as(results[0][0])


@per_backend(s=conv_setting(), seed=seeds)
def test_masked_conv2d_matches_the_reference(backend, s, seed):
    ((out, gx, gw, gb), (ref, rgx, rgw, rgb)), visible = masked_conv_props(backend, s, seed)
    assert_grads_close(out, ref)  # float sums in another order: to 1e-5 of the scale
    assert bool((out[~visible] == 0).all())  # masked outputs exactly 0
    assert_grads_close(gx, rgx)
    assert_grads_close(gw, rgw)
    if gb is not None:
        assert_grads_close(gb, rgb)


@per_backend(N=st.integers(1, 4), C=st.integers(1, 5), h=st.integers(1, 3), w=st.integers(1, 3), bh=st.integers(1, 3),
       bw=st.integers(1, 3), seed=seeds, training=st.booleans(), affine=st.booleans())
def test_masked_batch_norm2d_matches_the_reference(backend, N, C, h, w, bh, bw, seed, training, affine):
    dev = device_for(backend)
    mask = torch.rand(N, 1, h, w, generator=gen(seed + 3)) < 0.6
    mask.view(-1)[:2] = True  # training needs >= 2 visible positions
    if training and int(mask.sum()) * bh * bw < 2:
        mask[:] = True
    mask = mask.to(dev)
    x = (torch.randn(N, C, h * bh, w * bw, generator=gen(seed)) * 2 + 1).to(dev)
    weight = (torch.rand(C, generator=gen(seed + 1)) + 0.5).to(dev) if affine else None
    bias = torch.randn(C, generator=gen(seed + 2)).to(dev) if affine else None
    stats = [(torch.randn(C, generator=gen(seed + 5)).to(dev), (torch.rand(C, generator=gen(seed + 6)) + 0.5).to(dev))
             for _ in range(2)]
    outs = []
    for i, fn in enumerate((lambda *a, **k: spikeops.masked_batch_norm2d(*a, backend=backend, **k),
                            reference.masked_batch_norm2d_reference)):
        rm, rv = (t.clone() for t in stats[0])
        leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, weight, bias)]
        out = fn(leaves[0], mask, rm, rv, leaves[1], leaves[2], training=training, momentum=0.1, eps=1e-5)
        out.backward(torch.randn(out.shape, generator=gen(seed + 4)).to(dev))
        outs.append((out.detach(), rm, rv, *[t.grad for t in leaves if t is not None]))
    for a, e in zip(*outs):
        assert_grads_close(a, e)
    assert bool((outs[0][0][~reference.upsample_mask(mask, N, x.shape[-2:]).expand_as(x)] == 0).all())
