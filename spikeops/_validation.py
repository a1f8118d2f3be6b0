"""Argument checks shared by every op: each error names the argument and says what was expected."""
from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_float_tensor(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating tensor (float32, float16, bfloat16 or float64), got {x.dtype}; "
            f"convert it with {name}.float()"
        )


def check_time_major(name: str, x: torch.Tensor) -> None:
    """x is [T, ...] with T >= 1 and no empty dimension."""
    if x.dim() == 0:
        raise ValueError(f"{name} must have a leading time dimension [T, ...], got a 0-d tensor")
    if x.shape[0] == 0:
        raise ValueError(f"{name} has T=0 time steps (shape {tuple(x.shape)}); T must be >= 1")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); every dimension must be >= 1")


def check_finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_positive(name: str, value) -> float:
    value = check_finite(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_tau(value) -> float:
    """A membrane time constant: finite and > 1 (the leak factor 1 - 1/tau lies in [0, 1))."""
    value = check_finite("tau", value)
    if value <= 1.0:
        raise ValueError(f"tau must be > 1 (the leak factor 1 - 1/tau must lie in [0, 1)), got {value}")
    return value


def check_attention_inputs(named) -> None:
    """``named``: (name, tensor) pairs of attention spikes; all float ``[T, B, H, N, d]`` with the
    first one's shape, dtype and device."""
    first_name, first = named[0]
    for name, x in named:
        check_float_tensor(name, x)
        check_time_major(name, x)
        if x.dim() != 5:
            raise ValueError(f"{name} must be [T, B, H, N, d] (5-d), got shape {tuple(x.shape)}")
        if x.shape != first.shape:
            raise ValueError(f"{name} must have {first_name}'s shape {tuple(first.shape)}, got {tuple(x.shape)}")
        if x.dtype != first.dtype or x.device != first.device:
            raise ValueError(f"{name} must share {first_name}'s dtype and device ({first.dtype}, {first.device}), "
                             f"got {x.dtype}, {x.device}")


def check_binary(op: str, named) -> None:
    """ValueError naming the first of the (name, tensor) pairs that holds anything but 0 and 1."""
    from spikeops.reference import is_binary

    for name, x in named:
        if not is_binary(x):
            raise ValueError(f"{op}: {name} must hold only 0 and 1 (spikes)")
