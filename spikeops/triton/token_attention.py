"""Token attention / MSSA in Triton: the semantics are in :mod:`spikeops.ops.token_attention`.

Each program owns BLOCK_T tokens (rows of d channels) of the flattened ``[T, BH*N, d]`` view
and walks t with the attention neuron's potential in registers: forward sums q (and p) over
the row, steps the LIF and writes ``A * k``; backward walks t in reverse, reducing
``dout * k`` over the row into dL/dA, stepping the LIF backward and writing dL/dk = A * dout.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from spikeops.triton.pack import (clear_flag_if_any, new_binary_flag, not_binary, pack_spikes, row_bits, row_words,
                                  unpack_spikes)

BLOCK_T = 32
ALPHA = 4.0  # sigmoid surrogate of the attention neuron


def token_attention_forward(q, k, p, v_threshold, tau, save_h):
    """q, k, p [T, BH, N, d] -> (out, H [T, BH, N] fp32 and k packed [T*BH*N, ceil(d/64)] (empty
    unless save_h), all inputs 0/1: an int32 [1] flag on the device, nonzero when they are)."""
    T, BH, N, d = q.shape
    out = torch.empty_like(q)
    h = torch.empty((T, BH, N) if save_h else (0,), device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(BH * N, BLOCK_T),)
    all_binary = new_binary_flag(q.device)
    _forward_kernel[grid](
        q, k, p if p is not None else q, out, h if save_h else out, all_binary, T, BH * N, d, float(v_threshold),
        float(tau),
        HAS_P=p is not None, SAVE_H=bool(save_h), BLOCK_T=BLOCK_T, BLOCK_D=triton.next_power_of_2(d),
    )
    k_words = pack_spikes(k.view(-1, d), False)[0] if save_h else k.new_empty((0,), dtype=torch.int64)
    return out, h, k_words, all_binary


def token_attention_backward(grad_out, k_words, h, v_threshold, tau):
    """grad_out [T, BH, N, d], k packed [T*BH*N, ceil(d/64)], H [T, BH, N] -> (dL/dS [T, BH, N] fp32, dL/dk)."""
    T, BH, N, d = grad_out.shape
    k = unpack_spikes(k_words, d, grad_out.dtype).view(T, BH, N, d)
    grad_s = torch.empty((T, BH, N), device=h.device, dtype=torch.float32)
    grad_k = torch.empty_like(grad_out)
    grid = (triton.cdiv(BH * N, BLOCK_T),)
    _backward_kernel[grid](
        grad_out, k, h, grad_s, grad_k, T, BH * N, d, float(v_threshold), float(tau), ALPHA,
        BLOCK_T=BLOCK_T, BLOCK_D=triton.next_power_of_2(d),
    )
    return grad_s, grad_k


def token_attention_cf_forward(q, k, p, v_threshold, tau, save):
    """The channels-first layout: q, k, p [T, BH, d, N] contiguous -> (out, H [T, BH, N] fp32 and k
    packed along N [T*BH*d, ceil(N/64)] (empty unless save), all inputs 0/1 as token_attention_forward)."""
    T, BH, d, N = q.shape
    W = triton.cdiv(N, 64)
    out = torch.empty_like(q)
    h = torch.empty((T, BH, N) if save else (0,), device=q.device, dtype=torch.float32)
    k_words = torch.empty((T * BH * d, W) if save else (0,), device=q.device, dtype=torch.int64)
    all_binary = new_binary_flag(q.device)
    _cf_forward_kernel[(BH, W)](
        q, k, p if p is not None else q, out, h if save else out, k_words if save else all_binary, all_binary,
        T, BH, d, N, W,
        float(v_threshold), float(tau), HAS_P=p is not None, SAVE=bool(save), BLOCK_D=triton.next_power_of_2(d),
    )
    return out, h, k_words, all_binary


def token_attention_cf_backward(grad_out, k_words, h, v_threshold, tau):
    """grad_out [T, BH, d, N], k packed along N, H [T, BH, N] -> (dL/dS [T, BH, N] fp32, dL/dk)."""
    T, BH, d, N = grad_out.shape
    W = triton.cdiv(N, 64)
    grad_s = torch.empty((T, BH, N), device=h.device, dtype=torch.float32)
    grad_k = torch.empty_like(grad_out)
    _cf_backward_kernel[(BH, W)](
        grad_out, k_words, h, grad_s, grad_k, T, BH, d, N, W, float(v_threshold), float(tau), ALPHA,
        BLOCK_D=triton.next_power_of_2(d),
    )
    return grad_s, grad_k


@triton.jit
def _neuron_step(v, s, tau_v, v_threshold):
    """One step of the attention neuron (decay_input, hard reset to 0) on the sums s: (H, fire, V)."""
    h = v + tl.math.div_rn(s - v, tau_v)
    fire = (h - v_threshold) >= 0.0
    return h, fire, tl.where(fire, 0.0, h)


@triton.jit
def _neuron_backward_step(h, grad_a, gv, tau_v, v_threshold, alpha):
    """One step back (sigmoid surrogate, detach_reset): (dL/dS, dL/dV for step t - 1)."""
    dist = h - v_threshold
    e = tl.exp(-tl.abs(alpha * dist))
    sg = alpha * e / ((1.0 + e) * (1.0 + e))
    gh = grad_a * sg + gv * tl.where(dist >= 0.0, 0.0, 1.0)
    return tl.math.div_rn(gh, tau_v), gh - tl.math.div_rn(gh, tau_v)


@triton.jit
def _step_inputs(q_ptr, k_ptr, p_ptr, offs, mask, bad, HAS_P: tl.constexpr, AXIS: tl.constexpr):
    """One step's tile of k, the sum of q (+ p) over the channels (tile axis AXIS), and ``bad``
    with every value of q, k, p that is neither 0 nor 1 flagged."""
    q = tl.load(q_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    bad |= not_binary(q) | not_binary(k)
    s = tl.sum(q, axis=AXIS)
    if HAS_P:
        pv = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        bad |= not_binary(pv)
        s = s + tl.sum(pv, axis=AXIS)
    return k, s, bad


@triton.jit
def _forward_kernel(
    q_ptr, k_ptr, p_ptr, out_ptr, h_ptr, all_binary_ptr, T, R, d, v_threshold, tau,
    HAS_P: tl.constexpr, SAVE_H: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < R) & (cols[None, :] < d)
    tau_v = tl.zeros([BLOCK_T], dtype=tl.float32) + tau
    v = tl.zeros([BLOCK_T], dtype=tl.float32)
    bad = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.int32)
    for t in range(T):
        offs = (t * R + rows[:, None]) * d + cols[None, :]
        k, s, bad = _step_inputs(q_ptr, k_ptr, p_ptr, offs, mask, bad, HAS_P, 1)
        h, fire, v = _neuron_step(v, s, tau_v, v_threshold)
        if SAVE_H:
            tl.store(h_ptr + t * R + rows, h, mask=rows < R)
        tl.store(out_ptr + offs, tl.where(fire[:, None], k, 0.0).to(out_ptr.dtype.element_ty), mask=mask)
    clear_flag_if_any(all_binary_ptr, bad)


@triton.jit
def _backward_kernel(
    g_ptr, k_ptr, h_ptr, gs_ptr, gk_ptr, T, R, d, v_threshold, tau, alpha,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < R) & (cols[None, :] < d)
    tau_v = tl.zeros([BLOCK_T], dtype=tl.float32) + tau
    gv = tl.zeros([BLOCK_T], dtype=tl.float32)
    for i in range(T):
        t = T - 1 - i
        offs = (t * R + rows[:, None]) * d + cols[None, :]
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        h = tl.load(h_ptr + t * R + rows, mask=rows < R, other=0.0)
        fire = (h - v_threshold) >= 0.0
        tl.store(gk_ptr + offs, tl.where(fire[:, None], g, 0.0).to(gk_ptr.dtype.element_ty), mask=mask)
        gs, gv = _neuron_backward_step(h, tl.sum(g * k, axis=1), gv, tau_v, v_threshold, alpha)
        tl.store(gs_ptr + t * R + rows, gs, mask=rows < R)


@triton.jit
def _cf_forward_kernel(
    q_ptr, k_ptr, p_ptr, out_ptr, h_ptr, kw_ptr, all_binary_ptr, T, BH, d, N, W, v_threshold, tau,
    HAS_P: tl.constexpr, SAVE: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program: the 64 tokens of word column w of one head, over all t; a [BLOCK_D, 64] tile
    per step (channels down, tokens across), the neuron's potential per token in registers."""
    bh, w = tl.program_id(0).to(tl.int64), tl.program_id(1)
    rows = tl.arange(0, BLOCK_D)
    cols = w * 64 + tl.arange(0, 64)
    mask = (rows[:, None] < d) & (cols[None, :] < N)
    tau_v = tl.zeros([64], dtype=tl.float32) + tau
    v = tl.zeros([64], dtype=tl.float32)
    bad = tl.zeros([BLOCK_D, 64], dtype=tl.int32)
    for t in range(T):
        block = t * BH + bh
        offs = (block * d + rows[:, None]) * N + cols[None, :]
        k, s, bad = _step_inputs(q_ptr, k_ptr, p_ptr, offs, mask, bad, HAS_P, 0)
        h, fire, v = _neuron_step(v, s, tau_v, v_threshold)
        if SAVE:
            tl.store(h_ptr + block * N + cols, h, mask=cols < N)
            tl.store(kw_ptr + (block * d + rows) * W + w, row_words(k, tl.arange(0, 64)), mask=rows < d)
        tl.store(out_ptr + offs, tl.where(fire[None, :], k, 0.0).to(out_ptr.dtype.element_ty), mask=mask)
    clear_flag_if_any(all_binary_ptr, bad)


@triton.jit
def _cf_backward_kernel(
    g_ptr, kw_ptr, h_ptr, gs_ptr, gk_ptr, T, BH, d, N, W, v_threshold, tau, alpha, BLOCK_D: tl.constexpr,
):
    bh, w = tl.program_id(0).to(tl.int64), tl.program_id(1)
    rows = tl.arange(0, BLOCK_D)
    cols = w * 64 + tl.arange(0, 64)
    mask = (rows[:, None] < d) & (cols[None, :] < N)
    tau_v = tl.zeros([64], dtype=tl.float32) + tau
    gv = tl.zeros([64], dtype=tl.float32)
    for i in range(T):
        block = (T - 1 - i) * BH + bh
        offs = (block * d + rows[:, None]) * N + cols[None, :]
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        word = tl.load(kw_ptr + (block * d + rows) * W + w, mask=rows < d, other=0)
        k = row_bits(word, tl.arange(0, 64))
        h = tl.load(h_ptr + block * N + cols, mask=cols < N, other=0.0)
        fire = (h - v_threshold) >= 0.0
        tl.store(gk_ptr + offs, tl.where(fire[None, :], g, 0.0).to(gk_ptr.dtype.element_ty), mask=mask)
        gs, gv = _neuron_backward_step(h, tl.sum(g * k, axis=0), gv, tau_v, v_threshold, alpha)
        tl.store(gs_ptr + block * N + cols, gs, mask=cols < N)
