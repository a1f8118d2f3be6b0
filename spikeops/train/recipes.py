"""Training presets (``--recipe``) and the defaults used without one.

The CIFAR recipes follow the reference code of each paper (see /work/shared/papers.md,
"Training recipes"), but only their optimizer, schedule, label-smoothing, T, batch and epoch
settings: RandAugment, mixup and random erasing are not implemented by this CLI. Any option
given explicitly on the command line overrides the preset.
"""
from __future__ import annotations

from typing import Dict

# The settings a recipe may fill in (argparse destinations).
RECIPE_KEYS = ("lr", "weight_decay", "batch_size", "epochs", "warmup_epochs", "label_smoothing", "T", "min_lr")

# Used for any setting neither the command line nor a recipe gives.
DEFAULTS: Dict[str, object] = {
    "lr": 1e-3,
    "weight_decay": 0.06,
    "batch_size": 64,
    "epochs": 10,
    "warmup_epochs": 1,
    "label_smoothing": 0.1,
    "T": 4,
    "min_lr": 1e-5,
}

_CIFAR = {"weight_decay": 0.06, "warmup_epochs": 20, "label_smoothing": 0.1, "T": 4, "min_lr": 1e-5}

RECIPES: Dict[str, Dict[str, object]] = {
    # Spikformer (ZK-Zhou/spikformer, CIFAR): AdamW lr 5e-4, wd 0.06, batch 128, 300 epochs.
    "spikformer-cifar": {**_CIFAR, "lr": 5e-4, "batch_size": 128, "epochs": 300},
    # QKFormer / MSViT (CIFAR): AdamW lr 1e-3, wd 0.06, batch 64, 400 epochs.
    "qkformer-cifar": {**_CIFAR, "lr": 1e-3, "batch_size": 64, "epochs": 400},
    "msvit-cifar": {**_CIFAR, "lr": 1e-3, "batch_size": 64, "epochs": 400},
}


def resolve(explicit: Dict[str, object], recipe: str | None) -> Dict[str, object]:
    """Settings for ``RECIPE_KEYS``: explicit (not None) > recipe > :data:`DEFAULTS`."""
    if recipe is not None and recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; known recipes: {', '.join(sorted(RECIPES))}")
    preset = RECIPES.get(recipe, {}) if recipe else {}
    out = {}
    for key in RECIPE_KEYS:
        value = explicit.get(key)
        if value is None:
            value = preset.get(key, DEFAULTS[key])
        out[key] = value
    return out
