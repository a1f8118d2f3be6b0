"""``spikeops.convert``: swap SpikingJelly multi-step ``LIFNode`` layers for ``spikeops.nn.LIF``."""
from __future__ import annotations

import dataclasses
import warnings

from torch import nn

from spikeops.nn.lif import LIF, surrogate_spec


@dataclasses.dataclass
class ConversionReport:
    """What :func:`convert` did: ``model`` (the converted model), ``replaced`` (module names)
    and ``skipped`` (``(name, reason)`` pairs it left as they were)."""

    model: nn.Module
    replaced: list = dataclasses.field(default_factory=list)
    skipped: list = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"spikeops.convert: replaced {len(self.replaced)} LIFNode(s), skipped {len(self.skipped)}"]
        lines += [f"  replaced {name or '<root>'}" for name in self.replaced]
        lines += [f"  skipped  {name or '<root>'}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


def _from_lifnode(node, backend: str) -> LIF:
    if getattr(node, "step_mode", "s") != "m":
        raise ValueError(f"step_mode={node.step_mode!r}; only multi-step ('m') LIFNodes are converted")
    if getattr(node, "store_v_seq", False):
        raise ValueError("store_v_seq=True; spikeops.nn.LIF does not expose the membrane trace")
    surrogate, alpha = surrogate_spec(node.surrogate_function)
    return LIF(
        tau=float(node.tau),
        v_threshold=float(node.v_threshold),
        v_reset=None if node.v_reset is None else float(node.v_reset),
        decay_input=bool(node.decay_input),
        detach_reset=bool(node.detach_reset),
        surrogate=surrogate,
        alpha=alpha,
        backend=backend,
    )


def convert(model: nn.Module, backend: str = "auto") -> ConversionReport:
    """Replace every SpikingJelly ``LIFNode`` (exact class, ``step_mode="m"``) in ``model``.

    Children are replaced in place; ``report.model`` is the model to use (a new module only when
    ``model`` itself is a LIFNode). Nodes that cannot be converted (single-step, a surrogate with
    no kernel, ``store_v_seq``) are left alone and listed in ``report.skipped`` with the reason,
    and a warning says so. Without SpikingJelly installed nothing can match: the report is empty.
    """
    report = ConversionReport(model=model)
    try:
        from spikingjelly.activation_based.neuron import LIFNode
    except ImportError:
        return report

    def swap(name, node):
        try:
            new = _from_lifnode(node, backend)
        except ValueError as exc:
            report.skipped.append((name, str(exc)))
            return node
        report.replaced.append(name)
        return new

    if type(model) is LIFNode:
        report.model = swap("", model)
    else:
        for parent_name, parent in list(model.named_modules()):
            for child_name, child in list(parent.named_children()):
                if type(child) is LIFNode:
                    full = f"{parent_name}.{child_name}" if parent_name else child_name
                    setattr(parent, child_name, swap(full, child))
    if report.skipped:
        warnings.warn(str(report), stacklevel=2)
    return report
