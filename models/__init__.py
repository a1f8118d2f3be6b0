"""Spiking vision transformers built from spikeops layers (installed as ``spikeops.models``).

``create_model(name, **overrides)`` builds one by name; ``list_models()`` lists the names.
"""
from spikeops.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]

# each model file registers its configurations on import
from spikeops.models import msvit, spikformer, spikformer_v2  # noqa: E402,F401
from spikeops.models.pretrain import MaskedPretrainer  # noqa: E402

__all__ += ["MaskedPretrainer"]
