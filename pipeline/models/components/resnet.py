"""Residual convolutional encoder and decoder (model.arch=resnet): the conv pair's stride-2 stages
with model.res_blocks residual blocks after each (at side/2, ..., 4 pixels: blocks at the full
resolution would cost 4x those at half of it, for the least abstract features).

Normalisation. GroupNorm by default (model.norm=auto or group), never batch statistics: without
normalisation this ResNet VAE collapsed its posterior on CIFAR-10 in every run tried, with GroupNorm
it did not (docs/images.md). Batch norm would make each sample's
log-weight depend on the other K - 1 importance samples and the other examples of the batch (the
IWAE bound is then not a bound of one fixed model), would differ between training and evaluation
(so `vaepipe eval` would score another model than the one trained), and under DDP would depend on
how the batch is split over ranks; GroupNorm normalises each example on its own (~15% more time
a step on CPU). Each block also starts as the identity (its last convolution zero-initialised, as
Fixup/SkipInit and VDVAE scale their residual branches); model.norm=none keeps only that."""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.models.components.conv import ConvEncoder, crop, decoder_head, image_geometry, latent_layout, stage_widths
from pipeline.models.components.mlp import activation


def norm_layer(kind: str, channels: int) -> nn.Module:
    if kind == "none":
        return nn.Identity()
    if kind == "group":
        return nn.GroupNorm(math.gcd(32, channels), channels)  # up to 32 groups that divide the width
    raise ValueError(f"model.norm must be 'none' or 'group', got {kind!r}")


class ResBlock(nn.Module):
    """x + conv3x3(act(norm(conv3x3(act(norm(x)))))), the last convolution zero at the start."""

    def __init__(self, channels: int, act: str, norm: str):
        super().__init__()
        self.branch = nn.Sequential(norm_layer(norm, channels), activation(act), nn.Conv2d(channels, channels, 3, padding=1),
                                    norm_layer(norm, channels), activation(act), nn.Conv2d(channels, channels, 3, padding=1))
        nn.init.zeros_(self.branch[-1].weight)
        nn.init.zeros_(self.branch[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)


def blocks(n: int, channels: int, act: str, norm: str) -> list[nn.Module]:
    return [ResBlock(channels, act, norm) for _ in range(n)]


class ResNetEncoder(ConvEncoder):
    """3x3 stem, then per stage a stride-2 4x4 convolution and residual blocks, down to 4x4; the
    conv encoder's head gives (mu, raw logvar) (model.latent_grid: a map down to G x G)."""

    def __init__(self, input_shape: tuple[int, ...], channels: list[int], latent_dim: int, hidden: int = 256,
                 act: str = "relu", res_blocks: int = 1, norm: str = "none", grid: int = 0):
        def stages(c: int, widths: list[int], act: str) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Conv2d(c, widths[0], 3, padding=1)]
            for c_in, c_out in zip([widths[0], *widths[:-1]], widths):
                layers += [activation(act), nn.Conv2d(c_in, c_out, 4, stride=2, padding=1),
                           *blocks(res_blocks, c_out, act, norm)]
            return [*layers, activation(act)]

        super().__init__(input_shape, channels, latent_dim, hidden, act, stages, grid)


class ResNetDecoder(nn.Module):
    """Mirror of ResNetEncoder: linear to 4x4 (or a 3x3 convolution of the latent grid), then per stage
    residual blocks and a stride-2 transposed convolution, and a 3x3 convolution to the likelihood's
    parameters (`output_shape`)."""

    def __init__(self, input_shape: tuple[int, ...], channels: list[int], latent_dim: int, hidden: int = 256,
                 act: str = "relu", res_blocks: int = 1, norm: str = "none", output_shape: tuple[int, ...] | None = None,
                 grid: int = 0):
        super().__init__()
        self.output_shape = tuple(output_shape or input_shape)
        _, side, self.pad = image_geometry(input_shape)
        rev = list(reversed(stage_widths(channels, side, self.pad, latent_layout(latent_dim, grid, side)[0])))
        self.head = decoder_head(latent_dim, grid, side, hidden, rev[0], act)
        layers: list[nn.Module] = []
        for c_in, c_out in zip(rev, [*rev[1:], rev[-1]]):
            layers += [*blocks(res_blocks, c_in, act, norm), activation(act),
                       nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1)]
        layers += [norm_layer(norm, rev[-1]), activation(act),
                   nn.Conv2d(rev[-1], image_geometry(self.output_shape)[0], 3, padding=1)]
        self.deconv = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        lead = z.shape[:-1]
        h = self.head(z.reshape(-1, z.shape[-1]))
        return crop(self.deconv(h), self.pad).reshape(*lead, *self.output_shape)
