"""What autograd keeps for backward: ``spikeops.memory.saved_bytes(fn, *args, **kwargs)``.

Runs ``fn`` under :func:`torch.autograd.graph.saved_tensors_hooks` and adds up the storages of
every tensor saved for backward, each storage once (two views of one tensor, or a tensor saved
by two ops, cost its memory once). Parameters that an op saves are counted too: compare two
implementations by the difference, or subtract the weights. Tensors kept on ``ctx`` as plain
attributes (not through ``ctx.save_for_backward``) are invisible to the hooks and not counted.

Example::

    x = torch.randn(1000, requires_grad=True)
    spikeops.memory.saved_bytes(torch.exp, x)       # 4000: exp saves its output
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch


class SavedBytes(NamedTuple):
    """Bytes autograd saved for backward: ``total``, split ``by_dtype`` (each storage counted
    under the dtype of the first tensor saved on it), and the number of distinct ``storages``."""

    total: int
    by_dtype: dict
    storages: int


def saved_tensors_report(fn: Callable, *args, **kwargs) -> SavedBytes:
    """Call ``fn(*args, **kwargs)`` and report the memory of what autograd saved for backward.

    The graph built by ``fn`` stays usable (the hooks keep the saved tensors as they are), but
    its output is dropped: keep what you need from inside ``fn``.
    """
    seen: dict = {}  # storage key -> (nbytes, dtype, tensor); holding the tensor keeps the key unique

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
            key, nbytes = ("storage", storage.data_ptr()), storage.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without a storage (subclasses, sparse)
            key, nbytes = ("tensor", id(t)), t.numel() * t.element_size()
        # detached aliases, not t: a t that an op saves as its own output (exp's, a LIF's) refers
        # to the graph through its grad_fn, and the graph would hold t (and `seen`) through the
        # hook: a reference cycle through C++ that Python cannot collect, leaking every graph
        alias = t.detach()
        seen.setdefault(key, (nbytes, t.dtype, alias))
        return alias

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args, **kwargs)
    by_dtype: dict = {}
    for nbytes, dtype, _ in seen.values():
        by_dtype[dtype] = by_dtype.get(dtype, 0) + nbytes
    return SavedBytes(sum(by_dtype.values()), by_dtype, len(seen))


def saved_bytes(fn: Callable, *args, **kwargs) -> int:
    """Bytes autograd keeps for the backward of ``fn(*args, **kwargs)``, each storage counted once.

    Nothing is saved (0) when no input requires grad or under ``torch.no_grad()``.
    """
    return saved_tensors_report(fn, *args, **kwargs).total
