"""Fully connected encoder and decoder (default: the IWAE paper's 784-200-200-50, tanh)."""

from __future__ import annotations

import math

import torch
from torch import nn

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU, "gelu": nn.GELU, "silu": nn.SiLU}


def activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"model.activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]()


def mlp(sizes: list[int], act: str) -> nn.Sequential:
    """Linear layers through `sizes`, the activation between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(activation(act))
    return nn.Sequential(*layers)


class MLPEncoder(nn.Module):
    """x [B, *shape] -> (mu, raw logvar), each [B, latent_dim]. hidden=[] makes it linear."""

    def __init__(self, input_shape: tuple[int, ...], hidden: list[int], latent_dim: int, act: str = "tanh"):
        super().__init__()
        self.net = mlp([math.prod(input_shape), *hidden, 2 * latent_dim], act)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.net(x.flatten(1)).chunk(2, dim=-1)
        return mu, logvar


class MLPDecoder(nn.Module):
    """z [..., latent_dim] -> per-pixel parameters [..., *shape] (Bernoulli logits or Gaussian mean)."""

    def __init__(self, output_shape: tuple[int, ...], hidden: list[int], latent_dim: int, act: str = "tanh"):
        super().__init__()
        self.output_shape = tuple(output_shape)
        self.net = mlp([latent_dim, *hidden, math.prod(output_shape)], act)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).unflatten(-1, self.output_shape)
