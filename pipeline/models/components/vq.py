"""VQ-VAE as plain nn.Modules (Concept 11.23, van den Oord et al. 2017): a convolutional encoder to
a grid of D-dimensional vectors, nearest-neighbour quantisation against a codebook of K vectors,
a convolutional decoder to Bernoulli logits (or Gaussian means). The mathematics (nearest code,
straight-through, losses, EMA update, perplexity) is in `pipeline.vae_math`."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from pipeline import vae_math
from pipeline.models.components.mlp import activation


def _chw(shape: tuple[int, ...]) -> tuple[int, int, int]:
    chw = (1, *shape) if len(shape) == 2 else tuple(shape)
    if len(chw) != 3 or chw[1] % 4 or chw[2] % 4:
        raise ValueError(f"the VQ-VAE needs images whose sides divide by 4 (e.g. 28x28, 64x64), got {tuple(shape)}")
    return chw


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


class VectorQuantizer(nn.Module):
    """Codebook of K vectors of dimension D. With `ema`, the codebook follows exponential moving
    averages of the encoder outputs assigned to each code, from all ranks' statistics (all-reduced:
    every rank applies the same update, so codebooks stay identical); otherwise it is a parameter
    learned through the codebook loss. Dead-code restart: a code whose EMA usage falls below
    `dead_threshold` is moved onto a random encoder output of the batch (chosen on rank 0 and
    broadcast)."""

    def __init__(self, codebook_size: int, code_dim: int, ema: bool = False, decay: float = 0.99,
                 dead_threshold: float = 0.0):
        super().__init__()
        self.k, self.d, self.ema, self.decay, self.dead_threshold = codebook_size, code_dim, ema, decay, dead_threshold
        init = torch.empty(codebook_size, code_dim).uniform_(-1 / codebook_size, 1 / codebook_size)
        if ema:
            self.register_buffer("codebook", init)
            self.register_buffer("cluster_size", torch.ones(codebook_size))  # as if each code had 1 assignment
            self.register_buffer("embed_sum", init.clone())
        else:
            self.codebook = nn.Parameter(init)
        self.register_buffer("usage", torch.zeros(codebook_size))  # assignments since the last reset (logging)

    def forward(self, z_e: torch.Tensor, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z_e [B, D, H, W] -> (z_q with straight-through gradient, z_q as chosen, codes [B, H, W]).
        `generator` draws the dead-code restarts (seeded per step: a resumed run restarts the same)."""
        b, d, h, w = z_e.shape
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, d).float()
        codes = vae_math.nearest_code(flat, self.codebook)
        z_q = self.codebook[codes].view(b, h, w, d).permute(0, 3, 1, 2)
        counts = torch.bincount(codes, minlength=self.k).float()
        if self.training:
            self.usage += counts.detach()
            if self.ema:
                self._ema_update(flat.detach(), codes, counts, generator)
        return vae_math.straight_through(z_e.float(), z_q), z_q, codes.view(b, h, w)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, codes: torch.Tensor, counts: torch.Tensor, generator=None) -> None:
        sums = torch.zeros(self.k, self.d, device=flat.device).index_add_(0, codes, flat)
        counts, sums = _all_reduce(counts.clone()), _all_reduce(sums)
        _, _, codebook = vae_math.ema_codebook_update(self.cluster_size, self.embed_sum, counts, sums, self.decay)
        self.codebook.copy_(codebook)
        if self.dead_threshold > 0:
            self._restart_dead(flat, generator)

    @torch.no_grad()
    def _restart_dead(self, flat: torch.Tensor, generator=None) -> None:
        dead = self.cluster_size < self.dead_threshold
        if not dead.any():
            return
        pick = torch.randint(0, flat.shape[0], (int(dead.sum()),), device=flat.device, generator=generator)
        fresh = flat[pick]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(fresh, src=0)  # rank 0's choice: codebooks stay identical
        self.codebook[dead] = fresh
        self.embed_sum[dead] = fresh
        self.cluster_size[dead] = 1.0

    def reset_usage(self) -> torch.Tensor:
        usage = _all_reduce(self.usage.clone())
        self.usage.zero_()
        return usage


class VQVAE(nn.Module):
    """x -> z_e (grid of D-vectors at 1/4 resolution) -> z_q -> decoder logits."""

    bits_per_dim = None  # Bernoulli/Gaussian pixels only (config.validate): no bits/dim

    def __init__(self, input_shape: tuple[int, ...], *, channels: int = 64, codebook_size: int = 512,
                 code_dim: int = 64, ema: bool = False, decay: float = 0.99, dead_threshold: float = 0.0,
                 act: str = "relu", likelihood: str = "bernoulli"):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.likelihood = likelihood
        c, h, w = _chw(self.input_shape)
        self.grid = (h // 4, w // 4)
        self.encoder = nn.Sequential(
            nn.Conv2d(c, channels, 4, 2, 1), activation(act), nn.Conv2d(channels, channels, 4, 2, 1), activation(act),
            nn.Conv2d(channels, channels, 3, 1, 1), activation(act), nn.Conv2d(channels, code_dim, 1))
        self.quantizer = VectorQuantizer(codebook_size, code_dim, ema, decay, dead_threshold)
        self.decoder = nn.Sequential(
            nn.Conv2d(code_dim, channels, 3, 1, 1), activation(act),
            nn.ConvTranspose2d(channels, channels, 4, 2, 1), activation(act), nn.ConvTranspose2d(channels, c, 4, 2, 1))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x.reshape(x.shape[0], *_chw(self.input_shape)).float())

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.decoder(z_q).reshape(z_q.shape[0], *self.input_shape)

    def log_px_given_zq(self, x: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
        """log p(x|z_q) per example, summed over pixels, float32."""
        out = self.decode(z_q)
        if self.likelihood == "bernoulli":
            return vae_math.bernoulli_log_likelihood(x, out, len(self.input_shape))
        return vae_math.gaussian_log_likelihood(x, out, torch.zeros((), device=x.device), len(self.input_shape))

    def codes_to_images(self, codes: torch.Tensor) -> torch.Tensor:
        """Decoder means for a grid of code indices [B, h, w] (samples from a uniform prior over codes)."""
        z_q = self.quantizer.codebook[codes].permute(0, 3, 1, 2)
        out = self.decode(z_q).float()
        return torch.sigmoid(out) if self.likelihood == "bernoulli" else out

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        _, z_q, _ = self.quantizer(self.encode(x))
        out = self.decode(z_q).float()
        return torch.sigmoid(out) if self.likelihood == "bernoulli" else out
