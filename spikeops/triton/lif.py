"""Fused multi-step LIF in Triton: the math is in :mod:`spikeops.ops.lif`.

Each program owns BLOCK neurons and walks all T steps with the membrane potential in
registers: forward reads X once and writes S (and H for backward) once; backward walks
t = T-1 .. 0 reading dL/dS and H and writing dL/dX. Divisions use round-to-nearest
(``div_rn``) so spikes equal the CPU reference bit for bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024
NUM_WARPS = 4
# spikeops.ops.lif.SURROGATE_IDS; constexpr: compiled kernels read only constexpr globals
SIGMOID, ATAN = tl.constexpr(0), tl.constexpr(1)


def lif_forward(x, tau, v_threshold, v_reset, hard_reset, decay_input, save_h, state_bf16):
    """x [T, N] contiguous -> (spikes [T, N] in x's dtype, state [T, N] or an empty tensor): H in
    fp32, or H - v_threshold in bf16 (-0 made +0: the sign bit is the spike)."""
    T, N = x.shape
    spikes = torch.empty_like(x)
    state_dtype = torch.bfloat16 if state_bf16 else torch.float32
    h = torch.empty((T, N) if save_h else (0,), device=x.device, dtype=state_dtype)
    grid = (triton.cdiv(N, BLOCK),)
    _lif_forward_kernel[grid](
        x, spikes, h if save_h else spikes, T, N, float(tau), float(v_threshold),
        float(v_reset) if hard_reset else 0.0,
        HARD=bool(hard_reset), DECAY_INPUT=bool(decay_input), SAVE_H=bool(save_h),
        STATE_BF16=bool(state_bf16), WRITE_S=True, BLOCK=BLOCK, num_warps=NUM_WARPS,
    )
    return spikes, h


def lif_state(x, tau, v_threshold, v_reset, hard_reset, decay_input):
    """x [T, N] contiguous -> the fp32 state H [T, N] alone, as lif_forward computes it (no spikes)."""
    T, N = x.shape
    h = torch.empty((T, N), device=x.device, dtype=torch.float32)
    _lif_forward_kernel[(triton.cdiv(N, BLOCK),)](
        x, h, h, T, N, float(tau), float(v_threshold), float(v_reset) if hard_reset else 0.0,
        HARD=bool(hard_reset), DECAY_INPUT=bool(decay_input), SAVE_H=True, STATE_BF16=False, WRITE_S=False,
        BLOCK=BLOCK, num_warps=NUM_WARPS,
    )
    return h


def lif_backward_from_input(grad_spikes, x, tau, v_threshold, v_reset, hard_reset, decay_input, detach_reset, surrogate,
                            alpha):
    """grad_spikes, the forward's input x [T, N] -> grad_x [T, N]: lif_state then lif_backward (the C++
    twin keeps H per chunk of neurons; Triton has no per-program scratch for it, so H goes through
    memory as before)."""
    h = lif_state(x, tau, v_threshold, v_reset, hard_reset, decay_input)
    return lif_backward(grad_spikes, h, tau, v_threshold, v_reset, hard_reset, decay_input, detach_reset, surrogate,
                        alpha)


def lif_backward(grad_spikes, h, tau, v_threshold, v_reset, hard_reset, decay_input, detach_reset, surrogate, alpha):
    """grad_spikes [T, N], state [T, N] from lif_forward -> grad_x [T, N] in grad_spikes' dtype."""
    T, N = grad_spikes.shape
    grad_x = torch.empty_like(grad_spikes)
    grid = (triton.cdiv(N, BLOCK),)
    _lif_backward_kernel[grid](
        grad_spikes, h, grad_x, T, N, (T - 1) * N, float(tau), float(v_threshold),
        float(v_reset) if hard_reset else 0.0, float(alpha),
        HARD=bool(hard_reset), DECAY_INPUT=bool(decay_input), DETACH_RESET=bool(detach_reset),
        SURROGATE=int(surrogate), STATE_BF16=h.dtype == torch.bfloat16, BLOCK=BLOCK, num_warps=NUM_WARPS,
    )
    return grad_x


@triton.jit
def _lif_forward_kernel(
    x_ptr, s_ptr, h_ptr, T, N, tau, v_threshold, v_reset,
    HARD: tl.constexpr, DECAY_INPUT: tl.constexpr, SAVE_H: tl.constexpr, STATE_BF16: tl.constexpr,
    WRITE_S: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    v = tl.zeros([BLOCK], dtype=tl.float32) + v_reset
    for _ in range(T):
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if DECAY_INPUT:
            h = v + tl.math.div_rn(x - (v - v_reset), tl.zeros_like(v) + tau)
        else:
            h = v - tl.math.div_rn(v - v_reset, tl.zeros_like(v) + tau) + x
        fire = (h - v_threshold) >= 0.0
        if WRITE_S:
            tl.store(s_ptr + offs, tl.where(fire, 1.0, 0.0).to(s_ptr.dtype.element_ty), mask=mask)
            s_ptr += N
        if SAVE_H:
            if STATE_BF16:
                tl.store(h_ptr + offs, ((h - v_threshold) + 0.0).to(tl.bfloat16), mask=mask)
            else:
                tl.store(h_ptr + offs, h, mask=mask)
            h_ptr += N
        if HARD:  # the reference's S r + (1 - S) H: NaN (not r) after H = +Inf
            v = tl.where(fire, v_reset + 0.0 * h, h)
        else:
            v = tl.where(fire, h - v_threshold, h)
        x_ptr += N


@triton.jit
def _lif_backward_kernel(
    gs_ptr, h_ptr, gx_ptr, T, N, last_offset, tau, v_threshold, v_reset, alpha,
    HARD: tl.constexpr, DECAY_INPUT: tl.constexpr, DETACH_RESET: tl.constexpr,
    SURROGATE: tl.constexpr, STATE_BF16: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    gs_ptr += last_offset
    h_ptr += last_offset
    gx_ptr += last_offset
    tau_v = tl.zeros([BLOCK], dtype=tl.float32) + tau
    gv = tl.zeros([BLOCK], dtype=tl.float32)
    for _ in range(T):
        state = tl.load(h_ptr + offs, mask=mask, other=0.0)
        gs = tl.load(gs_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if STATE_BF16:
            d = state.to(tl.float32)
        else:
            d = (state - v_threshold) + 0.0  # -0 -> +0: the spike is "sign bit clear"
        gx, gv = lif_grad_step(d, gs, gv, tau_v, v_threshold, v_reset, alpha,
                               HARD, DECAY_INPUT, DETACH_RESET, SURROGATE)
        tl.store(gx_ptr + offs, gx.to(gx_ptr.dtype.element_ty), mask=mask)
        gs_ptr -= N
        h_ptr -= N
        gx_ptr -= N


@triton.jit
def lif_grad_step(
    d, gs, gv, tau_v, v_threshold, v_reset, alpha,
    HARD: tl.constexpr, DECAY_INPUT: tl.constexpr, DETACH_RESET: tl.constexpr, SURROGATE: tl.constexpr,
):
    """One backward step of the neuron (also the SSA backward's): d = H - v_threshold with -0 made +0,
    gs = dL/dS, gv = dL/dV from step t + 1, tau_v = tau broadcast -> (dL/dX, dL/dV for step t - 1)."""
    fire = tl.where(d.to(tl.int32, bitcast=True) >= 0, 1.0, 0.0)
    if SURROGATE == SIGMOID:
        e = tl.exp(-tl.abs(alpha * d))
        sg = alpha * e / ((1.0 + e) * (1.0 + e))
    else:
        z = 1.5707963267948966 * alpha * d
        sg = alpha / 2.0 / (1.0 + z * z)
    if HARD:
        if DETACH_RESET:
            dv_dh = 1.0 - fire
        else:
            dv_dh = (1.0 - fire) + ((v_reset - v_threshold) - d) * sg
    else:
        if DETACH_RESET:
            dv_dh = tl.zeros_like(d) + 1.0
        else:
            dv_dh = 1.0 - v_threshold * sg
    gh = gs * sg + gv * dv_dh
    if DECAY_INPUT:
        gx = tl.math.div_rn(gh, tau_v)
    else:
        gx = gh
    return gx, gh - tl.math.div_rn(gh, tau_v)
