"""Fused Spiking Self-Attention in Triton: the semantics are in :mod:`spikeops.ops.ssa`.

Forward: one program owns BLOCK_N query rows of one (batch, head) and walks t = 0..T-1 with the
attention neuron's potential [BLOCK_N, d] in registers. Spikes are loaded as fp16 0/1 tiles
and multiplied with ``tl.dot`` (fp32 accumulation: exact integer counts).
- ``N > d``: K^T V [d, d] is accumulated over N in blocks (each program recomputes it for its
  rows; no N x N map), then Y = Q (K^T V). K^T V entries reach N, beyond fp16's exact integers
  (2048), so it enters the second dot split as 2048 * hi + lo, both exact in fp16.
- ``N <= d``: A = Q K^T [BLOCK_N, BLOCK_M] (entries <= d) then Y += A V, over blocks of N.
The programs also check that the values they load are 0/1 (one int32 flag, cleared by any that
finds one that is not). When backward needs them, the programs also store q, k, v packed (one
int64 word of bits per row, d <= 64; wider heads: the pack kernel, after).

Backward (d <= 64: one word of bits per row), from the packed q, k, v, in three kernels with fp32
scratch in global memory, each parallel over the head's steps or row blocks:
  1. per (t, batch * head): K^T V from the bits                                -> kv [T, BH, D, D]
  2. per (batch * head, BLOCK_N rows): the forward's H again (potential in registers; H kept in
     dk's buffer), then t = T-1..0: G = scale * LIF backward (the LIF kernel's step, dL/dV in
     registers), dQ = G (K^T V)^T                                               -> G  [T, BH, N, d]
  3. per (t, batch * head): dA = Q^T G over the rows, then dK = V dA^T, dV = K dA.
The float products run with ``input_precision="ieee"`` (TF32 would miss the 1e-5 gradient
tolerance). Wider heads: unpack, the LIF kernels and torch matmuls.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from spikeops.ops.lif import ATTENTION_NEURON
from spikeops.triton.lif import lif_backward, lif_grad_step, lif_state
from spikeops.triton.pack import (clear_flag_if_any, new_binary_flag, not_binary, pack_spikes, row_bits, row_words,
                                  unpack_spikes)

BLOCK_N = 32
BLOCK_M = 32
FUSED_BACKWARD_MAX_D = 64  # one int64 word of bits per row


def ssa_forward(q, k, v, scale, v_threshold, tau, save_packed):
    """q, k, v [T, BH, N, d] contiguous -> (spikes, q/k/v words [T, BH, N, ceil(d/64)] or empty,
    all 0/1: an int32 [1] flag on the device, nonzero when they are; the caller reads it back only
    if it must check, as that is a host sync)."""
    T, BH, N, d = q.shape
    out = torch.empty_like(q)
    all_binary = new_binary_flag(q.device)
    block_d = max(16, triton.next_power_of_2(d))
    pack_here = save_packed and d <= 64  # one word per row: the kernel packs what it loads
    words = [q.new_empty((T, BH, N, 1) if pack_here else (0,), dtype=torch.int64) for _ in range(3)]
    grid = (BH, triton.cdiv(N, BLOCK_N))
    _ssa_forward_kernel[grid](
        q, k, v, out, *words, all_binary, T, BH, N, d, float(scale), float(v_threshold), float(tau),
        KV_FIRST=N > d, SAVE_WORDS=pack_here, BLOCK_N=BLOCK_N, BLOCK_M=BLOCK_M, BLOCK_D=block_d,
        enable_fp_fusion=False,  # y * scale - V must round twice, as in the reference (no FMA)
    )
    if save_packed and not pack_here:
        words = [pack_spikes(x.view(-1, d), False)[0].view(T, BH, N, -1) for x in (q, k, v)]
    return (out, *words, all_binary)


def ssa_backward(grad, qw, kw, vw, scale, v_threshold, tau):
    """grad [T, BH, N, d] contiguous, the words ssa_forward saved -> dq, dk, dv [T, BH, N, d] in
    grad's dtype (computed in fp32, rounded once): the fused kernel for d <= FUSED_BACKWARD_MAX_D,
    else the unfused path."""
    path = ssa_backward_unfused if grad.shape[-1] > FUSED_BACKWARD_MAX_D else ssa_backward_fused
    grads = path(grad.float().contiguous(), qw, kw, vw, scale, v_threshold, tau)
    return tuple(g.to(grad.dtype) for g in grads)


def ssa_backward_fused(grad, qw, kw, vw, scale, v_threshold, tau):
    """ssa_backward in three kernels (fp32 grad, d <= FUSED_BACKWARD_MAX_D)."""
    T, BH, N, d = grad.shape
    v_reset, hard, decay_input, detach_reset, surrogate, alpha = ATTENTION_NEURON
    block_d = max(16, triton.next_power_of_2(d))
    dq, dk, dv, gy = (torch.empty_like(grad) for _ in range(4))
    kv = torch.empty((T, BH, block_d, block_d), device=grad.device, dtype=torch.float32)
    _key_value_product_kernel[(T * BH,)](kw, vw, kv, N, BLOCK_N=BLOCK_N, BLOCK_D=block_d)
    _neuron_backward_kernel[(BH, triton.cdiv(N, BLOCK_N))](
        grad, qw, kv, dq, gy, dk, T, BH, N, d, float(scale), float(v_threshold), float(tau),  # H in dk
        float(v_reset), float(alpha), HARD=hard, DECAY_INPUT=decay_input, DETACH_RESET=detach_reset,
        SURROGATE=surrogate, BLOCK_N=BLOCK_N, BLOCK_D=block_d,
        enable_fp_fusion=False,  # H recomputed as the forward rounds it (its spikes gate the gradient)
    )
    _key_value_grad_kernel[(T * BH,)](gy, qw, kw, vw, dk, dv, N, d, BLOCK_N=BLOCK_N, BLOCK_D=block_d)
    return dq, dk, dv


def ssa_backward_unfused(grad, qw, kw, vw, scale, v_threshold, tau):
    """ssa_backward as unpack, the LIF kernels and torch matmuls (fp32 grad, any d)."""
    T, BH, N, d = grad.shape
    v_reset, hard, decay_input, detach_reset, surrogate, alpha = ATTENTION_NEURON
    q, k, v = (unpack_spikes(w.view(-1, w.shape[-1]), d, torch.float32).view(T, BH, N, d) for w in (qw, kw, vw))
    kv = k.transpose(-2, -1) @ v  # [T, BH, d, d], exact integers
    y = ((q @ kv) * scale).view(T, -1)  # the forward's attention input, recomputed exactly
    h = lif_state(y, tau, v_threshold, v_reset, hard, decay_input)
    g = lif_backward(grad.view(T, -1), h, tau, v_threshold, v_reset, hard, decay_input, detach_reset, surrogate,
                     alpha).view(T, BH, N, d) * scale
    da = q.transpose(-2, -1) @ g
    return g @ kv.transpose(-2, -1), v @ da.transpose(-2, -1), k @ da


@triton.jit
def _exact_product(q, kv):
    """q [BLOCK_N, BLOCK_D] fp16 0/1 @ kv [BLOCK_D, BLOCK_D] fp32 integers < 2^22, exactly: kv
    enters split as 2048 * hi + lo, both exact in fp16."""
    kv_hi = tl.floor(kv / 2048.0)
    kv_lo = kv - kv_hi * 2048.0
    return tl.dot(q, kv_hi.to(tl.float16)) * 2048.0 + tl.dot(q, kv_lo.to(tl.float16))


@triton.jit
def _key_block(k_ptr, v_ptr, m0, cols, N, d, BLOCK_M: tl.constexpr):
    """Rows m0 .. m0 + BLOCK_M of one (t, head)'s k and v [N, d] as fp16 0/1 tiles (0 past N, d),
    and 1 where either held a value that is not 0/1."""
    m = m0 + tl.arange(0, BLOCK_M)
    mask = (m[:, None] < N) & (cols[None, :] < d)
    k = tl.load(k_ptr + m[:, None] * d + cols[None, :], mask=mask, other=0.0)
    v = tl.load(v_ptr + m[:, None] * d + cols[None, :], mask=mask, other=0.0)
    return k.to(tl.float16), v.to(tl.float16), not_binary(k) | not_binary(v)


@triton.jit
def _unpack_rows(words_ptr, rows, cols, N, DTYPE: tl.constexpr):
    """Rows ``rows`` of a [N, 1] word tile as 0/1 [len(rows), len(cols)] of DTYPE (0 past N)."""
    return row_bits(tl.load(words_ptr + rows, mask=rows < N, other=0), cols).to(DTYPE)


@triton.jit
def _ssa_forward_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, qw_ptr, kw_ptr, vw_ptr, all_binary_ptr, T, BH, N, d, scale, v_threshold, tau,
    KV_FIRST: tl.constexpr, SAVE_WORDS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """SAVE_WORDS (d <= 64): also store q, k, v as one int64 word of bits per row; each program
    packs the q, k and v rows of its own row block (BLOCK_M == BLOCK_N: one key block is its own)."""
    tl.static_assert(BLOCK_M == BLOCK_N)
    bh, pid_n = tl.program_id(0).to(tl.int64), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    row_mask = (rows[:, None] < N) & (cols[None, :] < d)
    tau_v = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32) + tau
    vmem = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    bad_rows = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.int32)  # 1 where a loaded q (k, v) value was not 0/1
    bad_keys = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.int32)
    own_block = pid_n * BLOCK_N
    for t in range(T):
        base = (t * BH + bh) * N * d
        q = tl.load(q_ptr + base + rows[:, None] * d + cols[None, :], mask=row_mask, other=0.0)
        bad_rows |= not_binary(q)
        q = q.to(tl.float16)
        if SAVE_WORDS:
            tl.store(qw_ptr + (t * BH + bh) * N + rows, row_words(q, cols), mask=rows < N)
        if KV_FIRST:
            kv = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)
        else:
            y = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for m0 in range(0, N, BLOCK_M):
            k, v, bad = _key_block(k_ptr + base, v_ptr + base, m0, cols, N, d, BLOCK_M)
            bad_keys |= bad
            if SAVE_WORDS:
                if m0 == own_block:
                    tl.store(kw_ptr + (t * BH + bh) * N + rows, row_words(k, cols), mask=rows < N)
                    tl.store(vw_ptr + (t * BH + bh) * N + rows, row_words(v, cols), mask=rows < N)
            if KV_FIRST:
                kv += tl.dot(tl.trans(k), v)
            else:
                a = tl.dot(q, tl.trans(k))
                y += tl.dot(a.to(tl.float16), v)
        if KV_FIRST:
            y = _exact_product(q, kv)
        y = y * scale
        h = vmem + tl.math.div_rn(y - vmem, tau_v)
        fire = (h - v_threshold) >= 0.0
        tl.store(out_ptr + base + rows[:, None] * d + cols[None, :],
                 tl.where(fire, 1.0, 0.0).to(out_ptr.dtype.element_ty), mask=row_mask)
        vmem = tl.where(fire, 0.0, h)
    clear_flag_if_any(all_binary_ptr, bad_rows)
    clear_flag_if_any(all_binary_ptr, bad_keys)


@triton.jit
def _key_value_product_kernel(kw_ptr, vw_ptr, kv_ptr, N, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Backward kernel 1, one program per (t, batch * head): K^T V from the bits -> kv [BLOCK_D, BLOCK_D]."""
    step = tl.program_id(0).to(tl.int64)
    r = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    kv = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)
    for m0 in range(0, N, BLOCK_N):
        k = _unpack_rows(kw_ptr + step * N, m0 + r, cols, N, tl.float16)
        v = _unpack_rows(vw_ptr + step * N, m0 + r, cols, N, tl.float16)
        kv += tl.dot(tl.trans(k), v)
    tl.store(kv_ptr + step * BLOCK_D * BLOCK_D + cols[:, None] * BLOCK_D + cols[None, :], kv)


@triton.jit
def _neuron_backward_kernel(
    g_ptr, qw_ptr, kv_ptr, dq_ptr, gy_ptr, h_ptr, T, BH, N, d, scale, v_threshold, tau, v_reset, alpha,
    HARD: tl.constexpr, DECAY_INPUT: tl.constexpr, DETACH_RESET: tl.constexpr, SURROGATE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Backward kernel 2, for BLOCK_N rows of one (batch, head). The forward's attention neuron is a
    hard reset to 0 with decay_input; the backward takes its settings (ATTENTION_NEURON) as arguments."""
    bh, pid_n = tl.program_id(0).to(tl.int64), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < N) & (cols[None, :] < d)
    tile = rows[:, None] * d + cols[None, :]
    kv_tile = cols[:, None] * BLOCK_D + cols[None, :]
    tau_v = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32) + tau
    # H of every step, as the forward computes it
    vmem = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for t in range(T):
        step = t * BH + bh
        q = _unpack_rows(qw_ptr + step * N, rows, cols, N, tl.float16)
        y = _exact_product(q, tl.load(kv_ptr + step * BLOCK_D * BLOCK_D + kv_tile)) * scale
        h = vmem + tl.math.div_rn(y - vmem, tau_v)
        tl.store(h_ptr + step * N * d + tile, h, mask=mask)
        vmem = tl.where((h - v_threshold) >= 0.0, 0.0, h)
    tl.debug_barrier()  # h is read back below, in the same layout, by this program only
    # t = T-1 .. 0, dL/dV carried in registers
    gv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for i in range(T):
        step = (T - 1 - i) * BH + bh
        h = tl.load(h_ptr + step * N * d + tile, mask=mask, other=0.0)
        gs = tl.load(g_ptr + step * N * d + tile, mask=mask, other=0.0)
        gy, gv = lif_grad_step((h - v_threshold) + 0.0, gs, gv, tau_v, v_threshold, v_reset, alpha,
                               HARD, DECAY_INPUT, DETACH_RESET, SURROGATE)
        g = tl.where(mask, gy * scale, 0.0)
        tl.store(gy_ptr + step * N * d + tile, g, mask=mask)
        kv = tl.load(kv_ptr + step * BLOCK_D * BLOCK_D + kv_tile)
        tl.store(dq_ptr + step * N * d + tile, tl.dot(g, tl.trans(kv), input_precision="ieee"), mask=mask)


@triton.jit
def _key_value_grad_kernel(
    gy_ptr, qw_ptr, kw_ptr, vw_ptr, dk_ptr, dv_ptr, N, d, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Backward kernel 3, one program per (t, batch * head): dA = Q^T G over the rows, dK = V dA^T,
    dV = K dA."""
    step = tl.program_id(0).to(tl.int64)
    r = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    da = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)  # dL/d(K^T V)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + r
        mask = (rows[:, None] < N) & (cols[None, :] < d)
        g = tl.load(gy_ptr + step * N * d + rows[:, None] * d + cols[None, :], mask=mask, other=0.0)
        q = _unpack_rows(qw_ptr + step * N, rows, cols, N, tl.float32)
        da += tl.dot(tl.trans(q), g, input_precision="ieee")
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + r
        mask = (rows[:, None] < N) & (cols[None, :] < d)
        tile = step * N * d + rows[:, None] * d + cols[None, :]
        k = _unpack_rows(kw_ptr + step * N, rows, cols, N, tl.float32)
        v = _unpack_rows(vw_ptr + step * N, rows, cols, N, tl.float32)
        tl.store(dk_ptr + tile, tl.dot(v, tl.trans(da), input_precision="ieee"), mask=mask)
        tl.store(dv_ptr + tile, tl.dot(k, da, input_precision="ieee"), mask=mask)
