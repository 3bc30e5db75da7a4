"""Callbacks and plugins the training run uses: image grids, atomic checkpoint writes."""

from __future__ import annotations

import os
import random
import signal
import time
import warnings
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.utilities.rank_zero import rank_zero_info

from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import Checkpoint, ModelCheckpoint, TQDMProgressBar

from pipeline import signals
from pipeline.checkpoints import load_checkpoint
from pipeline.errors import Preempted
from pipeline.outputs import atomic_write, tensor_bytes


def is_own_checkpoint(path, ckpt_dir) -> bool:
    """A regular `*.ckpt` file directly in the run's checkpoint folder (links and `..` resolved): the
    only files vaepipe ever removes or moves there. Paths restored from a checkpoint's callback
    state are data, and may name anything (`<checkpoints>/../../victim`)."""
    path = Path(path)
    try:
        return (path.suffix == ".ckpt" and not path.is_symlink() and path.is_file()
                and path.resolve().parent == Path(ckpt_dir).resolve())
    except OSError:
        return False


class RunModelCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, restoring from a checkpoint only the kept files that are this run
    folder's own checkpoints (is_own_checkpoint): Lightning later deletes the "worst" kept path with a
    recursive delete, so a crafted `best_k_models` would otherwise delete any folder on resume."""

    def _generate_state_key(self, **kwargs) -> str:
        return f"ModelCheckpoint{kwargs!r}"  # Lightning's key: checkpoints of either class resume into the other

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        own = {p: v for p, v in (self.best_k_models or {}).items() if self.dirpath and is_own_checkpoint(p, self.dirpath)}
        if len(own) != len(self.best_k_models or {}):
            dropped = [p for p in self.best_k_models if p not in own]
            warnings.warn(f"ignoring {len(dropped)} kept checkpoint path(s) from the checkpoint's state that are not "
                          f"files of {self.dirpath} (e.g. {str(dropped[0])[:200]!r})")
        self.best_k_models = own
        pick = min if self.mode == "min" else max
        if self.kth_best_model_path not in own:
            self.kth_best_model_path = (max if self.mode == "min" else min)(own, key=own.get) if own else ""
            self.kth_value = own[self.kth_best_model_path] if own else self.kth_value
        if self.best_model_path and not is_own_checkpoint(self.best_model_path, self.dirpath or ""):
            self.best_model_path = pick(own, key=own.get) if own else ""
            self.best_model_score = own[self.best_model_path] if own else None
        if self.last_model_path and not is_own_checkpoint(self.last_model_path, self.dirpath or ""):
            self.last_model_path = ""


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temp file in the same folder, fsync, then rename (pipeline/outputs.py): a crash
    or a full disk mid-write leaves the previous checkpoint intact instead of a truncated file with
    the final name, and a refused write is one clear line. Reads (Lightning's
    resume path) go through the safe loader whatever `weights_only` Lightning passes."""

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        if not Path(path).is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        return load_checkpoint(path, map_location=map_location or "cpu")

    def __init__(self, ckpt_dir: str | Path | None = None):
        super().__init__()
        self.ckpt_dir = ckpt_dir  # the only folder whose checkpoints remove_checkpoint deletes

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        atomic_write(path, lambda f: torch.save(checkpoint, f), "checkpoint", need=tensor_bytes(checkpoint) + 2**16)

    def remove_checkpoint(self, path) -> None:
        """Lightning's remove is a recursive delete of whatever path it is given; here only a regular
        `*.ckpt` file of the run's checkpoint folder is removed, anything else is left and said."""
        if self.ckpt_dir is not None and is_own_checkpoint(path, self.ckpt_dir):
            Path(path).unlink(missing_ok=True)
        elif Path(path).exists() or Path(path).is_symlink():
            warnings.warn(f"not removing {path}: only checkpoint files of {self.ckpt_dir} are ever removed")


class ImageGrids(pl.Callback):
    """Every N validation epochs (and at the end): samples from fixed prior draws, reconstructions,
    latent traversals (or, for 2-D data, a scatter of data vs samples) as PNG in the run folder,
    and to wandb under pictures/<kind> when that is the logger. Rank 0 only."""

    def __init__(self, out_dir: str | Path, every_n_epochs: int = 1):
        self.out_dir, self.every = Path(out_dir), every_n_epochs
        self.latest: dict[str, Path] = {}

    def _write(self, trainer, module, tag: str) -> None:
        was_training = module.training
        module.eval()
        self.latest = module.write_images(self.out_dir, tag)
        module.train(was_training)
        from pytorch_lightning.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and self.latest:
                import wandb

                # one history row per picture set, on the trainer/global_step axis; wandb keeps media
                # under media/images/<key>, so a key "images/..." made media/images/images/
                logger.log_metrics({f"pictures/{kind}": wandb.Image(str(path), caption=tag)
                                    for kind, path in self.latest.items()}, step=trainer.global_step)

    def on_validation_epoch_end(self, trainer, module):
        if self.every <= 0 or trainer.sanity_checking or not trainer.is_global_zero:
            return
        if trainer.current_epoch % self.every and not trainer.should_stop:
            return
        self._write(trainer, module, f"epoch{trainer.current_epoch:03d}")

    def on_train_end(self, trainer, module):
        """Pictures of the final weights, also when max_steps stopped training between validations."""
        if self.every > 0 and trainer.is_global_zero:
            self._write(trainer, module, "final")


class LastCheckpoint(Checkpoint):
    """The one owner of last.ckpt, always written inside the loop where the saved progress is
    consistent (after a validation, at an epoch's end, at max_steps, and on a signal), so a resume
    continues at exactly the next batch. A `Checkpoint` callback placed after the ModelCheckpoints:
    Lightning runs checkpoint callbacks last, in their order, so last.ckpt holds the best and
    periodic checkpoints' tracking as updated at the same hook (not one validation behind).

    SIGUSR1 or SIGTERM: all ranks agree on a step, save there and stop. The signal may reach every
    rank (Slurm) or only the process the user launched (a local DDP run): the handler only sets a
    flag, and after every training call the ranks all-reduce their flags, so all of them see it at
    the same step. This replaces Lightning's own SIGTERM handling (which kills the child processes
    and stops without a checkpoint) for the duration of training.

    With several steps per call (trainer.steps_per_call) this happens at the end of the call in
    progress: the checkpoint is at that call's last step.

    Fault injection for tests: VAEPIPE_FAULT=STEP:SIGNAL (e.g. 12:TERM, 12:KILL) makes rank 0
    signal itself at the end of the call that made step STEP; KILL takes down its whole process group when it leads one
    (a crashed node), else only itself."""

    def __init__(self, ckpt_path: str | Path):
        self.ckpt_path = Path(ckpt_path)
        self.stopped_at: int | None = None  # global step of the signal checkpoint, if any
        step, _, kind = os.environ.get("VAEPIPE_FAULT", "").partition(":")
        self.fault = (int(step), getattr(signal, "SIG" + kind)) if hasattr(signal, "SIG" + kind) and kind else None
        signals.install()  # `vaepipe fit` did already; this covers other callers of fit()

    def save(self, trainer) -> None:
        trainer.save_checkpoint(self.ckpt_path, False)  # not weights only: the full state; every rank calls it, rank 0 writes (atomically)

    def on_train_start(self, trainer, module):
        signals.install()  # again: Lightning installed its SIGTERM handler meanwhile

    def _inject_fault(self, trainer):
        step, sig = self.fault
        if trainer.global_step < step or trainer.global_rank != 0:  # at the end of the call that made step STEP
            return
        self.fault = None
        if sig == signal.SIGKILL and os.getpgrp() == os.getpid():
            os.killpg(os.getpgrp(), signal.SIGKILL)
        os.kill(os.getpid(), sig)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.fault:
            self._inject_fault(trainer)
        received = signals.received()
        stop = received is not None
        if trainer.world_size > 1 and dist.is_initialized():
            flag = torch.tensor([int(stop)], device=module.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
        if stop:
            self.save(trainer)
            self.stopped_at = trainer.global_step
            name = signal.Signals(received).name if received else "a signal on another rank"
            rank_zero_info(f"{name}: checkpoint of step {trainer.global_step} saved to {self.ckpt_path}; stopping")
            raise Preempted(trainer.global_step, name)  # every rank, at this same step
        if trainer.global_step == trainer.max_steps:
            self.save(trainer)

    def on_validation_end(self, trainer, module):
        if not trainer.sanity_checking:
            self.save(trainer)

    def on_train_epoch_end(self, trainer, module):
        self.save(trainer)


class SweepReport(pl.Callback):
    """A trial of a local sweep (VAEPIPE_SWEEP_DIR/VAEPIPE_SWEEP_TRIAL, set by `vaepipe sweep trial`):
    after each validation rank 0 reports the sweep's metric to the study as the next iteration
    (pipeline/launch/search.py); when its pruner says so, every rank stops here, cleanly: last.ckpt
    and summary.json are written as at any end, the summary marked `pruned`. The iteration count
    is in the checkpoint, so a resumed trial goes on counting (and does not report twice)."""

    def __init__(self, folder: str, number: int, metric: str):
        self.folder, self.number, self.metric = folder, number, metric
        self.iteration = 0
        self.pruned: dict | None = None
        self.study = None  # opened at the first report and kept: the journal storage reads what other agents
        # appended at each access, so the pruner still compares with every trial's latest reports

    def _open_study(self):
        if self.study is None:
            from pipeline.launch.search import open_study
            from pipeline.launch.sweep import load_sweep

            self.study = open_study(self.folder, load_sweep(Path(self.folder) / "sweep.yaml", compose=False))
        return self.study

    def on_validation_end(self, trainer, module):
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self.iteration += 1
        decision = None
        if trainer.is_global_zero:
            value = trainer.callback_metrics.get(self.metric)
            value = float(value) if value is not None else None
            if value is not None and np.isfinite(value):
                try:
                    from pipeline.launch.search import report

                    if report(self.folder, self.number, value, self.iteration, study=self._open_study()):
                        decision = {"iteration": self.iteration, "step": trainer.global_step, "value": value}
                except Exception as err:  # noqa: BLE001 - the study's bookkeeping must never end the training
                    self.study = None  # opened again at the next validation
                    rank_zero_info(f"sweep: could not report validation {self.iteration} to the study "
                                   f"({type(err).__name__}: {err}); training goes on")
        self.pruned = trainer.strategy.broadcast(decision, src=0)  # every rank: the same stop, the same summary
        if self.pruned:
            trainer.should_stop = True
            rank_zero_info(f"sweep: pruned at validation {self.iteration} (step {trainer.global_step}, "
                           f"{self.metric} = {self.pruned['value']:.6g}): worse than the study's other trials there")

    def state_dict(self) -> dict:
        return {"iteration": self.iteration}

    def load_state_dict(self, state_dict: dict) -> None:
        self.iteration = int(state_dict.get("iteration", 0))


class RankStates(pl.Callback):
    """Every rank's RNG states (torch, CUDA, numpy, python) in the checkpoint, each restored on its
    own rank. Training noise is seeded per step (VAEModule.generator), so exactness does not rest
    on these; they keep any other randomness a user adds continuous across restarts."""

    def state_dict(self) -> dict:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        # plain tensors and numbers only, so checkpoints still load with torch.load(weights_only=True)
        numpy_state = [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]
        mine = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        if dist.is_available() and dist.is_initialized():
            states = [None] * dist.get_world_size()
            dist.all_gather_object(states, mine)
            return {"rng": states}
        return {"rng": [mine]}

    def load_state_dict(self, state_dict: dict) -> None:
        states = state_dict.get("rng", [])
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if rank < len(states):
            s = states[rank]
            torch.set_rng_state(s["torch"])
            name, keys, pos, has_gauss, cached = s["numpy"]
            np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
            random.setstate(s["python"])
            if s["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(s["cuda"])


class Throughput(pl.Callback):
    """Steady-state training throughput: samples per second over all ranks, from the end of step
    `warmup` to the last step, validation time excluded (checkpoint writes and logging included).
    Reported in summary.json and at the end of `vaepipe fit`."""

    def __init__(self, warmup: int = 20):
        self.warmup = warmup
        self.t0: float | None = None
        self.samples = 0
        self.excluded = 0.0
        self._val_start: float | None = None
        self.elapsed = 0.0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if module.device.type == "cuda" and self.t0 is None and trainer.global_step >= self.warmup:
            torch.cuda.synchronize()  # once, at the start of the timed window
        now = time.perf_counter()
        if self.t0 is None:
            if trainer.global_step >= self.warmup:
                self.t0 = now
            return
        self.samples += module.samples_last_call  # the call's optimizer steps x batch, all ranks
        self.elapsed = now - self.t0 - self.excluded

    def on_validation_start(self, trainer, module):
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer, module):
        if self._val_start is not None and self.t0 is not None:
            self.excluded += time.perf_counter() - self._val_start
        self._val_start = None

    def on_train_end(self, trainer, module):
        if module.device.type == "cuda" and self.t0 is not None:
            torch.cuda.synchronize()  # the queued steps belong to the window
            self.elapsed = time.perf_counter() - self.t0 - self.excluded

    @property
    def samples_per_s(self) -> float | None:
        return self.samples / self.elapsed if self.elapsed > 0 else None


class StepProgressBar(TQDMProgressBar):
    """Lightning's bar counting optimizer steps, not Lightning batches (a batch is a call of
    trainer.steps_per_call steps): the count, rate and ETA a user expects."""

    def __init__(self, steps_per_epoch, refresh_rate: int = 10):
        super().__init__(refresh_rate=refresh_rate)
        self._steps_per_epoch = steps_per_epoch  # a callable: the datamodule knows it

    @property
    def total_train_batches(self):
        return self._steps_per_epoch()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        n = trainer.global_step - trainer.current_epoch * self.total_train_batches
        bar = self.train_progress_bar
        if not bar.disable and (n - bar.n >= self.refresh_rate or n >= self.total_train_batches):
            bar.n = n
            bar.refresh()
            bar.set_postfix(self.get_metrics(trainer, module))
