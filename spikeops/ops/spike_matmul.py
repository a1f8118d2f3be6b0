"""``spikeops.spike_matmul``: exact product of 0/1 matrices.

``out[..., m, n] = sum_k a[..., m, k] * b[..., k, n]`` for a, b holding only 0 and 1, counted
exactly. C++: both are packed along K (64 spikes per int64 word, :mod:`spikeops.ops.pack`, which
also checks the values) and each output is the popcount of the AND of two packed rows. Triton: one
kernel takes the 0/1 floats straight into fp16 tensor-core products with fp32 accumulation and
checks the values as it loads them (:mod:`spikeops.triton.spike_matmul`). Not differentiable (an
integer count); for training use :func:`spikeops.ssa`.
"""
from __future__ import annotations

import torch

from spikeops import backend as _backend
from spikeops import reference
from spikeops._validation import check_binary, check_float_tensor
from spikeops.ops.known_counts import counts_bound
from spikeops.ops.op import custom_op
from spikeops.ops.pack import pack_if_binary

MAX_K = 2**31 - 1  # the counts are int32 (every backend, and the reference)
MAX_K_TRITON = 2**24  # the Triton kernel accumulates in fp32: integers are exact up to 2^24
OUT_DTYPES = (torch.int32, torch.float32, torch.float16, torch.bfloat16, torch.float64)


@custom_op("spike_matmul_spikes")
def _spike_matmul_spikes(a: torch.Tensor, b: torch.Tensor, check: bool, backend: str) -> torch.Tensor:
    """a [Bt, M, K], b [Bt, K, N] (any strides) -> int32 [Bt, M, N] in one kernel, which also finds
    out whether the values are 0/1; ``check``: raise unless they are (reading that back is a host
    sync on a GPU, skipped for inputs known to be spikes)."""
    out, binary = _backend.kernel("spike_matmul", "spike_matmul_spikes", backend)(a, b)
    if check and not bool(binary):  # name the culprit (error path only)
        check_binary("spike_matmul", (("a", a), ("b", b)))
        raise ValueError("spike_matmul: a and b must hold only 0 and 1 (spikes)")
    return out


@_spike_matmul_spikes.register_fake
def _(a, b, check, backend):
    return a.new_empty((a.shape[0], a.shape[1], b.shape[2]), dtype=torch.int32)


@custom_op("spike_matmul_packed")
def _spike_matmul_packed(a_words: torch.Tensor, bt_words: torch.Tensor, backend: str) -> torch.Tensor:
    """a_words [Bt, M, W], bt_words [Bt, N, W] (packed along K) -> int32 [Bt, M, N]."""
    return _backend.kernel("spike_matmul", "spike_matmul_packed", backend)(a_words, bt_words)


@_spike_matmul_packed.register_fake
def _(a_words, bt_words, backend):
    return a_words.new_empty((a_words.shape[0], a_words.shape[1], bt_words.shape[1]), dtype=torch.int32)


def spike_matmul(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype = torch.int32, backend: str = "auto") -> torch.Tensor:
    """Exact ``a @ b`` for spike tensors.

    Args:
        a: ``[..., M, K]`` holding only 0 and 1 (any float dtype).
        b: ``[..., K, N]`` holding only 0 and 1, same dtype and device; batch dims broadcast.
        out_dtype: ``torch.int32`` (default) or a float dtype for the counts.
        backend: see :mod:`spikeops.backend`.

    Returns:
        ``[..., M, N]`` counts in ``out_dtype``. Raises ``ValueError`` if a or b is not binary, or
        if K exceeds what int32 counts hold (2^31 - 1; 2^24 for ``backend="triton"``, whose fp32
        accumulation is exact only that far: ``"auto"`` then uses the reference).
    """
    check_float_tensor("a", a)
    check_float_tensor("b", b)
    if a.dim() < 2 or b.dim() < 2:
        raise ValueError(f"a and b must be at least 2-d [..., M, K] and [..., K, N], got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"a's last dim (K={a.shape[-1]}) must equal b's second-to-last dim ({b.shape[-2]})")
    if a.device != b.device or a.dtype != b.dtype:
        raise ValueError(f"a and b must share device and dtype, got {a.device}/{a.dtype} and {b.device}/{b.dtype}")
    if a.numel() == 0 or b.numel() == 0:
        raise ValueError(f"a and b must be non-empty, got {tuple(a.shape)} and {tuple(b.shape)}")
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    try:
        batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except RuntimeError:
        raise ValueError(f"the batch dims of a {tuple(a.shape[:-2])} and b {tuple(b.shape[:-2])} "
                         "do not broadcast") from None
    K = a.shape[-1]
    if K > MAX_K:
        raise ValueError(f"a's K={K} is too large: the counts are int32, so K must be <= {MAX_K}")
    a = a.expand(*batch, *a.shape[-2:])
    b = b.expand(*batch, *b.shape[-2:])
    chosen = _backend.resolve(a, backend)
    if chosen == "triton" and K > MAX_K_TRITON:  # fp32 accumulation: exact counts up to 2^24 only
        if backend != "auto":
            raise ValueError(f"backend='triton' counts exactly only for K <= 2^24 (fp32 accumulation), got a's "
                             f"K={K}; use backend='torch'")
        chosen = "torch"
    if chosen == "torch":
        check_binary("spike_matmul", (("a", a), ("b", b)))
        return reference.spike_matmul(a, b).to(out_dtype)
    M, N = a.shape[-2], b.shape[-1]
    if _backend.has_kernel("spike_matmul", "spike_matmul_spikes", chosen):  # Triton: no packing pass
        check = counts_bound(a) != 1 or counts_bound(b) != 1  # not known spikes: the kernel's check is read
        out = _spike_matmul_spikes(a.reshape(-1, M, K), b.reshape(-1, K, N), check, chosen)
        return out.view(*batch, M, N).to(out_dtype)
    packed = []
    for name, x, dim in (("a", a, -1), ("b", b, -2)):
        p = pack_if_binary(x, dim=dim, backend=chosen)
        if p is None:
            raise ValueError(f"{name} must hold only 0 and 1 (spikes); spike_matmul is exact only for spikes")
        packed.append(p.words.reshape(-1, p.words.shape[-2], p.words.shape[-1]))
    out = _spike_matmul_packed(packed[0], packed[1], chosen)
    return out.view(*batch, M, N).to(out_dtype)
