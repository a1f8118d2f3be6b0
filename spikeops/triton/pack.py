"""Bit-packing of spikes in Triton (semantics: spikeops/reference.py, pack_spikes/unpack_spikes).

pack: each program reads a [BLOCK_R, 64] tile of x (rows x one word's elements), turns the
nonzero flags into bit weights ``1 << j`` and sums them into one int64 word per row (distinct
powers of two: the sum is the OR). It also flags any value that is neither 0 nor 1.
unpack: the inverse, ``(word >> j) & 1`` for j < 64.
The bits of a tile's rows (:func:`row_words`, :func:`row_bits`), the 0/1 test (:func:`not_binary`)
and the one-flag report of it (:func:`new_binary_flag`, :func:`clear_flag_if_any`) are shared with
the attention kernels, which pack, unpack and check the tiles they load.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_R = 32


def pack_spikes(x, check):
    """x [R, n] contiguous 0./1. -> (int64 words [R, ceil(n/64)], all values 0 or 1; True unchecked)."""
    R, n = x.shape
    W = triton.cdiv(n, 64)
    words = torch.empty((R, W), device=x.device, dtype=torch.int64)
    bad = torch.zeros((triton.cdiv(R, BLOCK_R), W), device=x.device, dtype=torch.int32) if check else words
    _pack_kernel[(triton.cdiv(R, BLOCK_R), W)](x, words, bad, R, n, W, CHECK=bool(check), BLOCK_R=BLOCK_R)
    return words, not (check and bool(bad.any()))


def unpack_spikes(words, n, dtype):
    """int64 words [R, W] contiguous -> [R, n] 0./1. of dtype."""
    R, W = words.shape
    out = torch.empty((R, n), device=words.device, dtype=dtype)
    _unpack_kernel[(triton.cdiv(R, BLOCK_R), W)](words, out, R, n, W, BLOCK_R=BLOCK_R)
    return out


@triton.jit
def _pack_kernel(x_ptr, words_ptr, bad_ptr, R, n, W, CHECK: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_r, w = tl.program_id(0), tl.program_id(1)
    rows = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = w * 64 + tl.arange(0, 64)
    mask = (rows[:, None] < R) & (cols[None, :] < n)
    x = tl.load(x_ptr + rows[:, None] * n + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(words_ptr + rows * W + w, row_words(x, tl.arange(0, 64)), mask=rows < R)
    if CHECK:
        tl.store(bad_ptr + pid_r * W + w, tl.max(tl.max(not_binary(x), axis=1), axis=0))


@triton.jit
def _unpack_kernel(words_ptr, out_ptr, R, n, W, BLOCK_R: tl.constexpr):
    pid_r, w = tl.program_id(0), tl.program_id(1)
    rows = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    word = tl.load(words_ptr + rows * W + w, mask=rows < R, other=0)
    cols = w * 64 + tl.arange(0, 64)
    mask = (rows[:, None] < R) & (cols[None, :] < n)
    spikes = row_bits(word, tl.arange(0, 64))
    tl.store(out_ptr + rows[:, None] * n + cols[None, :], spikes.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def row_words(x, bit):
    """[R, C] tile of 0/1 values (C <= 64, 0 where nothing was loaded) -> int64 [R]: bit ``bit[j]``
    set where ``x[:, j] != 0`` (bit weights ``1 << bit[j]``, distinct: their sum is the OR)."""
    weights = tl.full([1], 1, tl.int64) << bit.to(tl.int64)
    return tl.sum(tl.where(x != 0.0, weights[None, :], 0), axis=1)


@triton.jit
def row_bits(words, bit):
    """int64 [R] -> fp32 0/1 [R, C]: bit ``bit[j]`` of each word in column j."""
    bits = (words[:, None] >> bit[None, :].to(tl.int64)) & 1
    return tl.where(bits != 0, 1.0, 0.0)  # via fp32: the interpreter mis-casts int -> fp16 / bf16


def new_binary_flag(device):
    """An int32 [1] flag, 1 ("all values 0/1") until a kernel clears it (:func:`clear_flag_if_any`)."""
    return torch.ones(1, device=device, dtype=torch.int32)


@triton.jit
def not_binary(x):
    """1 where x is neither 0 nor 1 (NaN included), else 0 (int32)."""
    return ((x != 0.0) & (x != 1.0)).to(tl.int32)


@triton.jit
def clear_flag_if_any(flag_ptr, bad):
    """Sets the new_binary_flag at flag_ptr to 0 if any entry of bad [M, N] (0/1) is set."""
    tl.atomic_min(flag_ptr, 1 - tl.max(tl.max(bad, axis=1), axis=0))
