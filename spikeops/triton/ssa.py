"""Fused Spiking Self-Attention forward in Triton: the semantics are in :mod:`spikeops.ops.ssa`.

One program owns BLOCK_N query rows of one (batch, head) and walks t = 0..T-1 with the
attention neuron's potential [BLOCK_N, d] in registers. Spikes are loaded as fp16 0/1 tiles
and multiplied with ``tl.dot`` (fp32 accumulation: exact integer counts).
- ``N > d``: K^T V [d, d] is accumulated over N in blocks (each program recomputes it for its
  rows; no N x N map), then Y = Q (K^T V). K^T V entries reach N, beyond fp16's exact integers
  (2048), so it enters the second dot split as 2048 * hi + lo, both exact in fp16.
- ``N <= d``: A = Q K^T [BLOCK_N, BLOCK_M] (entries <= d) then Y += A V, over blocks of N.
q, k, v are also packed (and checked to be 0/1) by the pack kernel, for the backward pass.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from spikeops.triton.pack import pack_with_flags

BLOCK_N = 32
BLOCK_M = 32


def ssa_forward(q, k, v, scale, v_threshold, tau, save_packed):
    """q, k, v [T, BH, N, d] contiguous -> (spikes, q/k/v words [T, BH, N, ceil(d/64)] or empty,
    all 0/1 as a 0-d bool tensor on the device: the caller reads it back only if it must check)."""
    T, BH, N, d = q.shape
    packed = [pack_with_flags(x.view(-1, d), True) for x in (q, k, v)]
    binary = ~torch.stack([bad.any() for _, bad in packed]).any()
    words = [w.view(T, BH, N, -1) if save_packed else w.new_empty((0,)) for w, _ in packed]
    out = torch.empty_like(q)
    block_d = max(16, triton.next_power_of_2(d))
    grid = (BH, triton.cdiv(N, BLOCK_N))
    _ssa_forward_kernel[grid](
        q, k, v, out, T, BH, N, d, float(scale), float(v_threshold), float(tau),
        KV_FIRST=N > d, BLOCK_N=BLOCK_N, BLOCK_M=BLOCK_M, BLOCK_D=block_d,
        enable_fp_fusion=False,  # y * scale - V must round twice, as in the reference (no FMA)
    )
    return (out, *words, binary)


@triton.jit
def _ssa_forward_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, T, BH, N, d, scale, v_threshold, tau,
    KV_FIRST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh, pid_n = tl.program_id(0).to(tl.int64), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    row_mask = (rows[:, None] < N) & (cols[None, :] < d)
    tau_v = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32) + tau
    vmem = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for t in range(T):
        base = (t * BH + bh) * N * d
        q = tl.load(q_ptr + base + rows[:, None] * d + cols[None, :], mask=row_mask, other=0.0).to(tl.float16)
        if KV_FIRST:
            kv = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)
            for m0 in range(0, N, BLOCK_M):
                m = m0 + tl.arange(0, BLOCK_M)
                m_mask = (m[:, None] < N) & (cols[None, :] < d)
                k = tl.load(k_ptr + base + m[:, None] * d + cols[None, :], mask=m_mask, other=0.0).to(tl.float16)
                v = tl.load(v_ptr + base + m[:, None] * d + cols[None, :], mask=m_mask, other=0.0).to(tl.float16)
                kv += tl.dot(tl.trans(k), v)
            kv_hi = tl.floor(kv / 2048.0)
            kv_lo = kv - kv_hi * 2048.0
            y = tl.dot(q, kv_hi.to(tl.float16)) * 2048.0 + tl.dot(q, kv_lo.to(tl.float16))
        else:
            y = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
            for m0 in range(0, N, BLOCK_M):
                m = m0 + tl.arange(0, BLOCK_M)
                m_mask = (m[:, None] < N) & (cols[None, :] < d)
                k = tl.load(k_ptr + base + m[:, None] * d + cols[None, :], mask=m_mask, other=0.0).to(tl.float16)
                v = tl.load(v_ptr + base + m[:, None] * d + cols[None, :], mask=m_mask, other=0.0).to(tl.float16)
                a = tl.dot(q, tl.trans(k))
                y += tl.dot(a.to(tl.float16), v)
        y = y * scale
        h = vmem + tl.math.div_rn(y - vmem, tau_v)
        fire = (h - v_threshold) >= 0.0
        tl.store(out_ptr + base + rows[:, None] * d + cols[None, :],
                 tl.where(fire, 1.0, 0.0).to(out_ptr.dtype.element_ty), mask=row_mask)
        vmem = tl.where(fire, 0.0, h)
