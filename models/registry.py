"""Model registry: ``create_model(name, **overrides)`` and ``list_models()``.

Each model file registers its named configurations with :func:`register_model`; a
configuration is a function ``(**overrides) -> nn.Module`` that fills in the paper's settings
(depth, width, heads, T, image size, classes) and lets any of them be overridden.
"""
from __future__ import annotations

from typing import Callable, Dict

from torch import nn

_REGISTRY: Dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    """Decorator: register ``fn(**overrides) -> nn.Module`` under ``name``."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = fn
        return fn

    return wrap


def list_models() -> list[str]:
    """The names :func:`create_model` accepts, sorted."""
    return sorted(_REGISTRY)


def create_model(name: str, **overrides) -> nn.Module:
    """Build the named model. Common overrides: ``num_classes``, ``img_size``, ``in_channels``,
    ``T``, ``backend`` (``"auto"``: spikeops kernels; ``"torch"``: plain PyTorch layers and the
    reference ops, the eager baseline with the same parameters and outputs).

    Raises ``ValueError`` for an unknown name (listing the known ones).
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return _REGISTRY[name](**overrides)
