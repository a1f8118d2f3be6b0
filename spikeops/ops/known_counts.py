"""Tensors known to hold only small non-negative integers because spikeops made them:
``mark_counts`` / ``counts_bound`` / ``add_counts`` / ``same_counts``.

Layers that keep their input compactly for backward (:func:`spikeops.ops.compact.compact`) and
the attention ops check that their inputs are 0/1 spikes. On a GPU every such check is a host
sync: the answer decides what is saved, so the CPU waits for the GPU (a Spikformer V2 training step
made ~90 of them). A spike tensor that a spikeops neuron has just written needs no check, and
neither does the sum of two such tensors, whose bound is the sum of theirs. This module records
that knowledge on the tensor itself (as does :func:`spikeops.ops.compact.compact` after it has
checked a tensor's values, so the next layer given the same tensor does not check again), so it is
never wrong:

- the record lives on the tensor a neuron returned (its root: ``x._base`` for a view) together
  with that tensor's version counter. Every view shares the counter and every in-place write
  bumps it, so a tensor written to after it was marked is no longer known (it is checked again);
- a view in another dtype (``x.view(torch.int16)``) is not known; a detached tensor or a copy
  is not known unless the op that made it marks it (``same_counts``);
- the one write the version counter misses is one through ``x.data`` (``x.data.mul_(2)``), as
  for autograd's own saved-tensor checks: do not modify spikes that way;
- under ``torch.compile`` nothing is recorded or known (the compiled layers never check), nor
  for inference tensors (``torch.inference_mode``: they have no version counter).

``counts_bound(x)`` is 1 for spikes, ``k`` for integers ``0..k`` (e.g. Spikformer's residual sums
of spikes), ``None`` when nothing is known: callers then check the values as before.
"""
from __future__ import annotations

from typing import Optional

import torch

MAX_BOUND = 255  # the largest value compact's uint8 form holds; larger sums are not recorded
_ATTR = "_spikeops_counts"  # (version counter when marked, bound, dtype) on the root tensor


def _root(x: torch.Tensor) -> torch.Tensor:
    return x if x._base is None else x._base


def mark_counts(x: torch.Tensor, bound: int = 1) -> torch.Tensor:
    """Record that ``x`` holds only integers ``0..bound`` (``bound=1``: spikes) and return it.

    For ops whose output is such a tensor by construction (a neuron's spikes); not a check.
    Views of ``x`` are known too (a subset of the values keeps the bound); a partial view of a
    larger tensor is not recorded.
    """
    if torch.compiler.is_compiling() or not 1 <= bound <= MAX_BOUND or not x.is_floating_point() or x.is_inference():
        return x
    root = _root(x)
    if root.dtype == x.dtype and root.numel() == x.numel():  # x is all of root (a partial view is not recorded)
        setattr(root, _ATTR, (root._version, int(bound), x.dtype))
    return x


def counts_bound(x: torch.Tensor) -> Optional[int]:
    """``k`` if ``x`` is known to hold only integers ``0..k`` (1: spikes), else ``None``."""
    if torch.compiler.is_compiling() or x.is_inference():
        return None
    root = _root(x)
    record = getattr(root, _ATTR, None)
    if record is None:
        return None
    version, bound, dtype = record
    return bound if version == root._version and x.dtype == dtype else None


def add_counts(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a + b``, known to hold integers ``0..(bound_a + bound_b)`` when both bounds are known
    (e.g. a residual stream of spikes: ``x = add_counts(x, block(x))``)."""
    out = a + b
    ka, kb = counts_bound(a), counts_bound(b)
    if ka is not None and kb is not None and out.dtype == a.dtype == b.dtype:
        mark_counts(out, ka + kb)
    return out


def same_counts(src: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` (made of ``src``'s values: a copy, transposing copy, cast to another floating dtype,
    or a selection such as max-pooling), known to keep ``src``'s bound if that is known. Returns ``out``."""
    bound = counts_bound(src)
    if bound is not None and out is not src:
        mark_counts(out, bound)
    return out
