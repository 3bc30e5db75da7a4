"""Pixel likelihoods p(x|z) as the decoder's output meets them: how many numbers per pixel the decoder
gives, the log-probability (vae_math's mathematics), the mean for pictures and a draw.

Data reach every model as floats in [0, 1] (uint8 / 255). The discretised likelihoods see them as
the 256 bin centres in [-1, 1] (vae_math.to_symmetric) and give probabilities of 8-bit values:
their -log p(x) in bits per dimension compares with the literature. Bernoulli and Gaussian are
densities or probabilities of other things (binary pixels, real values): no bits/dim from them
(docs/images.md, "Bits per dimension")."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipeline import vae_math

LIKELIHOODS = ("bernoulli", "gaussian", "discretized_logistic", "discretized_gaussian")


def pixel_grid(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(C, H, W) of an image sample shape (H, W) or (C, H, W)."""
    if len(shape) == 2:
        return (1, *shape)
    if len(shape) == 3:
        return tuple(shape)
    raise ValueError(f"a discretised pixel likelihood needs images (H, W) or (C, H, W), got sample shape {tuple(shape)}")


class PixelLikelihood:
    """The interface: `param_shape` (decoder output per sample), `log_prob` (summed over the
    sample, float32), `mean` and `draw` (pixels in [0, 1]), `discrete` (a probability of 8-bit
    values: bits/dim apply). `log_sigma2`: the model's Gaussian log-variance (a parameter or buffer
    of the model, passed in: a likelihood holds no tensors of its own), ignored by the others."""

    discrete = False

    def __init__(self, input_shape: tuple[int, ...]):
        self.input_shape = tuple(input_shape)

    @property
    def param_shape(self) -> tuple[int, ...]:
        return self.input_shape

    def log_prob(self, x: torch.Tensor, params: torch.Tensor, log_sigma2=None) -> torch.Tensor:
        raise NotImplementedError

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def draw(self, params: torch.Tensor, generator: torch.Generator | None = None, log_sigma2=None) -> torch.Tensor:
        raise NotImplementedError


class Bernoulli(PixelLikelihood):
    """Binary pixels from logits."""

    def log_prob(self, x, params, log_sigma2=None, batch_first: bool = False):
        return vae_math.bernoulli_log_likelihood(x, params, len(self.input_shape), batch_first=batch_first)

    def mean(self, params):
        return torch.sigmoid(params.float())

    def draw(self, params, generator=None, log_sigma2=None):
        p = self.mean(params)
        return (torch.rand(p.shape, generator=generator, device=p.device) < p).float()


class Gaussian(PixelLikelihood):
    """N(f(z), sigma^2 I) on real values, log sigma^2 the model's (fixed or learned)."""

    def log_prob(self, x, params, log_sigma2=None):
        return vae_math.gaussian_log_likelihood(x, params, vae_math.bound_logvar(log_sigma2), len(self.input_shape))

    def mean(self, params):
        return params.float()

    def draw(self, params, generator=None, log_sigma2=None):
        noise = torch.randn(params.shape, generator=generator, device=params.device)
        return params.float() + torch.exp(0.5 * vae_math.bound_logvar(log_sigma2)) * noise


class EightBit(PixelLikelihood):
    """What the discretised likelihoods share: images (C, H, W) seen as bin centres in [-1, 1]."""

    discrete = True

    def __init__(self, input_shape):
        super().__init__(input_shape)
        self.channels, self.h, self.w = pixel_grid(self.input_shape)

    def symmetric(self, x):
        """x [..., *input_shape] in [0, 1] -> [..., C, H, W] in [-1, 1]."""
        return vae_math.to_symmetric(x.reshape(*x.shape[: x.dim() - len(self.input_shape)], self.channels, self.h, self.w))

    def pixels(self, sym):
        """[..., C, H, W] in [-1, 1] -> [..., *input_shape] in [0, 1]."""
        return ((sym + 1) / 2).reshape(*sym.shape[:-3], *self.input_shape)


class Discretized(EightBit):
    """A mean and a log-scale per channel and pixel (decoder output [2C, H, W]), each channel's
    bin probability independent given z: the IAF paper's discretised logistic, or a discretised
    Gaussian."""

    def __init__(self, input_shape, kind: str):
        super().__init__(input_shape)
        self.bin_log_prob = {"logistic": vae_math.discretized_logistic_log_prob,
                             "gaussian": vae_math.discretized_gaussian_log_prob}[kind]
        self.kind = kind

    @property
    def param_shape(self):
        return (2 * self.channels, self.h, self.w)

    def log_prob(self, x, params, log_sigma2=None):
        mean, log_scale = params.chunk(2, dim=-3)
        return self.bin_log_prob(self.symmetric(x), mean, log_scale).flatten(-3).sum(-1)

    def mean(self, params):
        # The location, clamped to the pixel range: the mean for scales of a few bins (a trained
        # decoder's); a broad distribution's open edge bins pull its true mean towards the middle.
        return self.pixels(params.float().chunk(2, dim=-3)[0].clamp(-1, 1))

    def draw(self, params, generator=None, log_sigma2=None):
        mean, log_scale = params.float().chunk(2, dim=-3)
        scale = log_scale.clamp(vae_math.LOG_SCALE_MIN, vae_math.LOG_SCALE_MAX).exp()
        if self.kind == "logistic":
            noise = logistic_noise(mean.shape, generator, mean.device)
        else:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device)
        return self.pixels(quantize(mean + scale * noise))


class LogisticMixture(EightBit):
    """PixelCNN++'s (and NVAE's) mixture of M discretised logistics per pixel, one mixture weight
    for all its channels and each channel's mean coupled linearly to the earlier channels' values."""

    def __init__(self, input_shape, mixtures: int):
        super().__init__(input_shape)
        self.mixtures = mixtures

    @property
    def param_shape(self):
        return (vae_math.mixture_param_count(self.mixtures, self.channels), self.h, self.w)

    def log_prob(self, x, params, log_sigma2=None):
        return vae_math.discretized_logistic_mixture_log_prob(self.symmetric(x), params, self.mixtures).flatten(-2).sum(-1)

    def mean(self, params):
        """sum_m pi_m E[x | m], the coupled means taken at the earlier channels' component means."""
        logits, means, _, coeffs = vae_math.split_mixture_params(params.float(), self.mixtures, self.channels)
        per_component = channel_by_channel(means, coeffs, lambda i, m: m.clamp(-1, 1))  # [..., M, C, H, W]
        weights = torch.softmax(logits, dim=-3).unsqueeze(-3)  # [..., M, 1, H, W]
        # clamped: the softmax weights may sum to 1 + 1 ulp
        return self.pixels((weights * per_component).sum(-4)).clamp(0, 1)

    def draw(self, params, generator=None, log_sigma2=None):
        logits, means, log_scales, coeffs = vae_math.split_mixture_params(params.float(), self.mixtures, self.channels)
        gumbel = -torch.log(-torch.log(torch.rand(logits.shape, generator=generator, device=logits.device)
                                       .clamp(1e-6, 1 - 1e-6)))
        pick = F.one_hot((logits + gumbel).argmax(-3), self.mixtures).movedim(-1, -3).unsqueeze(-3).float()
        mean, log_scale, coeff = ((t * pick).sum(-4) for t in (means, log_scales, coeffs))  # the picked component
        noise = log_scale.clamp(vae_math.LOG_SCALE_MIN, vae_math.LOG_SCALE_MAX).exp() * \
            logistic_noise(mean.shape, generator, mean.device)
        # red, then green given the drawn red, ...
        return self.pixels(channel_by_channel(mean, coeff, lambda i, m: quantize(m + noise[..., i, :, :])))


def channel_by_channel(means: torch.Tensor, coeffs: torch.Tensor, value) -> torch.Tensor:
    """PixelCNN++'s coupling taken in channel order when the earlier channels' values are made on the
    way (a mean, a draw): channel i's value is value(i, mean_i + sum_{j<i} c_ij value_j).
    means [..., C, H, W], coeffs [..., C(C-1)/2, H, W]; vae_math.coupled_means is the same with
    the values given."""
    out, pair = [], 0
    for i in range(means.shape[-3]):
        m = means[..., i, :, :]
        for j in range(i):
            m = m + coeffs[..., pair, :, :] * out[j]
            pair += 1
        out.append(value(i, m))
    return torch.stack(out, dim=-3)


def logistic_noise(shape, generator, device) -> torch.Tensor:
    u = torch.rand(shape, generator=generator, device=device).clamp(1e-6, 1 - 1e-6)
    return torch.log(u) - torch.log1p(-u)


def quantize(x: torch.Tensor) -> torch.Tensor:
    """A real value in [-1, 1]-space to the centre of its 8-bit bin."""
    return torch.round((x.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1


def build_likelihood(name: str, input_shape: tuple[int, ...], mixtures: int = 1) -> PixelLikelihood:
    """model.likelihood (and model.mixtures for the discretised logistic: 1 = the IAF paper's,
    M >= 2 = PixelCNN++'s mixture)."""
    if name == "bernoulli":
        return Bernoulli(input_shape)
    if name == "gaussian":
        return Gaussian(input_shape)
    if name in ("discretized_logistic", "discretized_gaussian"):
        if mixtures < 1:
            raise ValueError(f"model.mixtures must be >= 1, got {mixtures}")
        if name == "discretized_logistic" and mixtures > 1:
            return LogisticMixture(input_shape, mixtures)
        if mixtures > 1:
            raise ValueError("model.mixtures > 1 is the mixture of discretised logistics: use "
                             "model.likelihood=discretized_logistic")
        return Discretized(input_shape, name.split("_")[1])
    raise ValueError(f"model.likelihood must be one of {', '.join(LIKELIHOODS)}, got {name!r}")


def check_pixel_data(vae, manifest: dict, where: str, binarize: str = "none") -> None:
    """A likelihood of 8-bit values needs 8-bit data: uint8 shards read as k/255, not binarised.
    Anything else would give bits/dim of a distribution the data do not come from (binarised
    pixels are 0 or 255 only: a figure that looks like an 8-bit one and is not)."""
    pixel = getattr(vae, "pixel", None)
    if pixel is None or not pixel.discrete:
        return
    dtypes = {split["dtype"] for split in manifest["splits"].values()}
    if dtypes != {"uint8"} or abs(float(manifest["scale"]) * 255 - 1) > 1e-6:
        raise ValueError(f"model.likelihood={vae.likelihood} is a probability of 8-bit pixel values; {where} holds "
                         f"'{manifest.get('name')}' {'/'.join(sorted(dtypes))} values scaled by {manifest['scale']:.6g}, "
                         "not uint8 / 255: use model.likelihood=gaussian (or bernoulli) for these data")
    if binarize != "none":
        raise ValueError(f"model.likelihood={vae.likelihood} models 8-bit pixels; data.binarize={binarize} leaves "
                         "0 or 255 only: use model.likelihood=bernoulli for binarised data")


def dims(input_shape: tuple[int, ...]) -> int:
    """D of bits/dim: the numbers per sample (pixels x channels)."""
    return math.prod(input_shape)
