"""Spike matmul in Triton: the semantics are in :mod:`spikeops.ops.spike_matmul`.

Operands arrive packed along K (int64 words). Each program owns a [BLOCK_M, BLOCK_N] output
tile; for every word it unpacks 64 bits of each row into 0/1 fp16 tiles in registers and
accumulates ``tl.dot`` in fp32, exact for K < 2^24. (GPUs have no tensor-core popcount in
Triton; unpacking into the MMA units reads 1 bit per spike from memory and runs at tensor-core
rate.)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_M = 32
BLOCK_N = 32


def spike_matmul_packed(a_words, bt_words):
    """a_words [Bt, M, W], bt_words [Bt, N, W] int64 -> int32 [Bt, M, N]."""
    Bt, M, W = a_words.shape
    N = bt_words.shape[1]
    out = torch.empty((Bt, M, N), device=a_words.device, dtype=torch.int32)
    grid = (Bt, triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
    _spike_matmul_kernel[grid](a_words, bt_words, out, M, N, W, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
    return out


@triton.jit
def _unpack_bits(words):
    """int64 [R] -> fp16 0/1 [R, 64], bit j in column j."""
    bits = (words[:, None] >> tl.arange(0, 64).to(tl.int64)[None, :]) & 1
    return tl.where(bits != 0, 1.0, 0.0).to(tl.float16)


@triton.jit
def _spike_matmul_kernel(a_ptr, bt_ptr, out_ptr, M, N, W, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    b, pid_m, pid_n = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    a_rows = a_ptr + (b * M + rows) * W
    b_rows = bt_ptr + (b * N + cols) * W
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for w in range(W):
        a_bits = _unpack_bits(tl.load(a_rows + w, mask=rows < M, other=0))
        b_bits = _unpack_bits(tl.load(b_rows + w, mask=cols < N, other=0))
        acc += tl.dot(a_bits, tl.trans(b_bits))
    out = out_ptr + (b * M + rows[:, None]) * N + cols[None, :]
    tl.store(out, acc.to(tl.int32), mask=(rows[:, None] < M) & (cols[None, :] < N))
