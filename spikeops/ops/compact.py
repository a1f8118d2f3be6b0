"""Keep an activation for backward in the smallest exact form: ``compact`` / ``restore``.

Spiking networks feed layers with tensors that hold few distinct values, so a custom
``torch.autograd.Function`` can save its input losslessly in much less memory:

==========================  =========================  ======================================
the input holds only        saved as                   size vs. fp32 (fp16/bf16: half these)
==========================  =========================  ======================================
0 and 1 (spikes)            bits along ``dim``         1/32, plus padding to 64 bits per row
integers 0..255 (residual   uint8                      1/4
sums of spikes)
anything else               the tensor itself          1
==========================  =========================  ======================================

Use it as::

    saved, meta = compact(x, dim=-1)      # in forward; ctx.save_for_backward(saved, ...)
    x = restore(saved, meta)              # in backward; x's values, dtype, shape and layout

The chosen form depends on the values, so it is picked eagerly: from what
:mod:`spikeops.ops.known_counts` knows about ``x`` (spikes a spikeops neuron made, sums of them)
without looking at it, else by checking the values (on a GPU a host sync; the answer is then
recorded on ``x`` as a neuron's output is, so ``x`` is checked once). The layers that use it
(:mod:`spikeops.nn.spike_layers`) take their plain PyTorch path under ``torch.compile``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from spikeops import backend as _backend
from spikeops import reference
from spikeops.ops.known_counts import MAX_BOUND, counts_bound, mark_counts
from spikeops.ops.pack import pack_words, unpack_words

COUNTS_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class CompactMeta(NamedTuple):
    """What :func:`restore` needs besides the saved tensor."""

    kind: str  # "bits" | "uint8" | "plain"
    shape: torch.Size
    dim: int
    dtype: torch.dtype
    memory_format: torch.memory_format


_MEMO = "_spikeops_compact"  # on x's root: (root version, what was compacted, the result) of the last compact


def compact(x: torch.Tensor, dim: int = -1, backend: str = "auto") -> tuple[torch.Tensor, CompactMeta]:
    """(tensor to save, meta): ``x`` bit-packed along ``dim`` if it is 0/1, as uint8 if it holds
    integers 0..255, else ``x`` itself. ``backend`` picks the packing kernel.

    The result is remembered on ``x`` (its root, while that is not modified in place): the next
    compact of the same ``x`` returns the same saved tensor, so layers fed the same input
    (Spikformer's q, k and v projections) keep one copy between them and pack it once."""
    meta = CompactMeta("plain", x.shape, dim % max(x.dim(), 1), x.dtype, memory_format(x))
    if x.numel() == 0 or x.dim() == 0 or not x.is_floating_point():
        return x, meta
    if x.is_inference():  # no version counter to tell whether x changed since
        return _compact(x, meta, backend)
    root = x if x._base is None else x._base
    key = (x.shape, x.stride(), x.storage_offset(), x.dtype, meta.dim, backend)
    memo = getattr(root, _MEMO, None)
    if memo is not None and memo[0] == root._version and memo[1] == key:
        return memo[2]
    saved, meta = _compact(x, meta, backend)
    if meta.kind != "plain":  # (the plain form is x itself: nothing to share, and no cycle x -> x)
        setattr(root, _MEMO, (root._version, key, (saved, meta)))
    return saved, meta


def _compact(x: torch.Tensor, meta: CompactMeta, backend: str) -> tuple[torch.Tensor, CompactMeta]:
    bound = counts_bound(x)  # known without looking at the values (no host sync on a GPU)
    if bound == 1:
        return pack_words(x, meta.dim, False, backend)[0], meta._replace(kind="bits")
    if bound is not None:
        return to_counts(x, False, backend)[0], meta._replace(kind="uint8")
    # checked: the answer is recorded on x (its bound), so compacting x in another form (another
    # dim) does not check it again
    words, binary = pack_words(x, meta.dim, True, backend)
    if binary:
        mark_counts(x, 1)
        return words, meta._replace(kind="bits")
    counts, integers = to_counts(x, True, backend)
    if integers:
        mark_counts(x, MAX_BOUND)
        return counts, meta._replace(kind="uint8")
    return x, meta


def to_counts(x: torch.Tensor, check: bool, backend: str = "auto") -> tuple[torch.Tensor, bool]:
    """(``x`` as uint8, whether every value is an integer 0..255; True unless ``check``): the C++
    kernel does both in one pass (ATen's cast of bf16 to uint8 alone took 7x a copy of ``x``);
    elsewhere torch's cast, then with ``check`` a comparison of the round trip (a host sync on a
    GPU). The kernel is called directly, not through a custom op: compact never runs under
    ``torch.compile`` (the layers take their plain path there)."""
    if (x.dtype in COUNTS_KERNEL_DTYPES and x.is_contiguous() and _backend.resolve(x, backend) == "cpp"
            and _backend.has_kernel("compact", "to_counts", "cpp")):
        counts, integers = _backend.kernel("compact", "to_counts", "cpp")(x)
        return counts, not check or integers
    if not check:
        return x.to(torch.uint8), True
    return reference.to_counts(x)


def restore(saved: torch.Tensor, meta: CompactMeta, backend: str = "auto") -> torch.Tensor:
    """The tensor :func:`compact` was given: same values, dtype, shape and memory format
    (channels-last stays channels-last, so backward kernels pick the same algorithm)."""
    if meta.kind == "plain":
        return saved
    if meta.kind == "bits":
        x = unpack_words(saved, meta.shape, meta.dim, meta.dtype, backend)
    else:
        x = saved.to(meta.dtype)
    return x.contiguous(memory_format=meta.memory_format)


def memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last(_3d) for a tensor laid out so (and not plainly contiguous), else contiguous_format."""
    if not x.is_contiguous():
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            return torch.channels_last
        if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
            return torch.channels_last_3d
    return torch.contiguous_format
