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
