"""``torch.library.opcheck`` on every registered spikeops custom op, on every kernel backend.

opcheck runs each op for real and checks its schema (no hidden mutation or aliasing), its fake
(meta) kernel against the real outputs' shapes/dtypes/strides, its autograd registration and
its behaviour under AOTAutograd with dynamic shapes - what torch.compile relies on.
"""
import pytest
import torch

import spikeops
from spikeops.backend import has_kernel
from spikeops.ops import masked_batch_norm, masked_conv, pack, spike_matmul, ssa, token_attention  # noqa: F401 registers
from spikeops.ops import lif as lif_mod  # noqa: F401
from harness import KERNEL_BACKENDS, device_for

OPS = torch.ops.spikeops


def spikes(*shape, seed=0, device="cpu", p=0.4):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) < p).float().to(device)


def randn(*shape, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(device)


def cases(backend):
    """(op, args) pairs covering every op and its main flags."""
    d = device_for(backend)
    out = []
    x = (randn(4, 37, device=d) + 0.5).requires_grad_()
    # lif: x, tau, v_threshold, v_reset, hard_reset, decay_input, detach_reset, surrogate, alpha, save_h, state_bf16
    out += [(OPS.lif_forward, (x, 2.0, 1.0, 0.0, True, True, True, 0, 4.0, True, False, backend)),
            (OPS.lif_forward, (x, 3.0, 0.5, 0.0, False, False, False, 1, 2.0, True, True, backend)),
            (OPS.lif_forward, (x.detach(), 2.0, 1.0, 0.0, True, True, True, 0, 4.0, False, False, backend))]
    h = randn(4, 37, seed=1, device=d) + 1.0
    out += [(OPS.lif_backward, (randn(4, 37, seed=2, device=d), h, 2.0, 1.0, 0.0, True, True, False, 1, 2.0, backend)),
            (OPS.lif_backward, (randn(4, 37, seed=2, device=d), h.bfloat16(), 2.0, 1.0, 0.0, False, True, True, 0,
                                4.0, backend))]
    out += [(OPS.lif_backward_from_input, (randn(4, 37, seed=2, device=d), x.detach(), 2.0, 1.0, 0.0, True, True,
                                           False, 1, 2.0, backend)),
            (OPS.lif_backward_from_input, (randn(4, 37, seed=2, device=d).bfloat16(), x.detach().bfloat16(), 3.0,
                                           0.5, 0.0, False, False, True, 0, 4.0, backend))]
    # pack / unpack: x [R, n] -> (words, all-binary flag)
    s = spikes(5, 70, device=d)
    words = spikeops.pack_spikes(s, backend=backend).words
    out += [(OPS.pack_spikes, (s, True, backend)), (OPS.pack_spikes, (s * 2, False, backend)),
            (OPS.unpack_spikes, (words, 70, torch.float32, backend)),
            (OPS.unpack_spikes, (words, 70, torch.bfloat16, backend))]
    # spike_matmul: packed operands [Bt, M, W], [Bt, N, W] (C++) or 0/1 floats [Bt, M, K], [Bt, K, N] (Triton)
    if has_kernel("spike_matmul", "spike_matmul_spikes", backend):
        out.append((OPS.spike_matmul_spikes, (spikes(2, 3, 70, device=d), spikes(2, 70, 5, seed=1, device=d), True,
                                              backend)))
    else:
        a_w = spikeops.pack_spikes(spikes(2, 3, 70, device=d), backend=backend).words
        b_w = spikeops.pack_spikes(spikes(2, 5, 70, seed=1, device=d), backend=backend).words
        out.append((OPS.spike_matmul_packed, (a_w, b_w, backend)))
    # ssa: q, k, v [T, BH, N, d]; both association orders (N > d and N <= d)
    for shape in ((2, 3, 9, 4), (2, 3, 4, 9)):
        q, k, v = (spikes(*shape, seed=i, device=d).requires_grad_() for i in range(3))
        out.append((OPS.ssa_forward, (q, k, v, 0.125, 0.5, 2.0, True, backend)))
    out.append((OPS.ssa_forward, (q.detach(), k.detach(), v.detach(), 0.25, 0.5, 2.0, False, backend)))
    # token attention: q, k, p [T, BH, N, d]
    q, k, p = (spikes(2, 3, 6, 5, seed=i, device=d).requires_grad_() for i in range(3))
    out += [(OPS.token_attention_forward, (q, k, p, 0.5, 2.0, True, backend)),
            (OPS.token_attention_forward, (q, k, None, 1.0, 2.0, True, backend)),
            (OPS.token_attention_forward, (q.detach(), k.detach(), None, 0.5, 2.0, False, backend))]
    _, h_ta, k_words = OPS.token_attention_forward(q.detach(), k.detach(), None, 0.5, 2.0, True, backend)
    out.append((OPS.token_attention_backward, (randn(2, 3, 6, 5, device=d), k_words, h_ta, 0.5, 2.0, backend)))
    # masked conv: x [N, C, H, W], weight [C_out, C, kh, kw], bias, mask bool [N, h, w]
    xc = randn(4, 3, 8, 8, device=d).requires_grad_()
    w = randn(5, 3, 3, 3, seed=1, device=d).requires_grad_()
    b = randn(5, seed=2, device=d).requires_grad_()
    m = (torch.rand(4, 4, 4, generator=torch.Generator().manual_seed(3)) < 0.5).to(d)
    out += [(OPS.masked_conv2d_forward, (xc, w, b, m, [1, 1], [1, 1], backend)),
            (OPS.masked_conv2d_forward, (xc, w, None, m[:, :2, :2], [2, 2], [0, 0], backend))]
    g = randn(4, 5, 8, 8, seed=4, device=d)
    out += [(OPS.masked_conv2d_backward, (g, xc.detach(), w.detach(), m, [1, 1], [1, 1], [8, 8], True, True, True,
                                          backend)),
            (OPS.masked_conv2d_backward, (g, xc.detach()[:0].reshape(0), w.detach(), m, [1, 1], [1, 1], [8, 8], True,
                                          False, False, backend))]
    # masked BatchNorm: x [N, C, H, W], mask, weight, bias, running stats, training, eps, save
    xb = randn(4, 3, 8, 8, seed=5, device=d).requires_grad_()
    wb, bb = (torch.ones(3, device=d) + 0.1 * randn(3, seed=i, device=d) for i in (6, 7))
    wb, bb = wb.requires_grad_(), bb.requires_grad_()
    rm, rv = torch.zeros(3, device=d), torch.ones(3, device=d)
    out += [(OPS.masked_batch_norm_forward, (xb, m, wb, bb, None, None, True, 1e-5, True, backend)),
            (OPS.masked_batch_norm_forward, (xb, m, wb, bb, rm, rv, False, 1e-5, True, backend)),
            (OPS.masked_batch_norm_forward, (xb.detach(), m, None, None, rm, rv, False, 1e-5, False, backend))]
    _, mean, invstd, _, vis = OPS.masked_batch_norm_forward(xb.detach(), m, wb.detach(), bb.detach(), None, None, True,
                                                            1e-5, True, backend)
    gy = randn(4, 3, 8, 8, seed=8, device=d)
    out += [(OPS.masked_batch_norm_backward, (gy, vis, m, wb.detach(), mean, invstd, True, True, True, True, backend)),
            (OPS.masked_batch_norm_backward, (gy, vis, m, wb.detach(), mean, invstd, False, True, True, False,
                                              backend))]
    # token attention in the channels-first layout [T, BH, d, N] (N = 70: a partial word)
    q, k, p = (spikes(2, 3, 5, 70, seed=i, device=d).requires_grad_() for i in range(3))
    out += [(OPS.token_attention_cf_forward, (q, k, p, 0.5, 2.0, True, backend)),
            (OPS.token_attention_cf_forward, (q.detach(), k.detach(), None, 0.5, 2.0, False, backend))]
    _, h_cf, kw_cf = OPS.token_attention_cf_forward(q.detach(), k.detach(), None, 0.5, 2.0, True, backend)
    out.append((OPS.token_attention_cf_backward, (randn(2, 3, 5, 70, seed=10, device=d), kw_cf, h_cf, 0.5, 2.0,
                                                  backend)))
    # ssa backward with one word of bits per row (d = 40: Triton's fused kernel) and two (d = 70)
    for d_head in (40, 70):
        q, k, v = (spikes(2, 3, 9, d_head, seed=i, device=d) for i in range(3))
        _, qw, kw, vw = OPS.ssa_forward(q, k, v, 0.125, 0.5, 2.0, True, backend)
        out.append((OPS.ssa_backward, (randn(2, 3, 9, d_head, seed=9, device=d), qw, kw, vw, 0.125, 0.5, 2.0,
                                       backend)))
    return out


def op_name(packet) -> str:
    return packet._qualified_op_name.split("::")[1]


REGISTERED = sorted(n for n in dir(OPS) if isinstance(getattr(OPS, n), torch._ops.OpOverloadPacket))


# Raw kernels that only some backends have: one case, each backend checking the one it has.
ONE_CASE = {"spike_matmul_packed": "spike_matmul", "spike_matmul_spikes": "spike_matmul"}


def case_label(op) -> str:
    return ONE_CASE.get(op_name(op), op_name(op))


def test_every_registered_op_has_a_case():
    covered = {op_name(op) for backend in KERNEL_BACKENDS for op, _ in cases(backend)}
    assert covered == set(REGISTERED), set(REGISTERED) ^ covered
    assert len(REGISTERED) >= 13


# The cases that name the parametrisation (every backend has the same ones), built with the C++ backend
# where it is built, else Triton (a GPU machine running only the Triton tests from the source tree).
ID_CASES = cases("cpp" if spikeops.backend.cpp_available() else "triton")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("index", range(len(ID_CASES)), ids=[f"{i}-{case_label(op)}" for i, (op, _) in enumerate(ID_CASES)])
def test_opcheck(backend, index):
    op, args = cases(backend)[index]
    assert case_label(op) == case_label(ID_CASES[index][0])
    torch.library.opcheck(op.default, args)
