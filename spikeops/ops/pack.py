"""Bit-packed spikes: ``spikeops.pack_spikes`` / ``spikeops.unpack_spikes``.

64 spikes per int64 word along one dim: element ``64*w + j`` of that dim is bit ``j`` of word
``w`` (little-endian), padded with zero bits to a whole word. A ``[T, B, N, C]`` fp32 spike
tensor packed along C takes 1/32 of the memory.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from spikeops import backend as _backend
from spikeops import reference
from spikeops._validation import FLOAT_DTYPES, check_float_tensor
from spikeops.ops.op import custom_op


class PackedSpikes(NamedTuple):
    """Packed spikes: ``words`` int64 ``[..., ceil(n/64)]`` with the packed dim moved last,
    plus what :func:`unpack_spikes` needs to rebuild the original tensor."""

    words: torch.Tensor
    shape: torch.Size
    dim: int
    dtype: torch.dtype


NOT_BINARY = (
    "pack_spikes: x must hold only 0 and 1 (spikes); found another value. "
    "Pass check=False to skip this check (other values then pack as 1)."
)


@custom_op("pack_spikes")
def _pack(x: torch.Tensor, check: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x [R, n] contiguous -> (words [R, ceil(n/64)] int64, 0-d bool: all values 0 or 1 (True if not check))."""
    words, binary = _backend.kernel("pack", "pack_spikes", backend)(x, check)
    return words, torch.tensor(binary)


@_pack.register_fake
def _(x, check, backend):
    return x.new_empty((x.shape[0], -(-x.shape[1] // 64)), dtype=torch.int64), torch.empty((), dtype=torch.bool)


@custom_op("unpack_spikes")
def _unpack(words: torch.Tensor, n: int, dtype: torch.dtype, backend: str) -> torch.Tensor:
    """words [R, W] int64 contiguous -> [R, n] 0./1. of dtype."""
    return _backend.kernel("pack", "unpack_spikes", backend)(words, n, dtype)


@_unpack.register_fake
def _(words, n, dtype, backend):
    return words.new_empty((words.shape[0], n), dtype=dtype)


def pack_spikes(x: torch.Tensor, dim: int = -1, check: bool = True, backend: str = "auto") -> PackedSpikes:
    """Pack a 0/1 tensor 64 values per int64 word along ``dim``.

    Args:
        x: spikes of any shape (float32/float16/bfloat16/float64), values 0. or 1.
        dim: the dim to pack (its size need not be a multiple of 64).
        check: raise ``ValueError`` if ``x`` holds anything but 0 and 1 (a cheap pass fused into
            the kernel); ``check=False`` skips it and packs every nonzero as 1.
        backend: see :mod:`spikeops.backend`.

    Returns:
        :class:`PackedSpikes` with ``words`` int64 ``[*x.shape without dim, ceil(n/64)]``.
    """
    packed, binary = _pack_and_check(x, dim, check, backend)
    if not binary:
        raise ValueError(NOT_BINARY)
    return packed


def pack_if_binary(x: torch.Tensor, dim: int = -1, backend: str = "auto") -> Optional[PackedSpikes]:
    """:func:`pack_spikes` when ``x`` holds only 0 and 1, else ``None`` (one pass over ``x``).

    For callers that keep a cheaper copy of an activation when it happens to be spikes.
    """
    packed, binary = _pack_and_check(x, dim, True, backend)
    return packed if binary else None


def _pack_and_check(x, dim, check, backend):
    check_float_tensor("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension to pack along, got a 0-d tensor")
    if x.numel() == 0:
        raise ValueError(f"x is empty (shape {tuple(x.shape)}); nothing to pack")
    dim = _normalize_dim(dim, x.dim())
    words, binary = pack_words(x, dim, check, backend)
    return PackedSpikes(words, x.shape, dim, x.dtype), binary


def pack_words(x: torch.Tensor, dim: int, check: bool, backend: str) -> tuple[torch.Tensor, bool]:
    """(words of non-empty float ``x`` packed along ``dim`` in ``[0, x.dim())``, whether every value
    is 0 or 1, True when ``check`` is False): the work of :func:`pack_spikes` after its argument
    checks. :func:`spikeops.ops.compact.compact` calls it directly: it saves a layer's input on
    every training call, where those checks cost more host time than the kernel."""
    moved = x.movedim(dim, -1) if dim != x.dim() - 1 else x
    n = moved.shape[-1]
    chosen = _backend.resolve(x, backend)
    if chosen == "torch":
        return reference.pack_spikes(moved), not check or reference.is_binary(x)
    words, binary = _pack(moved.contiguous().view(-1, n), check, chosen)
    return words.view(*moved.shape[:-1], -1), not check or bool(binary)


def unpack_spikes(packed: PackedSpikes, dtype: torch.dtype = None, backend: str = "auto") -> torch.Tensor:
    """Rebuild the 0./1. tensor packed by :func:`pack_spikes` (its shape; ``dtype`` defaults to
    the packed tensor's)."""
    if not isinstance(packed, PackedSpikes):
        raise TypeError(f"packed must be the PackedSpikes returned by pack_spikes, got {type(packed).__name__}")
    dtype = packed.dtype if dtype is None else dtype
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be a floating dtype (float32, float16, bfloat16 or float64), got {dtype!r}")
    words, shape, dim = packed.words, torch.Size(packed.shape), packed.dim
    if not isinstance(words, torch.Tensor) or words.dtype != torch.int64:
        raise TypeError(f"packed.words must be an int64 tensor, got "
                        f"{words.dtype if isinstance(words, torch.Tensor) else type(words).__name__}")
    dim = _normalize_dim(dim, len(shape))
    n = shape[dim]
    moved_shape = shape[:dim] + shape[dim + 1:] + (n,)
    expected = moved_shape[:-1] + (-(-n // 64),)
    if n < 1 or words.shape != expected:
        raise ValueError(f"packed.words has shape {tuple(words.shape)}, but packed.shape {tuple(shape)} along dim "
                         f"{dim} needs {tuple(expected)}: not the words pack_spikes returned for that shape")
    return unpack_words(words, shape, dim, dtype, backend)


def unpack_words(words: torch.Tensor, shape: torch.Size, dim: int, dtype: torch.dtype, backend: str) -> torch.Tensor:
    """The work of :func:`unpack_spikes` after its argument checks (``dim`` in ``[0, len(shape))``),
    which :func:`spikeops.ops.compact.restore` calls directly on the words ``compact`` made."""
    n = shape[dim]
    moved_shape = shape[:dim] + shape[dim + 1:] + (n,)
    chosen = _backend.resolve_for(words.device, dtype, backend)
    if chosen == "torch":
        flat = reference.unpack_spikes(words, n, dtype)
    else:
        flat = _unpack(words.contiguous().view(-1, words.shape[-1]), n, dtype, chosen)
    out = flat.view(moved_shape)
    return out.movedim(-1, dim) if dim != len(shape) - 1 else out


def word_rows(x: torch.Tensor) -> Optional[torch.Tensor]:
    """Contiguous ``x`` as the ``[R, n]`` view whose rows are its smallest trailing block of a whole
    number of 64-bit words (``[N, C, L]`` with 64 | L: rows of L; 64 | C L: rows of C L), or None
    when there is none. Packed along those rows, x needs no padding and no transposing copy."""
    n = 1
    for size in reversed(x.shape[1:]):
        n *= size
        if n % 64 == 0:
            return x.view(-1, n)
    return None


def _normalize_dim(dim: int, ndim: int) -> int:
    if not -ndim <= dim < ndim:
        raise ValueError(f"dim must be in [{-ndim}, {ndim - 1}] for a {ndim}-d tensor, got {dim}")
    return dim % ndim
