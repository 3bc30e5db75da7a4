"""LightningModule for the VAE family (VAE, IWAE, beta-VAE): a thin layer over `pipeline.vae_math`."""

from __future__ import annotations

import math
import os

import pytorch_lightning as pl
import torch

from pipeline import vae_math
from pipeline.config import config_object
from pipeline.data.stream import derived_seed
from pipeline.models.components.vae import build_vae


def iwae_schedule_factor(epoch: int) -> float:
    """The IWAE paper's schedule: stage i lasts 3^i epochs at learning rate lr * 10^(-i/7)."""
    stage, end = 0, 1
    while epoch >= end:
        stage += 1
        end += 3**stage
    return 10 ** (-stage / 7)


def _nonfinite_fault() -> tuple[int, str, bool] | None:
    """VAEPIPE_FAULT=STEP:NAN (loss) or STEP:GRADNAN (a gradient), '+' for every step from STEP:
    fault injection for the tests of the non-finite guard."""
    fault = os.environ.get("VAEPIPE_FAULT", "")
    if ":" not in fault or "NAN" not in fault:
        return None
    step, kind = fault.split(":")
    return int(step), kind.rstrip("+"), kind.endswith("+")


class VAEModule(pl.LightningModule):
    """Training, validation and test steps; logs loss, ELBO, reconstruction, KL, IWAE bound, active units."""

    def __init__(self, config: dict, sample_shape: list[int]):
        super().__init__()
        # The resolved config travels in every checkpoint; loggers get it flattened (tracking.RunFacts).
        self.save_hyperparameters(logger=False)
        # Typed dataclasses, not a DictConfig: an OmegaConf attribute read costs ~20 us, and the
        # training step reads a dozen (bench/pipeline_overhead.py).
        self.cfg = config_object(config)
        self.vae = self.build_network(tuple(sample_shape))
        # Fixed prior draws: sample grids of successive epochs show the same z, so progress is visible.
        gen = torch.Generator().manual_seed(self.cfg.run.seed)
        self.register_buffer("fixed_z", self.fixed_prior_draws(gen), persistent=False)
        self._val_mu: list[torch.Tensor] = []
        self.nonfinite_total = 0  # steps skipped for a non-finite loss or gradient
        self.nonfinite_in_a_row = 0
        self.diverged: str | None = None
        self._fault = _nonfinite_fault()
        self.val_examples: torch.Tensor | None = None  # first validation inputs, for reconstruction grids

    # --- the model: what a subclass (VQVAEModule) replaces -----------------------------------------

    def build_network(self, sample_shape: tuple[int, ...]):
        return build_vae(self.cfg.model, sample_shape)

    def fixed_prior_draws(self, gen: torch.Generator) -> torch.Tensor:
        return torch.randn(64, self.cfg.model.latent_dim, generator=gen)

    def training_terms(self, x: torch.Tensor, beta: float, generator: torch.Generator) -> dict:
        """The loss (scalar) and the per-example or scalar terms logged as train/<name>."""
        return self.objective(x, beta, generator=generator)[0]

    def write_images(self, out_dir, tag: str) -> dict:
        from pipeline.images import write_model_grids

        return write_model_grids(self.vae, self.fixed_z, self.val_examples, out_dir, tag, seed=self.cfg.run.seed)

    # --- objective --------------------------------------------------------------------------------

    def beta(self) -> float:
        m = self.cfg.model
        return vae_math.linear_warmup(self.global_step, m.beta_warmup_steps, m.beta)

    def generator(self, *key) -> torch.Generator:
        """Noise for one step, a function of (seed, key, rank): no RNG state has to survive a restart
        for a resumed run to draw exactly the samples the uninterrupted run would have drawn."""
        rank = self.trainer.global_rank if self._trainer is not None else 0
        return torch.Generator(device=self.device).manual_seed(derived_seed(self.cfg.run.seed, *key, rank))

    def objective(self, x: torch.Tensor, beta: float, estimator: str | None = None,
                  generator: torch.Generator | None = None):
        m = self.cfg.model
        mu, logvar = self.vae.encode(x)
        terms = vae_math.vae_objective(mu, logvar, lambda z: self.vae.log_px_given_z(x, z), objective=m.objective,
                                       k=m.k, beta=beta, estimator=estimator or m.estimator, generator=generator)
        return terms, mu, logvar

    def _log_terms(self, stage: str, terms: dict, batch_size: int, on_step: bool) -> None:
        metrics = {f"{stage}/{name}": value.mean() for name, value in terms.items() if name != "loss"}
        metrics[f"{stage}/loss"] = terms["loss"]
        self.log_dict(metrics, on_step=on_step, on_epoch=not on_step, batch_size=batch_size, sync_dist=not on_step,
                      prog_bar=False)

    # --- steps ------------------------------------------------------------------------------------

    def training_step(self, batch, batch_idx):
        x = batch["x"]
        if self.val_examples is None:  # pictures before the first validation (or without one)
            self.val_examples = x[:32 if x.dim() > 2 else 512].detach().clone()
        beta = self.beta()
        terms = self.training_terms(x, beta, self.generator("train", self.global_step))
        if self._fault_now("NAN"):
            terms["loss"] = terms["loss"] * float("nan")
        finite = torch.isfinite(terms["loss"].detach()).float()
        if self.trainer.world_size > 1:  # every rank must skip together, or DDP's all-reduce hangs
            finite = self.trainer.strategy.reduce(finite, reduce_op="min")
        if not finite.item():
            self._skip_step("loss")
            return None  # Lightning then runs no backward and no optimiser step
        if self._logs_this_step():
            self._log_terms("train", terms, x.shape[0], on_step=True)
            self.log("train/beta", beta, on_step=True, on_epoch=False, batch_size=x.shape[0])
            if "shards_skipped" in batch:  # data.on_error=skip: unreadable shards this epoch (per worker)
                self.log("train/shards_skipped", batch["shards_skipped"].float(), on_step=True, batch_size=1)
            self.log("loss", terms["loss"], prog_bar=True, on_step=True, on_epoch=False, logger=False)
        return terms["loss"]

    def _logs_this_step(self) -> bool:
        """Whether Lightning writes step metrics to the loggers after this step (every
        trainer.log_every_n_steps): self.log costs ~1 ms a call on CPU, several times the step of a
        small model, and values logged on other steps are never written (bench/pipeline_overhead.py)."""
        connector = getattr(self.trainer, "_logger_connector", None)
        return True if connector is None else bool(connector.should_update_logs)

    # --- non-finite guard -------------------------------------------------------------------------

    def _fault_now(self, kind: str) -> bool:
        if self._fault is None or self._fault[1] != kind:
            return False
        step, _, every = self._fault
        return self.global_step == step or (every and self.global_step > step)

    def on_before_optimizer_step(self, optimizer):
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if self._fault_now("GRADNAN") and grads:
            grads[0].fill_(float("nan"))
        # Gradients are already all-reduced here, so every rank reaches the same verdict.
        # The sum of all gradients is non-finite when any element is (inf or nan propagate); it is
        # also flagged when |sum| > 3e38, gradients a float32 step cannot use anyway. One reduction
        # per tensor: isfinite or an inf-norm over every element costs ten times more on CPU, ~10%
        # of a small model's step (bench/pipeline_overhead.py).
        if grads and not torch.isfinite(torch.stack([g.sum(dtype=torch.float32) for g in grads]).sum()):
            for p in self.parameters():
                p.grad = None  # the optimiser skips parameters without a gradient: no update at all
            self._skip_step("gradient")
        else:
            self.nonfinite_in_a_row = 0

    def _skip_step(self, what: str) -> None:
        self.nonfinite_total += 1
        self.nonfinite_in_a_row += 1
        self.log("train/nonfinite_steps", float(self.nonfinite_total), on_step=True, on_epoch=False, batch_size=1)
        limit = self.cfg.optim.max_nonfinite_steps
        if self.nonfinite_in_a_row >= limit:
            self.diverged = (f"{self.nonfinite_in_a_row} steps in a row had a non-finite {what} (limit "
                             f"optim.max_nonfinite_steps={limit}) at step {self.global_step}; the weights of the "
                             "last good step are in checkpoints/last.ckpt. Lower optim.lr, set "
                             "trainer.gradient_clip_val, or use 32-true precision.")
            self.trainer.should_stop = True

    def _eval_step(self, stage: str, batch, batch_idx):
        x = batch["x"]
        # Evaluation is always reparameterised and at the final beta, so losses compare across epochs.
        gen = self.generator(stage, batch_idx)  # the same draws at every validation: comparable epochs
        terms, mu, logvar = self.objective(x, self.cfg.model.beta, estimator="reparam", generator=gen)
        if self.cfg.model.eval_k > 0:
            k = self.cfg.model.eval_k
            terms[f"iwae{k}"] = vae_math.importance_sampled_log_px(
                mu, logvar, lambda z: self.vae.log_px_given_z(x, z), k=k, chunk=k, generator=gen)
        self._log_terms(stage, terms, x.shape[0], on_step=False)
        self._val_mu.append(mu.detach())
        if batch_idx == 0 and stage == "val":  # for the image grids: 32 pictures, or up to 512 points
            self.val_examples = x[:32 if x.dim() > 2 else 512].detach()

    def validation_step(self, batch, batch_idx):
        self._eval_step("val", batch, batch_idx)

    def test_step(self, batch, batch_idx):
        self._eval_step("test", batch, batch_idx)

    def _log_active_units(self, stage: str) -> None:
        if not self._val_mu:
            return
        mu = torch.cat(self._val_mu)
        self._val_mu.clear()
        if self.trainer.world_size > 1:  # active units need the variance over the whole split
            mu = self.all_gather(mu).flatten(0, 1)
        self.log(f"{stage}/active_units", float(vae_math.active_units(mu)), on_epoch=True, rank_zero_only=True)

    def on_validation_epoch_end(self):
        self._log_active_units("val")

    def on_test_epoch_end(self):
        self._log_active_units("test")

    # --- optimisation -----------------------------------------------------------------------------

    def configure_optimizers(self):
        o = self.cfg.optim
        params = self.parameters()
        if o.name == "sgd":
            opt = torch.optim.SGD(params, lr=o.lr, momentum=o.betas[0], weight_decay=o.weight_decay)
        else:
            cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
            opt = cls(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
        if o.scheduler == "none" and o.warmup_steps <= 0:
            return opt
        total = max(1, int(self.trainer.estimated_stepping_batches)) if o.scheduler == "cosine" else 1

        def factor(step: int) -> float:  # one step-wise multiplier: warm-up x schedule
            warm = min(1.0, (step + 1) / o.warmup_steps) if o.warmup_steps > 0 else 1.0
            epoch = self.trainer.current_epoch if self._trainer is not None else 0
            if o.scheduler == "cosine":
                return warm * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
            if o.scheduler == "exponential":
                return warm * o.gamma**epoch
            if o.scheduler == "iwae":
                return warm * iwae_schedule_factor(epoch)
            return warm

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
