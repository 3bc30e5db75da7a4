"""LightningModule for the VQ-VAE (Concept 11.23): the VAE module's loop, logging, non-finite guard,
checkpoint and resume conventions, with the VQ objective
  loss = -log p(x|z_q) + ||sg(z_e) - e||^2 + beta_c ||z_e - sg(e)||^2   (per example, mean over the batch)
(the codebook term only without EMA updates). Logs code usage: perplexity and dead codes."""

from __future__ import annotations

import torch

from pipeline import vae_math
from pipeline.models.components.vq import VQVAE
from pipeline.models.vae_module import VAEModule


class VQVAEModule(VAEModule):

    def build_network(self, sample_shape: tuple[int, ...]):
        m = self.cfg.model
        return VQVAE(sample_shape, channels=m.vq_channels, codebook_size=m.codebook_size, code_dim=m.code_dim,
                     ema=m.ema, decay=m.ema_decay, dead_threshold=m.dead_code_threshold, act=m.activation,
                     likelihood=m.likelihood)

    def fixed_prior_draws(self, gen: torch.Generator) -> torch.Tensor:
        # No learned prior over codes here: pictures of uniformly drawn code grids (fixed across epochs).
        h, w = self.vae.grid
        return torch.randint(0, self.cfg.model.codebook_size, (64, h, w), generator=gen)

    def vq_terms(self, x: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        z_e = self.vae.encode(x)
        z_st, z_q, codes = self.vae.quantizer(z_e, generator)
        recon = self.vae.log_px_given_zq(x, z_st)
        codebook, commitment = vae_math.vq_losses(z_e, z_q, event_dims=3)
        loss = -recon + self.cfg.model.commitment * commitment
        if not self.cfg.model.ema:
            loss = loss + codebook
        counts = torch.bincount(codes.flatten(), minlength=self.cfg.model.codebook_size).float()
        return {"loss": loss.mean(), "recon": recon, "codebook": codebook.detach(), "commitment": commitment.detach(),
                "perplexity": vae_math.codebook_perplexity(counts)}

    def training_terms(self, x: torch.Tensor, beta: float, generator: torch.Generator | None,
                       eps: torch.Tensor | None = None) -> dict:
        return self.vq_terms(x, generator)

    def step_noise(self, batch_size, rank, world_size, generator):
        return None  # no reparameterisation noise; the quantiser's restarts draw from the generator

    def compile_supported(self) -> bool:
        return False  # the EMA codebook update (and its all-reduce) runs inside the step

    def _eval_step(self, stage: str, batch, batch_idx):
        x, _, own = self.own_samples(batch)
        self._log_terms(stage, self.vq_terms(x), own)
        if batch_idx == 0 and stage == "val":
            self.val_examples = x[:32].detach()

    def on_train_epoch_end(self):
        super().on_train_epoch_end()  # the non-finite check
        """Code usage over the epoch, all ranks: perplexity of the usage and codes never chosen.
        Under DDP also the largest difference between ranks' codebooks (0: in sync)."""
        usage = self.vae.quantizer.reset_usage()
        if usage.sum() == 0:
            return
        self.log("train/epoch_perplexity", vae_math.codebook_perplexity(usage), rank_zero_only=True)
        self.log("train/dead_codes", float((usage == 0).sum()), rank_zero_only=True)
        if self.trainer.world_size > 1:
            books = self.all_gather(self.vae.quantizer.codebook.detach())  # [world, K, D]
            self.log("train/codebook_rank_spread", (books - books[0:1]).abs().max().float(), rank_zero_only=True)

    def write_images(self, out_dir, tag: str) -> dict:
        from pathlib import Path

        from pipeline.images import save_grid, side_by_side

        out_dir = Path(out_dir)
        with torch.no_grad():
            paths = {"samples": save_grid(self.vae.codes_to_images(self.fixed_z.to(self.device)),
                                          out_dir / f"samples_{tag}.png", nrow=8)}
            if self.val_examples is not None:
                x = self.val_examples
                paths["recon"] = save_grid(side_by_side(x, self.vae.reconstruct(x)), out_dir / f"recon_{tag}.png", nrow=8)
        return paths
