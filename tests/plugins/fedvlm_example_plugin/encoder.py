"""A small CNN image encoder: convolutions, then a global average over the image."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedvlm.models.encoders import image_encoders


@dataclass
class PooledCnnOptions:
    width: int = 8


class PooledCnn(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1))
        self.out_dim = width  # every image encoder maps [B, 3, H, W] to [B, out_dim]
        self.patch_grid = None  # no patches: SHAP explains superpixels instead

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.conv(images).mean(dim=(2, 3))


@image_encoders.register("pooled_cnn", options=PooledCnnOptions)
def pooled_cnn(pretrained: str | None, img_size: int, width: int = 8) -> PooledCnn:
    return PooledCnn(width)
