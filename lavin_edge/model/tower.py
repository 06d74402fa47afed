"""The vision tower interface: an image encoder carrying routed adapters that returns a few visual
tokens taken from several depths (LaVIN takes the ViT's class token after every 4th block). The towers
(``vit``, ``efficientnet``) subclass it; ``vision.build_vision_tower`` picks one from the config."""

from __future__ import annotations

import torch
from torch import nn


class VisionTower(nn.Module):
    """Subclasses set ``token_dims`` (the width of each visual token) and implement ``forward``:
    images [B, 3, S, S] (ImageNet-normalised) -> one [B, token_dims[i]] tensor per visual token."""

    token_dims: list[int]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError
