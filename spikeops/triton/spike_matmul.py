"""Spike matmul in Triton: the semantics are in :mod:`spikeops.ops.spike_matmul`.

The operands arrive as 0/1 floats (any strides: a transposed view costs no copy). Each program owns
a [BLOCK_M, BLOCK_N] output tile and, over K in blocks of BLOCK_K, loads the two tiles, casts them
to fp16 (0 and 1 are exact) and accumulates ``tl.dot`` in fp32: exact counts for K <= 2^24. The
same loads check that the values are 0/1 (one int32 flag, cleared by any program that finds one
that is not), so the op needs no packing pass and no separate check. GPUs have no tensor-core
popcount in Triton, and packing first (then unpacking in registers) cost a pack kernel and a host
sync per operand: on the H100 that path took 5x the time of an fp32 ``a @ b`` at the SSA shapes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from spikeops.triton.pack import clear_flag_if_any, new_binary_flag, not_binary

BLOCK_M = 32
BLOCK_N = 32
BLOCK_K = 32


def spike_matmul_spikes(a, b):
    """a [Bt, M, K], b [Bt, K, N] 0/1 floats, any strides -> (int32 [Bt, M, N], int32 [1] flag on
    the device: nonzero when every value was 0 or 1)."""
    Bt, M, K = a.shape
    N = b.shape[2]
    out = torch.empty((Bt, M, N), device=a.device, dtype=torch.int32)
    all_binary = new_binary_flag(a.device)
    grid = (Bt, triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
    _spike_matmul_kernel[grid](a, b, out, all_binary, M, N, K, *a.stride(), *b.stride(),
                               BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return out, all_binary


@triton.jit
def _spike_matmul_kernel(a_ptr, b_ptr, out_ptr, all_binary_ptr, M, N, K, sa_b, sa_m, sa_k, sb_b, sb_k, sb_n,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    bt, pid_m, pid_n = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    bad_a = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.int32)
    bad_b = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        x = tl.load(a_ptr + bt * sa_b + rows[:, None] * sa_m + ks[None, :] * sa_k,
                    mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0)
        y = tl.load(b_ptr + bt * sb_b + ks[:, None] * sb_k + cols[None, :] * sb_n,
                    mask=(ks[:, None] < K) & (cols[None, :] < N), other=0.0)
        bad_a |= not_binary(x)
        bad_b |= not_binary(y)
        acc += tl.dot(x.to(tl.float16), y.to(tl.float16))
    tl.store(out_ptr + (bt * M + rows[:, None]) * N + cols[None, :], acc.to(tl.int32),
             mask=(rows[:, None] < M) & (cols[None, :] < N))
    clear_flag_if_any(all_binary_ptr, bad_a)
    clear_flag_if_any(all_binary_ptr, bad_b)
