"""``MaskedPretrainer``: MAE-style masked pre-training of a Spikformer V2 encoder.

Per step (papers.md, Spikformer V2):

1. a random ``mask_ratio`` of the ``(H/16) x (W/16)`` patches of each image is masked;
2. the encoder's SCS runs on the whole image with sparse convs and sparse BatchNorm
   (:class:`spikeops.nn.MaskedConv2d` / ``MaskedBatchNorm2d`` inside :func:`spikeops.masking`):
   the patch mask, upsampled by nearest repeat (x8, x4, x2, x1 for the four SCS blocks), zeroes
   every conv output at masked positions and BatchNorm statistics come from visible positions only;
3. the transformer blocks run on the visible tokens only, at ``T`` time steps (1 by default);
4. an ANN transformer decoder (pre-norm, GELU, ``decoder_depth`` layers of width ``decoder_dim``)
   gets the encoder tokens (mean over T) embedded to ``decoder_dim``, a learned mask token at every
   masked position and learned positional embeddings, and predicts each patch's pixels;
5. the loss is the MSE on the masked patches of the per-patch-normalised image
   (``norm_pix_loss``: each target patch minus its mean, over its std).

``encoder_state_dict()`` is the encoder's state_dict without its classifier head, to load into a
freshly built model for fine-tuning (``load_state_dict(sd, strict=False)``; keys unchanged).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from spikeops.nn.masked import masking, to_masked


class MaskedPretrainer(nn.Module):
    """Masked image modelling around a Spikformer V2 encoder.

    Args:
        encoder: a :class:`~spikeops.models.spikformer_v2.SpikformerV2` (anything with ``stem``,
            ``forward_features(x, keep)``, ``dim``, ``img_size``, ``in_channels``, ``grid``). Its
            stem's Conv2d/BatchNorm2d are swapped in place for the masked versions (same
            parameters; they act as the dense layers outside masking).
        mask_ratio: fraction of patches masked, in (0, 1) leaving at least one visible patch.
        decoder_dim, decoder_depth, decoder_heads: the ANN decoder's width, layers and heads.
        norm_pix_loss: normalise each target patch by its own mean and std.
        T: time steps of the encoder during pre-training (1, as in the paper).

    ``forward(images [B, C, H, W], mask=None)`` -> ``(loss, pred [B, N, 16*16*C], masked [B, N] bool)``
    where ``N = (H/16)(W/16)`` and ``masked`` is True at the patches the loss covers. ``mask``
    (optional) gives the visible patches instead of drawing them: bool ``[B, H/16, W/16]``,
    True = visible, the same number per image.
    """

    def __init__(self, encoder: nn.Module, mask_ratio: float = 0.75, decoder_dim: int = 256, decoder_depth: int = 4,
                 decoder_heads: int = 4, norm_pix_loss: bool = True, T: int = 1):
        super().__init__()
        missing = [a for a in ("stem", "forward_features", "dim", "img_size", "in_channels", "grid") if not hasattr(encoder, a)]
        if missing:
            raise TypeError(f"MaskedPretrainer: encoder must be a Spikformer V2 (SCS) model, "
                            f"{type(encoder).__name__} lacks {missing}")
        self.grid_hw = encoder.img_size // encoder.grid
        self.num_patches = self.grid_hw ** 2
        self.num_visible = int(round(self.num_patches * (1.0 - mask_ratio)))
        if not 0.0 < mask_ratio < 1.0 or not 1 <= self.num_visible < self.num_patches:
            raise ValueError(f"MaskedPretrainer: mask_ratio={mask_ratio} must be in (0, 1) and leave between 1 and "
                             f"{self.num_patches - 1} of the {self.num_patches} patches visible")
        if T < 1:
            raise ValueError(f"MaskedPretrainer: T must be >= 1, got {T}")
        self.encoder = encoder
        to_masked(encoder.stem, backend=getattr(encoder, "backend", "auto"))
        self.mask_ratio, self.norm_pix_loss, self.T = float(mask_ratio), bool(norm_pix_loss), int(T)
        self.patch = encoder.grid
        self.decoder_embed = nn.Linear(encoder.dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos = nn.Parameter(torch.zeros(1, self.num_patches, decoder_dim))
        layer = nn.TransformerEncoderLayer(decoder_dim, decoder_heads, 4 * decoder_dim, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.decoder = nn.TransformerEncoder(layer, decoder_depth, enable_nested_tensor=False)
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch * self.patch * encoder.in_channels)
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.decoder_pos, std=0.02)

    def encoder_state_dict(self) -> dict:
        """The encoder's state_dict without the classifier head (``head.*``), for fine-tuning."""
        return {k: v for k, v in self.encoder.state_dict().items() if not k.startswith("head.")}

    def random_mask(self, batch: int, device=None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Bool ``[B, H/16, W/16]``, True at ``num_visible`` random patches per image."""
        noise = torch.rand(batch, self.num_patches, device=device, generator=generator)
        keep = noise.argsort(dim=1)[:, : self.num_visible]
        visible = torch.zeros(batch, self.num_patches, dtype=torch.bool, device=device)
        visible.scatter_(1, keep, True)
        return visible.view(batch, self.grid_hw, self.grid_hw)

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> ``[B, N, p*p*C]`` (patch rows in raster order, pixels (py, px, c))."""
        B, C, H, W = images.shape
        p = self.patch
        x = images.reshape(B, C, H // p, p, W // p, p)
        return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // p) * (W // p), p * p * C)

    def forward(self, images: torch.Tensor, mask: Optional[torch.Tensor] = None):
        enc = self.encoder
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ValueError(f"MaskedPretrainer: images must be a [B, C, H, W] tensor, got "
                             f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
        B, C, H, W = images.shape
        if C != enc.in_channels or H != enc.img_size or W != enc.img_size:
            raise ValueError(f"MaskedPretrainer: images must be [B, {enc.in_channels}, {enc.img_size}, {enc.img_size}] "
                             f"(the encoder's in_channels and img_size), got {tuple(images.shape)}")
        if mask is None:
            mask = self.random_mask(B, images.device)
        elif mask.shape != (B, self.grid_hw, self.grid_hw) or mask.dtype != torch.bool:
            raise ValueError(f"MaskedPretrainer: mask must be bool [B, {self.grid_hw}, {self.grid_hw}] (True = visible), "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        visible = mask.reshape(B, self.num_patches)
        counts = visible.sum(1)
        if not bool((counts == counts[0]).all()) or int(counts[0]) < 1:
            raise ValueError("MaskedPretrainer: mask must keep the same (non-zero) number of visible patches per image")
        # visible token indices in raster order (a stable sort puts True first, in order)
        keep = visible.to(torch.uint8).argsort(dim=1, descending=True, stable=True)[:, : int(counts[0])]
        with masking(mask):
            tokens = enc.forward_features(images.unsqueeze(0).expand(self.T, *images.shape), keep)
        z = self.decoder_embed(tokens.mean(0))  # [B, N_vis, decoder_dim]
        full = self.mask_token.to(z.dtype).expand(B, self.num_patches, z.shape[-1])
        full = full.scatter(1, keep.unsqueeze(-1).expand(-1, -1, z.shape[-1]), z) + self.decoder_pos
        pred = self.decoder_pred(self.decoder_norm(self.decoder(full)))  # [B, N, p*p*C]
        target = self.patchify(images)
        if self.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        masked = ~visible
        per_patch = ((pred.float() - target.float()) ** 2).mean(-1)
        loss = (per_patch * masked).sum() / masked.sum()
        return loss, pred, masked
