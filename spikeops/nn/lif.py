"""``spikeops.nn.LIF``: a multi-step LIF layer, drop-in for SpikingJelly's ``LIFNode(step_mode="m")``."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from spikeops import backend as _backend
from spikeops.ops.lif import STATE_DTYPES, lif, lif_params


def surrogate_spec(surrogate_function) -> tuple[str, Optional[float]]:
    """(name, alpha) of a surrogate given as a name or a SpingJelly ``Sigmoid``/``ATan`` object.

    Raises ``ValueError`` for a surrogate spikeops has no kernel for.
    """
    if isinstance(surrogate_function, str):
        return surrogate_function, None
    kind = type(surrogate_function).__name__
    if kind in ("Sigmoid", "ATan") and hasattr(surrogate_function, "alpha"):
        if not getattr(surrogate_function, "spiking", True):
            raise ValueError(f"surrogate_function={kind}(spiking=False) is not supported; use spiking=True")
        return kind.lower(), float(surrogate_function.alpha)
    raise ValueError(
        f"surrogate_function must be 'sigmoid', 'atan' or a SpikingJelly Sigmoid/ATan object, got {surrogate_function!r}"
    )


class LIF(nn.Module):
    """Multi-step LIF neuron layer: ``[T, ...]`` input current -> ``[T, ...]`` spikes.

    Same settings as :func:`spikeops.lif`. For code written for SpikingJelly it also accepts
    ``surrogate_function=`` (a name or a SpikingJelly ``Sigmoid``/``ATan`` object),
    ``step_mode="m"`` and has a no-op :meth:`reset` (the state starts at ``v_reset`` on every
    call, as after ``functional.reset_net``). Every setting after ``tau`` is keyword-only
    because SpikingJelly's positional order differs. ``state_dtype=torch.bfloat16`` halves what
    backward keeps (see :func:`spikeops.lif`).
    """

    def __init__(
        self,
        tau: float = 2.0,
        *,
        v_threshold: float = 1.0,
        v_reset: Optional[float] = 0.0,
        decay_input: bool = True,
        detach_reset: bool = True,
        surrogate: str = "sigmoid",
        alpha: Optional[float] = None,
        backend: str = "auto",
        state_dtype: torch.dtype = torch.float32,
        surrogate_function=None,
        step_mode: str = "m",
    ):
        super().__init__()
        if step_mode != "m":
            raise ValueError(
                f"step_mode must be 'm' (spikeops.nn.LIF runs all T steps at once on [T, ...] input), got {step_mode!r}"
            )
        if surrogate_function is not None:
            surrogate, sj_alpha = surrogate_spec(surrogate_function)
            alpha = sj_alpha if alpha is None else alpha
        if backend not in _backend.BACKENDS:
            raise ValueError(f"backend must be one of {_backend.BACKENDS}, got {backend!r}")
        self.tau, self.v_threshold, self.v_reset, self.alpha = lif_params(tau, v_threshold, v_reset, surrogate, alpha)
        self.decay_input = bool(decay_input)
        self.detach_reset = bool(detach_reset)
        self.surrogate = surrogate
        self.backend = backend
        if state_dtype not in STATE_DTYPES:
            raise ValueError(f"state_dtype must be torch.float32 or torch.bfloat16, got {state_dtype}")
        self.state_dtype = state_dtype
        self.step_mode = "m"

    def forward(self, x_seq: torch.Tensor) -> torch.Tensor:
        """x_seq ``[T, ...]`` -> spikes ``[T, ...]`` in x_seq's dtype."""
        return lif(
            x_seq,
            tau=self.tau,
            v_threshold=self.v_threshold,
            v_reset=self.v_reset,
            decay_input=self.decay_input,
            detach_reset=self.detach_reset,
            surrogate=self.surrogate,
            alpha=self.alpha,
            backend=self.backend,
            state_dtype=self.state_dtype,
        )

    def reset(self) -> None:
        """No-op: spikeops.nn.LIF keeps no state between calls."""

    def extra_repr(self) -> str:
        return (
            f"tau={self.tau}, v_threshold={self.v_threshold}, v_reset={self.v_reset}, "
            f"decay_input={self.decay_input}, detach_reset={self.detach_reset}, "
            f"surrogate={self.surrogate!r}, alpha={self.alpha}, backend={self.backend!r}"
        )
