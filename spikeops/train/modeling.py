"""Build what ``spikeops.train`` trains: a classifier from the model registry, the masked
pre-trainer around a Spikformer V2 encoder (``--mode pretrain``), or a classifier initialised
from a pre-trained encoder (``--mode finetune --checkpoint encoder.pt``); optional SyncBatchNorm.
"""
from __future__ import annotations

import ast
import inspect
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from spikeops.train import UsageError

PRETRAIN_PREFIX = "spikformer_v2"
PRETRAINER_SETTINGS = dict(decoder_dim=256, decoder_depth=4, decoder_heads=4, norm_pix_loss=True)


def parse_model_args(items: Optional[List[str]]) -> Dict[str, object]:
    """``["depth=2", "embed_dim=64", "name=foo"]`` -> ``{"depth": 2, "embed_dim": 64, "name": "foo"}``."""
    out: Dict[str, object] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--model-arg expects KEY=VALUE, got {item!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def create_classifier(cfg, num_classes: int, img_size: int, in_channels: int) -> nn.Module:
    from spikeops.models import create_model

    kwargs = dict(num_classes=num_classes, img_size=img_size, in_channels=in_channels, T=cfg.T, backend=cfg.backend)
    kwargs.update(cfg.model_args)
    return create_model(cfg.model, **kwargs)


def check_pretrain_model(name: str) -> None:
    if not name.startswith(PRETRAIN_PREFIX):
        raise UsageError(
            f"--mode pretrain needs a Spikformer V2 model (a name starting with {PRETRAIN_PREFIX!r}: masked "
            f"pre-training masks its convolutional stem), got {name!r}"
        )


def build(cfg, num_classes: int, img_size: int, in_channels: int) -> Tuple[nn.Module, dict]:
    """(module to train, info). In pretrain mode the module's forward(images) returns
    ``(loss, pred, mask)`` and it has ``encoder_state_dict()``; otherwise it returns logits."""
    info: dict = {}
    if cfg.mode == "pretrain":
        check_pretrain_model(cfg.model)
        try:
            from spikeops.models import MaskedPretrainer
        except ImportError as exc:
            raise UsageError("--mode pretrain needs spikeops.models.MaskedPretrainer, which this install lacks") from exc
    model = create_classifier(cfg, num_classes, img_size, in_channels)
    if cfg.mode == "pretrain":
        extra = {"T": cfg.T} if "T" in inspect.signature(MaskedPretrainer).parameters else {}
        model = MaskedPretrainer(model, mask_ratio=cfg.mask_ratio, **PRETRAINER_SETTINGS, **extra)
    elif cfg.mode == "finetune":
        info["finetune"] = load_encoder(model, cfg.checkpoint)
    return model, info


def load_encoder(model: nn.Module, path: str) -> dict:
    """Load an encoder state dict (``encoder.pt`` from pretrain; also accepts a ``last.pt``
    checkpoint of this CLI) with ``strict=False``. Returns the missing / unexpected keys and the
    keys skipped because their shapes differ (e.g. a classifier head for another class count)."""
    if not path:
        raise UsageError("--mode finetune needs --checkpoint PATH (the encoder.pt written by --mode pretrain)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise UsageError(f"--checkpoint {path}: no such file") from exc
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise UsageError(f"--checkpoint {path}: expected a state dict, got {type(state).__name__}")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    own = model.state_dict()
    mismatched = sorted(k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape))
    for k in mismatched:
        del state[k]
    result = model.load_state_dict(state, strict=False)
    return {
        "checkpoint": str(path),
        "loaded": len(state) - len(result.unexpected_keys),
        "missing_keys": list(result.missing_keys),
        "unexpected_keys": list(result.unexpected_keys),
        "shape_mismatch_keys": mismatched,
    }


class SyncBNCheck:
    """After ``convert_sync_batchnorm``: find SyncBatchNorm modules that are never called as
    modules (a parent applies the BatchNorm functionally, e.g. spikeops' fused BatchNorm+LIF
    ``spikeops.ops.batch_norm_lif``), whose statistics therefore stay per-process."""

    def __init__(self, model: nn.Module):
        self.called: Dict[str, bool] = {}
        self.handles = []
        for name, m in model.named_modules():
            if isinstance(m, nn.SyncBatchNorm):
                self.called[name] = False
                self.handles.append(m.register_forward_pre_hook(self._hook(name)))

    def _hook(self, name):
        def hook(module, args):
            self.called[name] = True
        return hook

    def finish(self) -> List[str]:
        for h in self.handles:
            h.remove()
        self.handles = []
        return [n for n, c in self.called.items() if not c]


def convert_sync_bn(model: nn.Module, device: torch.device) -> Tuple[nn.Module, SyncBNCheck]:
    if device.type != "cuda":
        raise UsageError(
            "--sync-bn needs CUDA: torch.nn.SyncBatchNorm has no CPU implementation (it refuses CPU tensors, "
            "also with gloo). On CPU, each process normalises with its own batch statistics."
        )
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model, SyncBNCheck(model)
