"""The VAE as a plain nn.Module: encoder q(z|x), decoder p(x|z), prior N(0, I) (Definition 11.17)."""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline import vae_math
from pipeline.models.components.conv import ConvDecoder, ConvEncoder
from pipeline.models.components.mlp import MLPDecoder, MLPEncoder


class VAE(nn.Module):
    """Networks plus the likelihood they parameterise; the objectives live in `pipeline.vae_math`."""

    def __init__(self, input_shape: tuple[int, ...], *, arch: str = "mlp", latent_dim: int = 50,
                 hidden: list[int] = (200, 200), activation: str = "tanh", conv_channels: list[int] = (32, 32, 64, 64),
                 conv_hidden: int = 256, likelihood: str = "bernoulli", sigma: float = 1.0, learn_sigma: bool = False,
                 init: str = "torch"):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.latent_dim = latent_dim
        self.likelihood = likelihood
        if arch == "mlp":
            self.encoder = MLPEncoder(self.input_shape, list(hidden), latent_dim, activation)
            self.decoder = MLPDecoder(self.input_shape, list(hidden)[::-1], latent_dim, activation)
        elif arch == "conv":
            self.encoder = ConvEncoder(self.input_shape, list(conv_channels), latent_dim, conv_hidden, activation)
            self.decoder = ConvDecoder(self.input_shape, list(conv_channels), latent_dim, conv_hidden, activation)
        else:
            raise ValueError(f"model.arch must be 'mlp' or 'conv', got {arch!r}")
        if init == "iwae":
            glorot_init(self)
        elif init != "torch":
            raise ValueError(f"model.init must be 'torch' or 'iwae', got {init!r}")
        if likelihood not in ("bernoulli", "gaussian"):
            raise ValueError(f"model.likelihood must be 'bernoulli' or 'gaussian', got {likelihood!r}")
        # Gaussian decoder N(f(z), sigma^2 I): sigma weighs reconstruction against KL (Concept 11.20).
        log_sigma2 = torch.tensor(2.0 * math.log(sigma))
        if learn_sigma:
            self.log_sigma2 = nn.Parameter(log_sigma2)
        else:
            self.register_buffer("log_sigma2", log_sigma2)

    @property
    def event_dims(self) -> int:
        return len(self.input_shape)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar) of q(z|x), logvar bounded."""
        mu, logvar = self.encoder(x)
        return mu, vae_math.bound_logvar(logvar)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Decoder output for z [..., d]: Bernoulli logits or the Gaussian mean, shape [..., *input_shape]."""
        return self.decoder(z)

    def log_px_given_z(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x|z) per sample, [K, B] for z [K, B, d], summed over pixels, in float32."""
        if self.likelihood == "bernoulli" and z.dim() == 3:
            # Decode in [B, K] order: x . logits is then a batched product without copying the
            # [K, B, pixels] logits (the largest tensor of K = 5000 evaluation).
            out = self.decode(z.transpose(0, 1))
            return vae_math.bernoulli_log_likelihood(x, out, self.event_dims, batch_first=True).t()
        out = self.decode(z)
        if self.likelihood == "bernoulli":
            return vae_math.bernoulli_log_likelihood(x, out, self.event_dims)
        return vae_math.gaussian_log_likelihood(x, out, vae_math.bound_logvar(self.log_sigma2), self.event_dims)

    def set_output_bias(self, pixel_mean: torch.Tensor) -> None:
        """The IWAE paper's output bias: the decoder starts at the data's mean image, logit(mean)
        for Bernoulli (clipped to [0.001, 0.999] as in the authors' code), the mean for Gaussian."""
        out = output_layer(self.decoder)
        m = pixel_mean.to(out.bias)
        # A convolutional output layer has one bias per channel: the channel's mean.
        m = m.reshape(-1) if m.numel() == out.bias.numel() else m.reshape(out.bias.numel(), -1).mean(1)
        with torch.no_grad():
            out.bias.copy_(torch.logit(m.clamp(0.001, 0.999)) if self.likelihood == "bernoulli" else m)

    def mean(self, z: torch.Tensor) -> torch.Tensor:
        """E[x|z]: pixel probabilities (Bernoulli) or the mean (Gaussian); for pictures of samples."""
        out = self.decode(z).float()
        return torch.sigmoid(out) if self.likelihood == "bernoulli" else out


def glorot_init(module: nn.Module) -> None:
    """Glorot-uniform weights (+-sqrt(6 / (fan_in + fan_out))) and zero biases for every linear and
    convolutional layer: the IWAE paper's initialisation."""
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


def output_layer(decoder: nn.Module) -> nn.Module:
    """The decoder's last layer with a bias of one entry per pixel (its output layer)."""
    layers = [m for m in decoder.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d))]
    return layers[-1]


def build_vae(model_cfg, input_shape: tuple[int, ...]) -> VAE:
    """A VAE from the `model` config group."""
    return VAE(input_shape, arch=model_cfg.arch, latent_dim=model_cfg.latent_dim, hidden=list(model_cfg.hidden),
               activation=model_cfg.activation, conv_channels=list(model_cfg.conv_channels),
               conv_hidden=model_cfg.conv_hidden, likelihood=model_cfg.likelihood, sigma=model_cfg.sigma,
               learn_sigma=model_cfg.learn_sigma, init=model_cfg.init)
