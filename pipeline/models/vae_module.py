"""LightningModule for the VAE family (VAE, IWAE, beta-VAE): a thin layer over `pipeline.vae_math`."""

from __future__ import annotations

import math
import os

import pytorch_lightning as pl
import torch

from pipeline import vae_math
from pipeline.config import config_object
from pipeline.data.stream import derived_seed
from pipeline.models.components.likelihoods import check_pixel_data
from pipeline.models.components.vae import build_vae
from pipeline.models.step_engine import StepEngine, make_optimizer


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
    """Training, validation and test steps; logs loss, ELBO, reconstruction, KL, IWAE bound, active units.

    Training runs on Lightning's manual optimisation: each training batch is a list of K batches
    (trainer.steps_per_call, data/datamodule.py) and `training_step` makes one optimizer step per
    batch through the step engine (models/step_engine.py), so Lightning's per-batch machinery is
    paid once per K steps while everything a user sees (global_step, schedules, logging, skips,
    checkpoints) stays per optimizer step."""

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
        self._eval_sums: dict[str, tuple] = {}  # stage -> (metric names, sums, samples) this epoch
        self.automatic_optimization = False  # the step engine makes the optimizer steps
        self.engine: StepEngine | None = None  # built at train start, when the optimizer exists
        self._engine_state: dict | None = None  # from a checkpoint, until the engine exists
        self.samples_last_call = 0  # for the Throughput callback
        self.diverged: str | None = None
        self._fault = _nonfinite_fault()
        # VAEPIPE_RECORD_BATCHES=PATH: each rank appends "step rank x..." per training batch to
        # PATH.rank<r> (the tests of elastic resume check which samples every step read)
        self._record = os.environ.get("VAEPIPE_RECORD_BATCHES")
        self.val_examples: torch.Tensor | None = None  # first validation inputs, for reconstruction grids

    # --- the model: what a subclass (VQVAEModule) replaces -----------------------------------------

    def build_network(self, sample_shape: tuple[int, ...]):
        return build_vae(self.cfg.model, sample_shape)

    def fixed_prior_draws(self, gen: torch.Generator) -> torch.Tensor:
        return torch.randn(64, self.cfg.model.latent_dim, generator=gen)

    def training_terms(self, x: torch.Tensor, beta: float, generator: torch.Generator | None,
                       eps: torch.Tensor | None = None) -> dict:
        """The loss (scalar) and the per-example or scalar terms logged as train/<name>; `eps`: the
        step's noise when drawn by the caller (the compiled step)."""
        return self.objective(x, beta, generator=generator, eps=eps)[0]

    def step_noise(self, batch_size: int, rank: int, world_size: int, generator: torch.Generator):
        """This rank's slice of the standard normal noise of a global batch, [K, B, noise_dim]
        (None: the model draws its own, from `generator`)."""
        m = self.cfg.model
        eps = torch.randn((m.k, batch_size * world_size, self.vae.noise_dim), generator=generator,
                          device=generator.device)
        return eps if world_size == 1 else eps[:, rank * batch_size:(rank + 1) * batch_size].contiguous()

    def compile_supported(self) -> bool:
        """Whether the step's mathematics compiles as one graph: the VAE family's reparameterised
        and STL objectives (DReG's gradient hook and the score estimator's baselines stay eager)."""
        return self.cfg.model.estimator in ("reparam", "stl")

    def write_images(self, out_dir, tag: str) -> dict:
        from pipeline.images import write_model_grids

        return write_model_grids(self.vae, self.fixed_z, self.val_examples, out_dir, tag, seed=self.cfg.run.seed)

    def on_fit_start(self):
        manifest = getattr(self.trainer.datamodule, "manifest", None)
        if manifest is not None:
            check_pixel_data(self.vae, manifest, f"data.root '{self.cfg.data.root}'", self.cfg.data.binarize)

    # --- objective --------------------------------------------------------------------------------

    def beta(self, step: int | None = None) -> float:
        m = self.cfg.model
        return vae_math.linear_warmup(self.global_step if step is None else step, m.beta_warmup_steps, m.beta)

    def generator(self, *key) -> torch.Generator:
        """Noise for one step, a function of (seed, key, rank): no RNG state has to survive a restart
        for a resumed run to draw exactly the samples the uninterrupted run would have drawn."""
        rank = self.trainer.global_rank if self._trainer is not None else 0
        return torch.Generator(device=self.device).manual_seed(derived_seed(self.cfg.run.seed, *key, rank))

    def objective(self, x: torch.Tensor, beta: float, estimator: str | None = None,
                  generator: torch.Generator | None = None, eps: torch.Tensor | None = None):
        """(terms, mu, logvar): the network's objective (one or two stochastic layers) for a batch."""
        m = self.cfg.model
        return self.vae.objective(x, objective=m.objective, k=m.k, beta=beta, estimator=estimator or m.estimator,
                                  generator=generator, eps=eps)

    def _log_terms(self, stage: str, terms: dict, batch_size: int) -> None:
        """Validation/test: add the batch's sums over its own samples to the epoch's (logged as means
        by `_log_eval_means`). A batch of padding only (batch_size 0) adds zeros."""
        names = [f"{stage}/{name}" for name in terms if name != "loss"] + [f"{stage}/loss"]
        dtype = torch.float64 if self.device.type != "mps" else torch.float32
        if batch_size:
            values = [v.detach().to(dtype).mean() for name, v in terms.items() if name != "loss"]
            sums = torch.stack([*values, terms["loss"].detach().to(dtype)]) * batch_size
        else:
            sums = torch.zeros(len(names), dtype=dtype, device=self.device)
        _, before, n = self._eval_sums.get(stage, (names, 0, 0))
        self._eval_sums[stage] = (names, before + sums, n + batch_size)

    def _log_eval_means(self, stage: str) -> None:
        """The epoch's means over every rank's own samples: one all-reduce of the sums and the count.
        (Lightning's sync_dist averages the per-rank counts in the counts' integer type, which
        truncates when ranks evaluated different numbers of samples.)"""
        if stage not in self._eval_sums:
            return
        names, sums, n = self._eval_sums.pop(stage)
        total = torch.cat([sums, sums.new_tensor([n])])
        if self.trainer.world_size > 1:
            total = self.trainer.strategy.reduce(total, reduce_op="sum")
        means = total[:-1] / total[-1].clamp_min(1)
        self.log_dict({name: value.float() for name, value in zip(names, means)}, on_step=False, on_epoch=True)

    def bits_per_dim(self, terms: dict) -> dict:
        """bpd_elbo (an upper bound) and bpd_iwae<k> of the terms' per-example bounds in nats, for a
        likelihood of 8-bit values: -bound / (D ln 2) (docs/images.md); nothing for densities."""
        factor = self.vae.bits_per_dim
        if not factor:
            return {}
        return {f"bpd_{name}": -value * factor for name, value in terms.items()
                if name == "elbo" or name.startswith("iwae")}

    @staticmethod
    def own_samples(batch: dict) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """(x to evaluate, mask of the batch's own samples or None, how many are its own). With
        several ranks, evaluation batches are padded by repeats so that every rank runs the same
        steps (data/plan.py); the repeats are left out of the metrics. A batch of padding only is
        evaluated whole, and its values count for nothing (`_log_terms` with batch size 0)."""
        x, real = batch["x"], batch.get("real")
        if real is None or bool(real.all()):
            return x, None, x.shape[0]
        own = int(real.sum())
        return (x[real] if own else x), real, own

    # --- steps ------------------------------------------------------------------------------------

    def training_step(self, batches, batch_idx):
        """One call: an optimizer step for each batch of the list (fewer when max_steps ends it)."""
        trainer = self.trainer
        progress = trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        rank, world, every = trainer.global_rank, trainer.world_size, trainer.log_every_n_steps
        done, samples = 0, 0
        for batch in batches:
            step = self.global_step
            if 0 <= trainer.max_steps <= step:
                break
            x = batch["x"]
            if self.val_examples is None:  # pictures before the first validation (or without one)
                self.val_examples = x[:32 if x.dim() > 2 else 512].detach().clone()
            beta = self.beta(step)
            if self._record:
                with open(f"{self._record}.rank{rank}", "a") as f:
                    f.write(f"{step} {rank} {' '.join(f'{v:.7g}' for v in x.flatten(1)[:, 0].tolist())}\n")
            terms = self.engine.step(x, step, beta, rank, world, fault=self._fault_at(step))
            progress.increment_ready()
            progress.increment_completed()  # global_step += 1
            done, samples = done + 1, samples + x.shape[0]
            if (step + 1) % every == 0:
                self._log_step(terms, step, beta, batch)
                if self._check_divergence():
                    break
        # Lightning counts one batch per call and adds 1 after it; its logger step axis (val
        # metrics) follows optimizer steps when this counter is set from the step, not counted up:
        # a restart's bookkeeping can leave it one off (a run resumed after a validation).
        trainer.fit_loop.epoch_loop._batches_that_stepped = max(0, self.global_step - 1)
        epochs_done = trainer.max_epochs is not None and 0 <= trainer.max_epochs <= trainer.current_epoch + 1 and (
            self.global_step - trainer.current_epoch * trainer.datamodule.steps_per_epoch
            >= trainer.datamodule.steps_per_epoch)
        if 0 <= trainer.max_steps <= self.global_step or epochs_done:
            # Stopping here (not by Lightning's max_steps/max_epochs checks) makes Lightning validate
            # after this call unless it validates anyway (once): the run ends with its monitored
            # metric and best checkpoint also when max_steps falls before the first validation.
            trainer.should_stop = True
            every = trainer.check_val_every_n_epoch
            if every and (trainer.current_epoch + 1) % every:
                trainer.check_val_every_n_epoch = 1  # this epoch is not a validation epoch: the last one is
        self.samples_last_call = samples * world

    def _log_step(self, terms: dict, step: int, beta: float, batch: dict) -> None:
        """Step metrics to the loggers: the one host synchronisation, every trainer.log_every_n_steps."""
        names = [f"train/{k}" for k in terms if k != "loss"] + ["train/loss", "train/nonfinite_steps"]
        values = [v.detach().float().mean() for k, v in terms.items() if k != "loss"]
        values += [terms["loss"].detach().float(), self.engine.skipped.float()]
        if "shards_skipped" in batch:  # data.on_error=skip: unreadable shards this epoch (per worker)
            names.append("train/shards_skipped")
            values.append(batch["shards_skipped"].float())
        metrics = dict(zip(names, torch.stack(values).tolist()))
        metrics.update({f"train/{name}": value for name, value in
                        self.bits_per_dim({k[6:]: v for k, v in metrics.items() if k.startswith("train/")}).items()})
        metrics["train/beta"] = beta
        metrics["train/lr"] = float(self.engine.opt.param_groups[0]["lr"])  # a device tensor under the CUDA graph
        for logger in self.trainer.loggers:
            logger.log_metrics(metrics, step=step)
            logger.save()
        self.log("loss", metrics["train/loss"], prog_bar=True, on_step=True, on_epoch=False, logger=False)

    # --- the step engine and the non-finite guard -------------------------------------------------

    def compile_mode(self) -> str | None:
        """model.compile: auto compiles on CUDA (CUDA graphs: the step's launches replayed as one);
        on CPU compiling costs more than it saves in a short run, so only when asked."""
        choice = str(self.cfg.model.compile)
        if choice == "false" or (choice == "auto" and self.device.type != "cuda"):
            return None
        if not self.compile_supported():
            if choice == "true":
                print(f"note: model.compile=true: estimator {self.cfg.model.estimator!r} trains eagerly", flush=True)
            return None
        return "reduce-overhead" if self.device.type == "cuda" else "default"

    def on_train_start(self):
        if self.engine is None:
            trainer = self.trainer
            sched = trainer.lr_scheduler_configs[0].scheduler if trainer.lr_scheduler_configs else None
            self.engine = StepEngine(self, trainer.optimizers[0], sched, clip_val=self.cfg.trainer.gradient_clip_val,
                                     precision=str(trainer.precision), compile_mode=self.compile_mode(),
                                     cuda_graph=self.cfg.trainer.cuda_graph and trainer.world_size == 1)
            if self._engine_state:
                self.engine.load_state_dict(self._engine_state)
        ddp = self.trainer.strategy.model
        if hasattr(ddp, "require_backward_grad_sync"):
            ddp.require_backward_grad_sync = False  # the engine averages gradients itself (one all-reduce a step)

    def on_save_checkpoint(self, checkpoint):
        if self.engine is not None:
            checkpoint["step_engine"] = self.engine.state_dict()
        StepEngine.portable(checkpoint)

    def on_load_checkpoint(self, checkpoint):
        self._engine_state = checkpoint.get("step_engine")

    def _fault_at(self, step: int) -> str | None:
        if self._fault is None:
            return None
        at, kind, every = self._fault
        return kind if step == at or (every and step > at) else None

    def _check_divergence(self) -> bool:
        """Stop when optim.max_nonfinite_steps steps in a row were skipped (read from the device
        here, at logging steps and epoch ends only); the weights of the last good step stay."""
        longest = int(self.engine.longest.item())
        self.engine.longest.zero_()
        limit = self.cfg.optim.max_nonfinite_steps
        if longest < limit:
            return False
        what = "loss" if self.engine.loss_bad.item() else "gradient"
        self.diverged = (f"{longest} steps in a row had a non-finite {what} (limit optim.max_nonfinite_steps={limit}) "
                         f"at step {self.global_step}; the weights of the last good step are in "
                         "checkpoints/last.ckpt. Lower optim.lr, set trainer.gradient_clip_val, or use 32-true precision.")
        self.trainer.should_stop = True
        return True

    def on_train_epoch_end(self):
        if self.engine is not None and not self.diverged:
            self._check_divergence()

    def _eval_step(self, stage: str, batch, batch_idx):
        x, real, own = self.own_samples(batch)
        # Evaluation is always reparameterised and at the final beta, so losses compare across epochs.
        gen = self.generator(stage, batch_idx)  # the same draws at every validation: comparable epochs
        terms, mu, logvar = self.objective(x, self.cfg.model.beta, estimator="reparam", generator=gen)
        if self.cfg.model.eval_k > 0:
            k = self.cfg.model.eval_k
            with torch.no_grad():
                terms[f"iwae{k}"] = vae_math.iwae_bound(self.vae.log_weights(x, k, gen))
        terms.update(self.bits_per_dim(terms))
        self._log_terms(stage, terms, own)
        mu = mu.detach()
        if real is not None:  # whole batches (equal on every rank, for all_gather), padding marked
            full = mu.new_zeros(real.shape[0], *mu.shape[1:])
            full[real] = mu[:own]
            mu = torch.cat([full, real.to(mu.dtype)[:, None]], 1)
        elif self.trainer.world_size > 1:
            mu = torch.cat([mu, mu.new_ones(mu.shape[0], 1)], 1)
        self._val_mu.append(mu)
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
            mu = self.all_gather(mu).flatten(0, 1)  # last column: 1 for a rank's own sample, 0 for padding
            mu = mu[mu[:, -1] > 0, :-1]
        self.log(f"{stage}/active_units", float(vae_math.active_units(mu)), on_epoch=True, rank_zero_only=True)

    def on_validation_epoch_end(self):
        self._log_eval_means("val")
        self._log_active_units("val")

    def on_test_epoch_end(self):
        self._log_eval_means("test")
        self._log_active_units("test")

    # --- optimisation -----------------------------------------------------------------------------

    def total_steps(self) -> int:
        """Optimizer steps the run will make (Lightning's estimated_stepping_batches counts its
        batches, which are calls of several steps here)."""
        t = self.trainer
        spe = t.datamodule.steps_per_epoch if t.datamodule is not None else t.num_training_batches
        by_epochs = spe * t.max_epochs if t.max_epochs is not None and t.max_epochs >= 0 else None
        candidates = [n for n in (t.max_steps if t.max_steps >= 0 else None, by_epochs) if n is not None]
        return max(1, min(candidates)) if candidates else max(1, int(t.estimated_stepping_batches))

    def configure_optimizers(self):
        o = self.cfg.optim
        opt = make_optimizer(self.parameters(), o)
        if o.scheduler == "none" and o.warmup_steps <= 0:
            return opt
        total = self.total_steps() if o.scheduler == "cosine" else 1

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
