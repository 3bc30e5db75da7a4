"""Convolutional encoder and decoder for 64x64 images (dSprites-style architecture, Higgins et al. 2017)."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.models.components.mlp import activation


def _image_shape(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(C, H, W) from a sample shape given as (H, W) or (C, H, W); 64x64 only."""
    chw = (1, *shape) if len(shape) == 2 else tuple(shape)
    if len(chw) != 3 or chw[1:] != (64, 64):
        raise ValueError(f"the conv architecture needs 64x64 images, got sample shape {tuple(shape)}")
    return chw


class ConvEncoder(nn.Module):
    """Four stride-2 4x4 convolutions 64 -> 4, then a linear map to (mu, raw logvar)."""

    def __init__(self, input_shape: tuple[int, ...], channels: list[int], latent_dim: int, hidden: int = 256,
                 act: str = "relu"):
        super().__init__()
        c, _, _ = _image_shape(input_shape)
        if len(channels) != 4:
            raise ValueError(f"model.conv_channels needs 4 entries (64 -> 4 pixels), got {channels}")
        layers: list[nn.Module] = []
        for c_in, c_out in zip([c, *channels[:-1]], channels):
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), activation(act)]
        self.conv = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Sequential(nn.Linear(channels[-1] * 16, hidden), activation(act), nn.Linear(hidden, 2 * latent_dim))
        self.input_shape = tuple(input_shape)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.reshape(x.shape[0], *_image_shape(self.input_shape))
        mu, logvar = self.head(self.conv(x)).chunk(2, dim=-1)
        return mu, logvar


class ConvDecoder(nn.Module):
    """Mirror of ConvEncoder: linear to 4x4, four stride-2 transposed convolutions to 64x64."""

    def __init__(self, output_shape: tuple[int, ...], channels: list[int], latent_dim: int, hidden: int = 256,
                 act: str = "relu"):
        super().__init__()
        c, _, _ = _image_shape(output_shape)
        rev = list(reversed(channels))
        self.output_shape = tuple(output_shape)
        self.head = nn.Sequential(nn.Linear(latent_dim, hidden), activation(act), nn.Linear(hidden, rev[0] * 16), activation(act))
        layers: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip(rev, [*rev[1:], c])):
            layers.append(nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1))
            if i < 3:
                layers.append(activation(act))
        self.deconv = nn.Sequential(*layers)
        self.first = rev[0]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        lead = z.shape[:-1]  # any leading dims, e.g. [K, B]
        h = self.head(z.reshape(-1, z.shape[-1])).reshape(-1, self.first, 4, 4)
        return self.deconv(h).reshape(*lead, *self.output_shape)
