"""Convolutional encoder and decoder for square images of any power-of-two size from 16 to 256 (28 is
padded to 32), 1 or 3 channels: stride-2 4x4 convolutions down to 4x4, as the dSprites
architecture of Higgins et al. (2017) does from 64x64 in four stages.

The latent is a vector through a fully connected head (model.latent_grid=0), or a G x G map of
latent_dim / G^2 channels through 3x3 convolutions (model.latent_grid=G, the stages stopping at G):
the same standard normal prior over latent_dim numbers, but each code describes a patch, so the
decoder need not squeeze the whole picture through one vector (docs/images.md)."""

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


def latent_layout(latent_dim: int, grid: int, side: int) -> tuple[int, int]:
    """(side of the encoder's last grid, latent channels) for model.latent_grid: 0 is a vector
    (grid BASE, then the linear head); G a G x G map of latent_dim / G^2 channels."""
    if not grid:
        return BASE, latent_dim
    if grid < 1 or grid & (grid - 1) or grid > side // 2 or latent_dim % (grid * grid):
        raise ValueError(f"model.latent_grid={grid}: a spatial latent needs a power of two from 1 to {side // 2} "
                         f"(at least one stride-2 stage from {side} px) that divides model.latent_dim={latent_dim} "
                         f"as a G x G map (latent_dim = channels x G^2, e.g. {8 * grid * grid}); 0 for a vector")
    return grid, latent_dim // (grid * grid)


def stage_widths(channels: list[int], side: int, pad: int = 0, last: int = BASE) -> list[int]:
    """Widths of the stride-2 stages side -> last (4, or the latent grid): model.conv_channels, one per
    stage from the input side; a shorter list repeats its last width, a longer one is an error naming
    the count; an empty one (the default) takes the first stages of DEFAULT_WIDTHS (32, 32, 64, 64 at 64 px)."""
    stages = int(math.log2(side // last))
    if not channels:
        channels = DEFAULT_WIDTHS[:stages]
    if len(channels) > stages:
        padded = f" ({side - 2 * pad}x{side - 2 * pad} padded to {side})" if pad else ""
        raise ValueError(f"model.conv_channels has {len(channels)} widths, but {side}x{side} images{padded} take "
                         f"{stages} stride-2 stages ({side} -> {last}): give {stages}, e.g. {list(channels[:stages])}, "
                         "or [] for the default widths")
    return list(channels) + [channels[-1]] * (stages - len(channels))


def plain_stages(c: int, widths: list[int], act: str) -> list[nn.Module]:
    """The encoder's body: a stride-2 4x4 convolution and an activation per stage."""
    layers: list[nn.Module] = []
    for c_in, c_out in zip([c, *widths[:-1]], widths):
        layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), activation(act)]
    return layers


class ConvEncoder(nn.Module):
    """Stride-2 4x4 convolutions side -> 4, then a linear map to (mu, raw logvar); with a latent grid G,
    side -> G and a 3x3 convolution to them. `stages`: the body's layers from (input channels, stage
    widths, activation) (the ResNet's has residual blocks)."""

    def __init__(self, input_shape: tuple[int, ...], channels: list[int], latent_dim: int, hidden: int = 256,
                 act: str = "relu", stages=plain_stages, grid: int = 0):
        super().__init__()
        c, side, self.pad = image_geometry(input_shape)
        last, zc = latent_layout(latent_dim, grid, side)
        widths = stage_widths(channels, side, self.pad, last)
        if grid:  # flattened channel-major: the first latent_dim numbers are mu's zc channels
            self.conv = nn.Sequential(*stages(c, widths, act))
            self.head = nn.Sequential(nn.Conv2d(widths[-1], 2 * zc, 3, padding=1), nn.Flatten())
        else:
            self.conv = nn.Sequential(*stages(c, widths, act), nn.Flatten())
            self.head = nn.Sequential(nn.Linear(widths[-1] * BASE * BASE, hidden), activation(act),
                                      nn.Linear(hidden, 2 * latent_dim))
        self.chw = (c, side - 2 * self.pad, side - 2 * self.pad)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = pad(x.reshape(x.shape[0], *self.chw), self.pad)
        mu, logvar = self.head(self.conv(x)).chunk(2, dim=-1)
        return mu, logvar


def decoder_head(latent_dim: int, grid: int, side: int, hidden: int, width: int, act: str) -> nn.Module:
    """Codes [N, latent_dim] to the decoder's first feature map [N, width, grid or BASE, same]: linear
    layers for a latent vector, a 3x3 convolution for a latent map."""
    last, zc = latent_layout(latent_dim, grid, side)
    if grid:
        return nn.Sequential(nn.Unflatten(1, (zc, last, last)), nn.Conv2d(zc, width, 3, padding=1))
    return nn.Sequential(nn.Linear(latent_dim, hidden), activation(act), nn.Linear(hidden, width * BASE * BASE),
                         nn.Unflatten(1, (width, BASE, BASE)))


class ConvDecoder(nn.Module):
    """Mirror of ConvEncoder: linear to 4x4 (or a 3x3 convolution of the latent grid), stride-2
    transposed convolutions to the image side. `output_shape`: the likelihood's parameters per
    sample ([P, H, W], or the image shape)."""

    def __init__(self, input_shape: tuple[int, ...], channels: list[int], latent_dim: int, hidden: int = 256,
                 act: str = "relu", output_shape: tuple[int, ...] | None = None, grid: int = 0):
        super().__init__()
        self.output_shape = tuple(output_shape or input_shape)
        _, side, self.pad = image_geometry(input_shape)
        out_c = image_geometry(self.output_shape)[0]
        rev = list(reversed(stage_widths(channels, side, self.pad, latent_layout(latent_dim, grid, side)[0])))
        self.head = nn.Sequential(*decoder_head(latent_dim, grid, side, hidden, rev[0], act), activation(act))
        layers: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip(rev, [*rev[1:], out_c])):
            layers.append(nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1))
            if i < len(rev) - 1:
                layers.append(activation(act))
        self.deconv = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        lead = z.shape[:-1]  # any leading dims, e.g. [K, B]
        h = self.head(z.reshape(-1, z.shape[-1]))
        return crop(self.deconv(h), self.pad).reshape(*lead, *self.output_shape)


def pad(x: torch.Tensor, p: int) -> torch.Tensor:
    return F.pad(x, (p, p, p, p)) if p else x


def crop(x: torch.Tensor, p: int) -> torch.Tensor:
    return x[..., p:-p, p:-p] if p else x
