"""The VAE as a plain nn.Module: encoder q(z|x), decoder p(x|z), prior N(0, I) (Definition 11.17)."""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline import vae_math
from pipeline.models.components.conv import ConvDecoder, ConvEncoder
from pipeline.models.components.likelihoods import build_likelihood, dims
from pipeline.models.components.mlp import MLPDecoder, MLPEncoder, mlp
from pipeline.models.components.resnet import ResNetDecoder, ResNetEncoder


class VAE(nn.Module):
    """Networks plus the likelihood they parameterise; the objectives live in `pipeline.vae_math`.

    What the training module, evaluation and the pictures use (TwoLayerVAE has the same):
    `objective` (the training terms), `log_weights` (importance log-weights for log p(x)), `encode`
    (the code of x in the prior's space), `mean` (pixels of a prior draw), `draw` (a draw of
    p(x|z)), `noise_dim`, `bits_per_dim` (None unless the likelihood is one of 8-bit values).
    The networks (arch) and the pixel likelihood (components/likelihoods.py) are independent
    choices: the decoder gives `pixel.param_shape` numbers per sample, whatever the likelihood."""

    stochastic_layers = 1

    def __init__(self, input_shape: tuple[int, ...], *, arch: str = "mlp", latent_dim: int = 50,
                 hidden: list[int] = (200, 200), activation: str = "tanh", conv_channels: list[int] = (),
                 conv_hidden: int = 256, likelihood: str = "bernoulli", sigma: float = 1.0, learn_sigma: bool = False,
                 init: str = "torch", mixtures: int = 1, res_blocks: int = 1, norm: str = "auto",
                 latent_grid: int = 0):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.latent_dim = latent_dim
        self.likelihood = likelihood
        self.pixel = build_likelihood(likelihood, self.input_shape, mixtures)
        out = self.pixel.param_shape
        if arch == "mlp":
            self.encoder = MLPEncoder(self.input_shape, list(hidden), latent_dim, activation)
            self.decoder = MLPDecoder(out, list(hidden)[::-1], latent_dim, activation)
        elif arch == "conv":
            self.encoder = ConvEncoder(self.input_shape, list(conv_channels), latent_dim, conv_hidden, activation,
                                       grid=latent_grid)
            self.decoder = ConvDecoder(self.input_shape, list(conv_channels), latent_dim, conv_hidden, activation, out,
                                       grid=latent_grid)
        elif arch == "resnet":
            norm = "group" if norm == "auto" else norm  # without it the ResNet VAE collapsed (docs/images.md)
            self.encoder = ResNetEncoder(self.input_shape, list(conv_channels), latent_dim, conv_hidden, activation,
                                         res_blocks, norm, latent_grid)
            self.decoder = ResNetDecoder(self.input_shape, list(conv_channels), latent_dim, conv_hidden, activation,
                                         res_blocks, norm, out, latent_grid)
        else:
            raise ValueError(f"model.arch must be 'mlp', 'conv' or 'resnet', got {arch!r}")
        if init == "iwae":
            glorot_init(self)
        elif init != "torch":
            raise ValueError(f"model.init must be 'torch' or 'iwae', got {init!r}")
        # Gaussian decoder N(f(z), sigma^2 I): sigma weighs reconstruction against KL (Concept 11.20).
        log_sigma2 = torch.tensor(2.0 * math.log(sigma))
        if learn_sigma:
            self.log_sigma2 = nn.Parameter(log_sigma2)
        else:
            self.register_buffer("log_sigma2", log_sigma2)

    @property
    def bits_per_dim(self) -> float | None:
        """Bits/dim per nat of -log p(x), 1 / (D ln 2), for a likelihood of 8-bit pixel values; None for
        densities (Gaussian) and for Bernoulli pixels (not a probability of the 8-bit data)."""
        return 1.0 / (dims(self.input_shape) * math.log(2.0)) if self.pixel.discrete else None

    @property
    def event_dims(self) -> int:
        return len(self.input_shape)

    @property
    def noise_dim(self) -> int:
        """Standard normal numbers one sample of the latents takes (a compiled step draws them outside)."""
        return self.latent_dim

    def objective(self, x: torch.Tensor, *, objective: str = "elbo", k: int = 1, beta=1.0, estimator: str = "reparam",
                  generator: torch.Generator | None = None, eps: torch.Tensor | None = None,
                  score_baseline: bool = True) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """(terms of vae_math.vae_objective, mu, logvar of q(z|x)) for a batch."""
        mu, logvar = self.encode(x)
        terms = vae_math.vae_objective(mu, logvar, lambda z: self.log_px_given_z(x, z), objective=objective, k=k,
                                       beta=beta, estimator=estimator, generator=generator, eps=eps,
                                       score_baseline=score_baseline)
        return terms, mu, logvar

    def log_weights(self, x: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n importance log-weights log p(x, z) - log q(z|x), z ~ q(z|x), per example: [n, B]."""
        mu, logvar = self.encode(x)
        z = vae_math.reparameterize(mu, logvar, n, generator)
        return vae_math.log_importance_weights(self.log_px_given_z(x, z), z, mu, logvar)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar) of q(z|x), logvar bounded."""
        mu, logvar = self.encoder(x)
        return mu, vae_math.bound_logvar(logvar)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Decoder output for z [..., d]: the likelihood's parameters, [..., *pixel.param_shape]
        (Bernoulli logits or the Gaussian mean: [..., *input_shape])."""
        return self.decoder(z)

    def log_px_given_z(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x|z) per sample, [K, B] for z [K, B, d], summed over pixels, in float32."""
        if self.likelihood == "bernoulli" and z.dim() == 3:
            # Decode in [B, K] order: x . logits is then a batched product without copying the
            # [K, B, pixels] logits (the largest tensor of K = 5000 evaluation).
            out = self.decode(z.transpose(0, 1))
            return self.pixel.log_prob(x, out, batch_first=True).t()  # Bernoulli: no log_sigma2
        return self.pixel.log_prob(x, self.decode(z), self.log_sigma2)

    def set_output_bias(self, pixel_mean: torch.Tensor) -> None:
        """The IWAE paper's output bias: the decoder starts at the data's mean image, logit(mean)
        for Bernoulli (clipped to [0.001, 0.999] as in the authors' code), the mean for Gaussian."""
        if self.likelihood not in ("bernoulli", "gaussian"):
            raise ValueError("model.init=iwae sets a Bernoulli or Gaussian output bias; use model.init=torch with "
                             f"model.likelihood={self.likelihood}")
        out = output_layer(self.decoder)
        m = pixel_mean.to(out.bias)
        # A convolutional output layer has one bias per channel: the channel's mean.
        m = m.reshape(-1) if m.numel() == out.bias.numel() else m.reshape(out.bias.numel(), -1).mean(1)
        with torch.no_grad():
            out.bias.copy_(torch.logit(m.clamp(0.001, 0.999)) if self.likelihood == "bernoulli" else m)

    def mean(self, z: torch.Tensor) -> torch.Tensor:
        """E[x|z] in [0, 1]-pixels (Bernoulli: the probabilities): what the pictures of samples show."""
        return self.pixel.mean(self.decode(z))

    def draw(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x ~ p(x|z): one draw of the pixels (8-bit values for the discretised likelihoods)."""
        return self.pixel.draw(self.decode(z), generator, self.log_sigma2)


class GaussianMLP(nn.Module):
    """h [..., n_in] -> (mu, bounded logvar) of a diagonal Gaussian over n_out dimensions, through
    tanh layers `hidden` and linear heads: a stochastic layer of the IWAE paper's second model."""

    def __init__(self, n_in: int, hidden: list[int], n_out: int, act: str = "tanh"):
        super().__init__()
        self.net = mlp([n_in, *hidden, 2 * n_out], act)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.net(h).chunk(2, dim=-1)
        return mu, vae_math.bound_logvar(logvar)


class TwoLayerVAE(VAE):
    """Two stochastic layers (Burda et al. 2016): x -> hidden -> z1 -> hidden2 -> z2 in q, and
    z2 ~ N(0, I) -> hidden2 reversed -> z1 -> hidden reversed -> x in p. The VAE's encoder and
    decoder are q(z1|x) and p(x|z1); `q2` is q(z2|z1) and `p1` is p(z1|z2). `latent_dim` is the top
    layer (the prior's), `latent1_dim` the middle one. The log-weight's mathematics is
    vae_math.hierarchical_log_terms."""

    stochastic_layers = 2

    def __init__(self, input_shape: tuple[int, ...], *, latent_dim: int = 50, latent1_dim: int = 100,
                 hidden: list[int] = (200, 200), hidden2: list[int] = (100, 100), activation: str = "tanh",
                 likelihood: str = "bernoulli", sigma: float = 1.0, learn_sigma: bool = False, init: str = "torch",
                 mixtures: int = 1):
        super().__init__(input_shape, arch="mlp", latent_dim=latent1_dim, hidden=hidden, activation=activation,
                         likelihood=likelihood, sigma=sigma, learn_sigma=learn_sigma, init="torch", mixtures=mixtures)
        self.latent1_dim, self.latent_dim = latent1_dim, latent_dim
        self.q2 = GaussianMLP(latent1_dim, list(hidden2), latent_dim, activation)
        self.p1 = GaussianMLP(latent_dim, list(hidden2)[::-1], latent1_dim, activation)
        if init == "iwae":
            glorot_init(self)

    @property
    def noise_dim(self) -> int:
        return self.latent1_dim + self.latent_dim

    def log_terms(self, x: torch.Tensor, n: int, generator: torch.Generator | None = None,
                  eps: torch.Tensor | None = None, hold_q: bool = False):
        """n ancestral samples z1 ~ q(z1|x), z2 ~ q(z2|z1) and the parts of their log-weights
        ([n, B] each); also (mu, logvar) of q(z1|x). eps [n, B, latent1_dim + latent_dim]: the noise."""
        mu1, logvar1 = self.encode_first(x)
        if eps is None:
            eps = torch.randn((n, x.shape[0], self.noise_dim), generator=generator, device=x.device)
        e1, e2 = eps.split([self.latent1_dim, self.latent_dim], dim=-1)
        z1 = vae_math.reparameterize(mu1, logvar1, eps=e1)
        mu2, logvar2 = self.q2(z1)
        z2 = vae_math.reparameterize(mu2, logvar2, eps=e2)
        parts = vae_math.hierarchical_log_terms(self.log_px_given_z(x, z1), z1, z2, (mu1, logvar1), (mu2, logvar2),
                                                self.p1(z2), hold_q=hold_q)
        return parts, mu1, logvar1

    def objective(self, x, *, objective="elbo", k=1, beta=1.0, estimator="reparam", generator=None, eps=None,
                  score_baseline=True):
        """(terms of vae_math.monte_carlo_objective, mu, logvar of q(z1|x)); estimators reparam and stl."""
        if estimator not in ("reparam", "stl"):
            raise ValueError(f"model.estimator={estimator} is not available with two stochastic layers; "
                             "use reparam or stl")
        parts, mu1, logvar1 = self.log_terms(x, k, generator, eps, hold_q=estimator == "stl")
        return vae_math.monte_carlo_objective(*parts, objective=objective, beta=beta), mu1, logvar1

    def log_weights(self, x, n, generator=None):
        log_px_z, log_prior, log_q = self.log_terms(x, n, generator)[0]
        return log_px_z + log_prior - log_q

    def encode_first(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar) of q(z1|x)."""
        return super().encode(x)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The code of x in the prior's space: q(z2|z1) at z1 = the mean of q(z1|x)."""
        return self.q2(self.encode_first(x)[0])

    def mean(self, z: torch.Tensor) -> torch.Tensor:
        """Pixels of top-layer codes z [..., latent_dim], through the mean of p(z1|z2)."""
        return super().mean(self.p1(z)[0])

    def draw(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x ~ p(x|z1) at z1 ~ p(z1|z2)."""
        mu, logvar = self.p1(z)
        return super().draw(vae_math.reparameterize(mu, logvar, 1, generator)[0], generator)


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
    if model_cfg.stochastic_layers == 2:
        return TwoLayerVAE(input_shape, latent_dim=model_cfg.latent_dim, latent1_dim=model_cfg.latent1_dim,
                           hidden=list(model_cfg.hidden), hidden2=list(model_cfg.hidden2),
                           activation=model_cfg.activation, likelihood=model_cfg.likelihood, sigma=model_cfg.sigma,
                           learn_sigma=model_cfg.learn_sigma, init=model_cfg.init, mixtures=model_cfg.mixtures)
    return VAE(input_shape, arch=model_cfg.arch, latent_dim=model_cfg.latent_dim, hidden=list(model_cfg.hidden),
               activation=model_cfg.activation, conv_channels=list(model_cfg.conv_channels),
               conv_hidden=model_cfg.conv_hidden, likelihood=model_cfg.likelihood, sigma=model_cfg.sigma,
               learn_sigma=model_cfg.learn_sigma, init=model_cfg.init, mixtures=model_cfg.mixtures,
               res_blocks=model_cfg.res_blocks, norm=model_cfg.norm, latent_grid=model_cfg.latent_grid)
