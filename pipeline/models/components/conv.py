"""Convolutional encoder and decoder for square images of any power-of-two size from 16 to 256 (28 is
padded to 32), 1 or 3 channels: stride-2 4x4 convolutions down to 4x4, as the dSprites
architecture of Higgins et al. (2017) does from 64x64 in four stages."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.components.mlp import activation

BASE = 4  # the encoder's last grid is BASE x BASE, where the fully connected head takes over
DEFAULT_WIDTHS = [32, 32, 64, 64]  # model.conv_channels=[]: the first log2(side / 4) of these (64 repeated)


def image_geometry(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(channels, side the network works at, padding per border) of a sample shape (H, W) or (C, H, W)."""
    chw = (1, *shape) if len(shape) == 2 else tuple(shape)
    if len(chw) != 3 or chw[1] != chw[2]:
        raise ValueError(f"the convolutional networks need square images (H, W) or (C, H, W), got sample shape "
                         f"{tuple(shape)}: `vaepipe prepare images --size N` resizes and centre-crops a source")
    side = chw[1]
    if side == 28:  # MNIST: padded to 32 by 2 pixels each side, cropped back after the decoder
        return chw[0], 32, 2
    if side < 16 or side > 256 or side & (side - 1):
        raise ValueError(f"the convolutional networks take square images of 16, 32, 64, 128 or 256 pixels (or 28), "
                         f"got {side}x{side}: `vaepipe prepare images --size N` resizes a source")
    return chw[0], side, 0


def stage_widths(channels: list[int], side: int, pad: int = 0) -> list[int]:
    """Widths of the stride-2 stages side -> 4: model.conv_channels, one per stage from the input
    side; a shorter list repeats its last width, a longer one is an error naming the count; an
    empty one (the default) takes the first stages of DEFAULT_WIDTHS (32, 32, 64, 64 at 64 px)."""
    stages = int(math.log2(side // BASE))
    if not channels:
        channels = DEFAULT_WIDTHS[:stages]
    if len(channels) > stages:
        padded = f" ({side - 2 * pad}x{side - 2 * pad} padded to {side})" if pad else ""
        raise ValueError(f"model.conv_channels has {len(channels)} widths, but {side}x{side} images{padded} take "
                         f"{stages} stride-2 stages ({side} -> {BASE}): give {stages}, e.g. {list(channels[:stages])}, "
                         "or [] for the default widths")
    return list(channels) + [channels[-1]] * (stages - len(channels))


def plain_stages(c: int, widths: list[int], act: str) -> list[nn.Module]:
    """The encoder's body: a stride-2 4x4 convolution and an activation per stage."""
    layers: list[nn.Module] = []
    for c_in, c_out in zip([c, *widths[:-1]], widths):
        layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), activation(act)]
    return layers


class ConvEncoder(nn.Module):
    """Stride-2 4x4 convolutions side -> 4, then a linear map to (mu, raw logvar). `stages`: the
    body's layers from (input channels, stage widths, activation) (the ResNet's has residual blocks)."""

    def __init__(self, input_shape: tuple[int, ...], channels: list[int], latent_dim: int, hidden: int = 256,
                 act: str = "relu", stages=plain_stages):
        super().__init__()
        c, side, self.pad = image_geometry(input_shape)
        widths = stage_widths(channels, side, self.pad)
        self.conv = nn.Sequential(*stages(c, widths, act), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(widths[-1] * BASE * BASE, hidden), activation(act),
                                  nn.Linear(hidden, 2 * latent_dim))
        self.chw = (c, side - 2 * self.pad, side - 2 * self.pad)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = pad(x.reshape(x.shape[0], *self.chw), self.pad)
        mu, logvar = self.head(self.conv(x)).chunk(2, dim=-1)
        return mu, logvar


class ConvDecoder(nn.Module):
    """Mirror of ConvEncoder: linear to 4x4, stride-2 transposed convolutions to the image side.
    `output_shape`: the likelihood's parameters per sample ([P, H, W], or the image shape)."""

    def __init__(self, input_shape: tuple[int, ...], channels: list[int], latent_dim: int, hidden: int = 256,
                 act: str = "relu", output_shape: tuple[int, ...] | None = None):
        super().__init__()
        self.output_shape = tuple(output_shape or input_shape)
        _, side, self.pad = image_geometry(input_shape)
        out_c = image_geometry(self.output_shape)[0]
        rev = list(reversed(stage_widths(channels, side, self.pad)))
        self.head = nn.Sequential(nn.Linear(latent_dim, hidden), activation(act), nn.Linear(hidden, rev[0] * BASE * BASE),
                                  activation(act))
        layers: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip(rev, [*rev[1:], out_c])):
            layers.append(nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1))
            if i < len(rev) - 1:
                layers.append(activation(act))
        self.deconv = nn.Sequential(*layers)
        self.first = rev[0]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        lead = z.shape[:-1]  # any leading dims, e.g. [K, B]
        h = self.head(z.reshape(-1, z.shape[-1])).reshape(-1, self.first, BASE, BASE)
        return crop(self.deconv(h), self.pad).reshape(*lead, *self.output_shape)


def pad(x: torch.Tensor, p: int) -> torch.Tensor:
    return F.pad(x, (p, p, p, p)) if p else x


def crop(x: torch.Tensor, p: int) -> torch.Tensor:
    return x[..., p:-p, p:-p] if p else x
