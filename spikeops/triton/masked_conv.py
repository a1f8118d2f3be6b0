"""Masked (block-sparse) convolution in Triton: the semantics are in :mod:`spikeops.ops.masked_conv`.

Same functions and arguments as the C++ kernels (``csrc/cpu/masked_conv.cpp``). ``blocks``
``[nb, 3]`` int32 lists the visible ``bh x bw`` output blocks as (n, by, bx); visible pixel
``p = (b * bh + py) * bw + px``. ``masked_gather`` / ``masked_scatter`` move the visible blocks
between ``[N, C, H, W]`` and a channels-last ``[nb, C, bh, bw]`` (= ``[P, C]``; zero fill). The conv kernels are implicit
GEMMs over the list of visible pixels: nothing is computed, read or written for masked blocks
except the output's zero fill, and no im2col buffer is materialised.

* forward: a program owns ``BLOCK_CO`` output channels x ``BLOCK_P`` visible pixels and walks
  ``K = C_in * kh * kw`` in ``BLOCK_K`` steps, loading the weight tile and the input tile at the
  addresses im2col would have read (zero outside the image), ``acc += W @ X`` (``tl.dot``; fp32
  inputs follow torch's convolution setting: TF32 while ``torch.backends.cudnn.allow_tf32`` is on,
  torch's default and what cuDNN's dense convolutions use (~1e-3 relative), else
  ``input_precision="ieee"``, ~1e-6 of the fp32 reference). It stores ``acc (+ bias)`` at the visible pixels of an output zero-filled beforehand.
* dW (and db): a program owns a ``BLOCK_CO x BLOCK_K`` tile of ``dW = G @ cols^T`` and walks its
  share of P (split over a third grid axis; the partial sums are added in fp32 afterwards, so
  the result does not depend on scheduling); the ``k``-tile-0 programs also sum G for db.
* dx: one launch per kernel tap (dy, dx): ``dx[.., oy*s + dy - p, ox*s + dx - p] += W_tap^T @ G``.
  Within one tap distinct output pixels map to distinct input pixels, so a launch's
  read-add-store never races; the taps run one after another on the stream (no atomics,
  deterministic). Only the receptive fields of visible blocks are touched; the rest stays 0.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Tile sizes. The interpreter (tests on CPU) runs each program as numpy ops: fewer, larger tiles.
BLOCK_P = 256 if _INTERPRET else 64
BLOCK_C = 32
BLOCK_K = 32
GATHER_BLOCK_C = 16


def _ieee(dtype) -> bool:
    """Dot in fp32 with input_precision="ieee": fp32 inputs when torch does not allow TF32 in
    convolutions (``torch.backends.cudnn.allow_tf32``, on by default: then the dots run in TF32, as
    cuDNN runs nn.Conv2d), and fp32 / bf16 under the interpreter, whose bf16 ``tl.dot`` is wrong
    (fp16/bf16 on a GPU: native dot, fp32 accumulation)."""
    if _INTERPRET:
        return dtype in (torch.float32, torch.bfloat16)
    return dtype == torch.float32 and not torch.backends.cudnn.allow_tf32


def _blocks_ok(blocks):
    assert blocks.dtype == torch.int32 and blocks.dim() == 2 and blocks.shape[1] == 3 and blocks.is_contiguous()


def masked_gather(x, blocks, bh, bw):
    """x [N, C, H, W] contiguous -> the visible blocks [nb, C, bh, bw], channels last (= [P, C])."""
    _blocks_ok(blocks)
    N, C, H, W = x.shape
    P = blocks.shape[0] * bh * bw
    out = torch.empty((blocks.shape[0], C, bh, bw), device=x.device, dtype=x.dtype,
                      memory_format=torch.channels_last)
    if P:
        grid = (triton.cdiv(P, BLOCK_P), triton.cdiv(C, GATHER_BLOCK_C))
        _gather_kernel[grid](x, blocks, out, P, C, H, W, BH=bh, BW=bw, BLOCK_P=BLOCK_P, BLOCK_C=GATHER_BLOCK_C)
    return out


def masked_scatter(src, blocks, N, H, W):
    """src [nb, C, bh, bw] channels last -> [N, C, H, W]: src at the visible blocks, exactly 0 elsewhere."""
    _blocks_ok(blocks)
    assert src.is_contiguous(memory_format=torch.channels_last)
    nb, C, bh, bw = src.shape
    P = nb * bh * bw
    out = torch.zeros((N, C, H, W), device=src.device, dtype=src.dtype)
    if P:
        grid = (triton.cdiv(P, BLOCK_P), triton.cdiv(C, GATHER_BLOCK_C))
        _scatter_kernel[grid](src, blocks, out, P, C, H, W, BH=bh, BW=bw, BLOCK_P=BLOCK_P, BLOCK_C=GATHER_BLOCK_C)
    return out


def masked_conv2d_forward(x, weight, bias, blocks, sh, sw, ph, pw, bh, bw, Ho, Wo):
    """conv2d(x, weight, bias, stride, padding) at the visible blocks of [N, C_out, Ho, Wo], 0 elsewhere."""
    _blocks_ok(blocks)
    N, C, H, W = x.shape
    C_out, _, kh, kw = weight.shape
    P = blocks.shape[0] * bh * bw
    out = torch.zeros((N, C_out, Ho, Wo), device=x.device, dtype=x.dtype)
    if P:
        grid = (triton.cdiv(P, BLOCK_P), triton.cdiv(C_out, BLOCK_C))
        _forward_kernel[grid](
            x, weight, bias if bias is not None else weight, blocks, out,
            P, C, H, W, C_out, Ho, Wo, C * kh * kw, sh, sw, ph, pw,
            KH=kh, KW=kw, BH=bh, BW=bw, HAS_BIAS=bias is not None, IEEE=_ieee(x.dtype),
            BLOCK_P=BLOCK_P, BLOCK_CO=BLOCK_C, BLOCK_K=BLOCK_K,
        )
    return out


def masked_conv2d_backward(grad_out, x, weight, blocks, sh, sw, ph, pw, bh, bw, H, W, need_x, need_w, need_b):
    """-> (dx [N, C, H, W], dW, db), each empty when not needed; x may be empty when not need_w."""
    _blocks_ok(blocks)
    N, C_out, Ho, Wo = grad_out.shape
    _, C, kh, kw = weight.shape
    K = C * kh * kw
    P = blocks.shape[0] * bh * bw
    dev, dtype = grad_out.device, grad_out.dtype
    ieee = _ieee(dtype)
    gx, gw, gb = (torch.empty((0,), device=dev, dtype=dtype) for _ in range(3))  # distinct: outputs must not alias
    if need_x:
        acc = torch.zeros((N, C, H, W), device=dev, dtype=torch.float32)
        if P:
            grid = (triton.cdiv(P, BLOCK_P), triton.cdiv(C, BLOCK_C))
            for tap in range(kh * kw):  # one launch per tap: no two programs add into one pixel
                _dx_kernel[grid](
                    grad_out, weight, blocks, acc, P, C, H, W, C_out, Ho, Wo, tap // kw, tap % kw, sh, sw, ph, pw,
                    KH=kh, KW=kw, BH=bh, BW=bw, IEEE=ieee, BLOCK_P=BLOCK_P, BLOCK_CI=BLOCK_C, BLOCK_CO=BLOCK_K,
                )
        gx = acc.to(dtype)
    if need_w or need_b:
        split = max(1, min(64, triton.cdiv(P, 4096)))
        per_split = triton.cdiv(triton.cdiv(P, split), BLOCK_P) * BLOCK_P if P else BLOCK_P
        split = triton.cdiv(P, per_split) if P else 1
        dw = torch.zeros((split, C_out, K), device=dev, dtype=torch.float32)
        db = torch.zeros((split, C_out), device=dev, dtype=torch.float32)
        if P:
            grid = (triton.cdiv(C_out, BLOCK_C), triton.cdiv(K, BLOCK_K) if need_w else 1, split)
            _dw_kernel[grid](
                grad_out, x if need_w else grad_out, blocks, dw, db, P, per_split, C, H, W, C_out, Ho, Wo, K,
                sh, sw, ph, pw, KH=kh, KW=kw, BH=bh, BW=bw, NEED_W=bool(need_w), NEED_B=bool(need_b), IEEE=ieee,
                BLOCK_P=BLOCK_P, BLOCK_CO=BLOCK_C, BLOCK_K=BLOCK_K,
            )
        if need_w:
            gw = dw.sum(0).view(C_out, C, kh, kw).to(dtype)
        if need_b:
            gb = db.sum(0).to(dtype)
    return gx, gw, gb


@triton.jit
def _pixels(blk_ptr, p, P, BH: tl.constexpr, BW: tl.constexpr):
    """(n, oy, ox, valid) of visible pixels p."""
    pm = p < P
    b = p // (BH * BW)
    r = p % (BH * BW)
    n = tl.load(blk_ptr + b * 3, mask=pm, other=0).to(tl.int64)
    oy = tl.load(blk_ptr + b * 3 + 1, mask=pm, other=0) * BH + r // BW
    ox = tl.load(blk_ptr + b * 3 + 2, mask=pm, other=0) * BW + r % BW
    return n, oy, ox, pm


@triton.jit
def _block_offsets(p, c, C, BH: tl.constexpr, BW: tl.constexpr):
    """Offsets of (c, p) in a channels-last [nb, C, BH, BW] tensor (= [P, C])."""
    return p[None, :].to(tl.int64) * C + c[:, None]


@triton.jit
def _gather_kernel(x_ptr, blk_ptr, dst_ptr, P, C, H, W,
                   BH: tl.constexpr, BW: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n, oy, ox, pm = _pixels(blk_ptr, p, P, BH, BW)
    m = (c[:, None] < C) & pm[None, :]
    v = tl.load(x_ptr + ((n[None, :] * C + c[:, None]) * H + oy[None, :]) * W + ox[None, :], mask=m, other=0.0)
    tl.store(dst_ptr + _block_offsets(p, c, C, BH, BW), v, mask=m)


@triton.jit
def _scatter_kernel(src_ptr, blk_ptr, out_ptr, P, C, H, W,
                    BH: tl.constexpr, BW: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n, oy, ox, pm = _pixels(blk_ptr, p, P, BH, BW)
    m = (c[:, None] < C) & pm[None, :]
    v = tl.load(src_ptr + _block_offsets(p, c, C, BH, BW), mask=m, other=0.0)
    tl.store(out_ptr + ((n[None, :] * C + c[:, None]) * H + oy[None, :]) * W + ox[None, :], v, mask=m)


@triton.jit
def _forward_kernel(
    x_ptr, w_ptr, b_ptr, blk_ptr, out_ptr, P, C, H, W, C_out, Ho, Wo, K, SH, SW, PH, PW,
    KH: tl.constexpr, KW: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_K: tl.constexpr,
):
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    co = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    n, oy, ox, pm = _pixels(blk_ptr, p, P, BH, BW)
    cm = co < C_out
    iy0 = oy * SH - PH
    ix0 = ox * SW - PW
    acc = tl.zeros((BLOCK_CO, BLOCK_P), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        km = k < K
        c = k // (KH * KW)
        t = k % (KH * KW)
        iy = iy0[None, :] + (t // KW)[:, None]
        ix = ix0[None, :] + (t % KW)[:, None]
        valid = km[:, None] & pm[None, :] & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
        xt = tl.load(x_ptr + ((n[None, :] * C + c[:, None]) * H + iy) * W + ix, mask=valid, other=0.0)
        wt = tl.load(w_ptr + co[:, None] * K + k[None, :], mask=cm[:, None] & km[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(wt.to(tl.float32), xt.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(wt, xt, acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + co, mask=cm, other=0.0).to(tl.float32)[:, None]
    offs = ((n[None, :] * C_out + co[:, None]) * Ho + oy[None, :]) * Wo + ox[None, :]
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=cm[:, None] & pm[None, :])


@triton.jit
def _dw_kernel(
    g_ptr, x_ptr, blk_ptr, dw_ptr, db_ptr, P, P_SPLIT, C, H, W, C_out, Ho, Wo, K, SH, SW, PH, PW,
    KH: tl.constexpr, KW: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, NEED_W: tl.constexpr,
    NEED_B: tl.constexpr, IEEE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_K: tl.constexpr,
):
    co = tl.program_id(0) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    split = tl.program_id(2)
    cm = co < C_out
    km = k < K
    c = k // (KH * KW)
    t = k % (KH * KW)
    acc = tl.zeros((BLOCK_CO, BLOCK_K), dtype=tl.float32)
    bacc = tl.zeros((BLOCK_CO,), dtype=tl.float32)
    p_begin = split * P_SPLIT
    for p0 in range(0, P_SPLIT, BLOCK_P):
        p = p_begin + p0 + tl.arange(0, BLOCK_P)
        n, oy, ox, pm = _pixels(blk_ptr, p, P, BH, BW)
        g = tl.load(g_ptr + ((n[None, :] * C_out + co[:, None]) * Ho + oy[None, :]) * Wo + ox[None, :],
                    mask=cm[:, None] & pm[None, :], other=0.0)  # [BLOCK_CO, BLOCK_P]
        if NEED_B:
            bacc += tl.sum(g.to(tl.float32), axis=1)
        if NEED_W:
            iy = (oy * SH - PH)[:, None] + (t // KW)[None, :]
            ix = (ox * SW - PW)[:, None] + (t % KW)[None, :]
            valid = pm[:, None] & km[None, :] & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
            xt = tl.load(x_ptr + ((n[:, None] * C + c[None, :]) * H + iy) * W + ix, mask=valid, other=0.0)
            if IEEE:
                acc = tl.dot(g.to(tl.float32), xt.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(g, xt, acc)
    if NEED_W:
        tl.store(dw_ptr + (split * C_out + co[:, None]).to(tl.int64) * K + k[None, :], acc,
                 mask=cm[:, None] & km[None, :])
    if NEED_B:
        tl.store(db_ptr + split * C_out + co, bacc, mask=cm & ((co * 0 + tl.program_id(1)) == 0))


@triton.jit
def _dx_kernel(
    g_ptr, w_ptr, blk_ptr, dx_ptr, P, C, H, W, C_out, Ho, Wo, DY, DX, SH, SW, PH, PW,
    KH: tl.constexpr, KW: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr,
):
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    ci = tl.program_id(1) * BLOCK_CI + tl.arange(0, BLOCK_CI)
    n, oy, ox, pm = _pixels(blk_ptr, p, P, BH, BW)
    cim = ci < C
    acc = tl.zeros((BLOCK_CI, BLOCK_P), dtype=tl.float32)
    for co0 in range(0, C_out, BLOCK_CO):
        co = co0 + tl.arange(0, BLOCK_CO)
        com = co < C_out
        wt = tl.load(w_ptr + ((co[None, :] * C + ci[:, None]) * KH + DY) * KW + DX,
                     mask=cim[:, None] & com[None, :], other=0.0)  # [BLOCK_CI, BLOCK_CO]
        g = tl.load(g_ptr + ((n[None, :] * C_out + co[:, None]) * Ho + oy[None, :]) * Wo + ox[None, :],
                    mask=com[:, None] & pm[None, :], other=0.0)  # [BLOCK_CO, BLOCK_P]
        if IEEE:
            acc = tl.dot(wt.to(tl.float32), g.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(wt, g, acc)
    iy = oy * SH + DY - PH
    ix = ox * SW + DX - PW
    valid = cim[:, None] & (pm & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W))[None, :]
    offs = ((n[None, :] * C + ci[:, None]) * H + iy[None, :]) * W + ix[None, :]
    old = tl.load(dx_ptr + offs, mask=valid, other=0.0)
    tl.store(dx_ptr + offs, old + acc, mask=valid)
