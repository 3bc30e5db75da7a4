"""The LightningDataModule: the training data as calls of the step engine (resident on the device
or streamed from shards), for the trainer's rank and world size, and every rank's position in each
checkpoint (exact resume, docs/resume.md)."""

from __future__ import annotations

import functools
import math

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from pipeline.data import resident as res
from pipeline.data.location import load_manifest
from pipeline.data.plan import EpochPlan
from pipeline.data.stream import make_loader
from pipeline.errors import ResumeError
from pipeline.redact import redact_text


class StepCalls:
    """What Lightning iterates in training: one item per call of the step engine, a list of up to
    `k` consecutive steps' batches (`VAEModule.training_step` makes one optimizer step for each),
    so Lightning's per-batch machinery is paid once per k optimizer steps. Call j of an epoch ends
    at step (j + 1) k of the epoch (the last one may be short), also on resume: an epoch resumed at
    step `first` (a run stopped inside a call by max_steps, or resumed with another k) starts with
    the rest of its call, so periodic checkpoints and validation every N steps stay on their steps.
    `len` counts the calls before `first` (first // k) too, so Lightning's epoch ends where ours
    does and its batch index is the call's."""

    def __init__(self, k: int):
        self.k, self.first, self.steps, self.batches = k, 0, 0, None

    def start(self, first: int, steps: int, batches) -> "StepCalls":
        self.first, self.steps, self.batches = first, steps, batches
        return self

    def __len__(self) -> int:
        return max(self.first // self.k, math.ceil(self.steps / self.k))

    def __iter__(self):
        it, i = iter(self.batches()), self.first
        while i < self.steps:
            end = min(self.steps, (i // self.k + 1) * self.k)
            call = [batch for _, batch in zip(range(end - i), it)]
            if not call:
                return
            yield call
            i += len(call)


def align_call_counters(trainer: pl.Trainer, current: int, total: int) -> None:
    """Set Lightning's count of the calls made (this epoch: `current`; the run: `total`) to what
    the run's steps imply in calls of this run's k. Lightning validates every N steps by its batch
    index (calls) and restores the count it saved, which is another number when the run stopped
    inside a call (max_steps) or ran with another trainer.steps_per_call. Every counter of a
    tracker moves by the same amount, so Lightning's restart bookkeeping (which compares them)
    reads as before."""
    progress = trainer.fit_loop.epoch_loop.batch_progress
    for tracker, want in ((progress.current, current), (progress.total, total)):
        shift = want - tracker.processed
        tracker.ready, tracker.started = tracker.ready + shift, tracker.started + shift
        tracker.processed, tracker.completed = tracker.processed + shift, tracker.completed + shift


class ShardDataModule(pl.LightningDataModule):
    """train/val/test data from a data root, for the trainer's rank and world size.

    `data.resident` (auto | true | false): train and val splits held on the training device when
    they fit `data.resident_max_gb` (0: a quarter of the device's memory), else streamed from the
    shards. Training batches come in calls of `set_steps_per_call(k)` steps (trainer.steps_per_call).

    Its state (saved in every checkpoint) is the position in the epoch's global order (epoch and
    global batches done), gathered from all ranks, with the topology that wrote it. On resume every
    rank continues there, on this topology or another with the same global batch (docs/resume.md)."""

    def __init__(self, data_cfg, seed: int = 0, *, world_size: int = 1,
                 device: torch.device | str = "cpu", limit_train_batches=None, log=print):
        super().__init__()
        self.cfg, self.seed, self.log_fn = data_cfg, seed, log
        self.manifest = load_manifest(data_cfg.root, data_cfg.get("shards"))
        self.world_hint, self.device_hint, self.limit = world_size, torch.device(device), limit_train_batches
        self.resident = self._choose_resident()
        self._resume: dict | None = None  # this rank's saved position, until its epoch's calls are built
        self._train_loader: DataLoader | None = None  # streaming only
        self._train_split: res.ResidentSplit | None = None  # resident only
        self._calls = StepCalls(1)  # steps per call: set_steps_per_call
        self._val_loader = None

    # --- which path, how many steps ----------------------------------------------------------------

    def _choose_resident(self) -> bool:
        mode = str(self.cfg.resident).lower()
        if mode not in ("auto", "true", "false"):
            raise ValueError(f"bad value for 'data.resident': {self.cfg.resident!r}; choose auto, true or false")
        if mode == "false":
            self.log_fn("data: streaming from shards (data.resident=false)")
            return False
        need = sum(res.split_bytes(self.manifest["splits"][s]) for s in ("train", "val") if s in self.manifest["splits"])
        budget = int(self.cfg.resident_max_gb * res.GIB) if self.cfg.resident_max_gb > 0 else res.default_budget(self.device_hint)
        fits = need <= budget
        if mode == "true" and not fits:
            self.log_fn(f"data.resident=true: train+val take {need / 2**20:.0f} MB, above the budget of "
                        f"{budget / 2**20:.0f} MB (data.resident_max_gb); loading them anyway")
        if mode == "auto" and not fits:
            self.log_fn(f"data: streaming from shards (train+val {need / 2**20:.0f} MB > resident budget "
                        f"{budget / 2**20:.0f} MB; data.resident_max_gb raises it)")
        return fits or mode == "true"

    def set_steps_per_call(self, k: int) -> None:
        self._calls.k = k

    def _limited(self, steps: int) -> int:
        lim = self.limit
        if lim is None:
            return steps
        return max(1, min(steps, int(lim))) if isinstance(lim, int) or float(lim) > 1 else max(1, int(steps * float(lim)))

    @functools.cached_property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch on every rank (the same for every epoch): the full global batches
        of the split, whatever the path, number of ranks or workers (data/order.py)."""
        n, g = self.manifest["splits"]["train"]["num_samples"], self.cfg.batch_size * self.world_hint
        if n // g == 0:
            raise ValueError(f"{n} training samples cannot make one global batch of {g} ({self.world_hint} "
                             f"process(es) x data.batch_size={self.cfg.batch_size}): lower data.batch_size")
        return self._limited(n // g)

    @property
    def last_plan(self) -> EpochPlan | None:
        """The current training epoch's plan (dropped / repeated samples, for reports; streaming)."""
        return self._train_loader.dataset.plan if self._train_loader is not None else None

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["splits"]["train"]["shape"])

    def _rank_world(self) -> tuple[int, int]:
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def _device(self) -> torch.device:
        return self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")

    def _topology(self) -> dict:
        """What a position means: the global order's inputs (must match on resume) and the topology
        that wrote it (may change: docs/resume.md)."""
        _, world = self._rank_world()
        return {"world_size": world, "num_workers": 0 if self.resident else self.cfg.num_workers,
                "batch_size": self.cfg.batch_size, "global_batch": self.cfg.batch_size * world, "seed": self.seed,
                "root": redact_text(str(self.cfg.root)), "order": "global", "window": self.cfg.shuffle_buffer,
                "path": "resident" if self.resident else "stream", "steps_per_epoch": self.steps_per_epoch}

    def _check_world(self) -> None:
        _, world = self._rank_world()
        if world != self.world_hint:
            raise ValueError(f"the run has {world} processes but the data plan was made for {self.world_hint} "
                             "(trainer.devices x trainer.num_nodes): set trainer.devices to a number")

    # --- loaders ------------------------------------------------------------------------------------

    def _stream(self, split: str, train: bool = False, skip: int = 0, epoch: int = 0) -> DataLoader:
        rank, world = self._rank_world()
        return make_loader(self.cfg.root, split, self.cfg.batch_size if train else self.cfg.eval_batch_size,
                           steps=self.steps_per_epoch if train else None,
                           shuffle=train, seed=self.seed, epoch=epoch, shuffle_buffer=self.cfg.shuffle_buffer,
                           num_workers=self.cfg.num_workers, binarize=self.cfg.binarize, manifest=self.manifest,
                           rank=rank, world_size=world, skip=skip, on_error=self.cfg.on_error,
                           worker_start=self.cfg.worker_start, persistent=split != "test", verify=self.cfg.verify)

    def _resident(self, split: str, train: bool) -> res.ResidentSplit:
        rank, world = self._rank_world()
        data = res.load_split(self.cfg.root, split, self.manifest, self._device(), self.cfg.on_error, self.cfg.verify)
        counts = [sh["num_samples"] for sh in self.manifest["splits"][split]["shards"]]
        return res.ResidentSplit(data, batch_size=self.cfg.batch_size if train else self.cfg.eval_batch_size,
                                 scale=self.manifest["scale"], binarize=self.cfg.binarize, seed=self.seed, rank=rank,
                                 world_size=world, train=train, limit_steps=self.steps_per_epoch if train else None,
                                 counts=counts, window=self.cfg.shuffle_buffer)

    def train_dataloader(self):
        """Lightning asks at every epoch start (reload_dataloaders_every_n_epochs=1), after its own
        restart bookkeeping, so the current epoch is right here whatever the resume path. One
        resident split or one streaming loader (its workers kept alive: starting them costs ~1 s,
        most of a small epoch) serves the whole run, moved to each epoch here."""
        self._check_world()
        t = self.trainer
        epoch = t.current_epoch if t is not None else 0
        first, steps = 0, self.steps_per_epoch
        if self._resume is not None and self._resume["epoch"] == epoch:
            first, self._resume = self._resume["steps"], None
            if t is not None:
                done = first // self._calls.k
                align_call_counters(t, done, epoch * math.ceil(steps / self._calls.k) + done)
        if self.resident:
            if self._train_split is None:
                self._train_split = self._resident("train", train=True)
                mb = self._train_split.data.numel() * self._train_split.data.element_size() / 2**20
                n, planned = self._train_split.data.shape[0], self.manifest["splits"]["train"]["num_samples"]
                short = (f", {planned - n} unreadable left out (data.on_error=skip): the epochs repeat samples "
                         "to keep their steps" if n < planned else "")
                self.log_fn(f"data: train split resident on {self._device()} ({mb:.0f} MB, {n} samples{short}; "
                            f"{steps} steps of {self.cfg.batch_size} per epoch, {self._calls.k} per call)")
            split = self._train_split
            return self._calls.start(first, steps,
                                     lambda: (split.batch(epoch, i) for i in range(first, steps)))
        if self._train_loader is None:
            self._train_loader = self._stream("train", train=True, skip=first, epoch=epoch)
        else:
            self._train_loader.dataset.set_epoch(epoch)
        return self._calls.start(first, steps, lambda: self._train_loader)

    def val_dataloader(self):
        """The same batches at every validation (resident, or a loader whose workers stay alive)."""
        if self._val_loader is None:
            self._val_loader = (res.EvalBatches(self._resident("val", train=False)) if self.resident
                                else self._stream("val"))
        return self._val_loader

    def test_dataloader(self):
        return self._stream("test")

    # --- exact resume ---------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Called on every rank while a checkpoint is assembled: gather all ranks' positions. Every
        epoch has `steps_per_epoch` steps and every step (a skipped non-finite one too) consumes a
        batch, so the steps done in the current epoch follow from the global step."""
        t = self.trainer
        epoch = t.current_epoch if t is not None else 0
        steps = t.global_step - epoch * self.steps_per_epoch if t is not None else 0
        mine = {"rank": self._rank_world()[0], "epoch": epoch, "batches": int(steps), **self._topology()}
        ranks = [mine]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            ranks = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(ranks, mine)
        return {"stream_positions": ranks}

    def load_state_dict(self, state: dict) -> None:
        """Continue at the checkpoint's global position. The global order's inputs (global batch,
        seed, shuffle window, steps per epoch) must match; the number of processes, nodes and
        loader workers, and resident or streamed, may change (train.elastic_batch_size keeps the
        global batch when the number of processes changes)."""
        ranks = state.get("stream_positions") or []
        if not ranks:
            return
        now, saved = self._topology(), ranks[0]
        if saved.get("order") != "global":
            raise ResumeError(
                "this checkpoint was written by a vaepipe from before the global sample order (its data order "
                f"depended on the topology: {saved.get('order', 'stream')}); it cannot continue its epoch with this "
                "version. Resume it with the vaepipe that wrote it, or start a new run folder.")
        names = {"global_batch": "global batch (data.batch_size x processes)", "seed": "run.seed",
                 "window": "data.shuffle_buffer", "steps_per_epoch": "steps per epoch"}
        differ = [k for k in names if saved.get(k) != now[k]]
        if differ:
            raise ResumeError(
                "cannot resume the data order exactly: the checkpoint was written with "
                + ", ".join(f"{names[k]} = {saved.get(k)}" for k in differ) + "; this run has "
                + ", ".join(f"{names[k]} = {now[k]}" for k in differ) + " (steps per epoch follow from the global "
                "batch and trainer.limit_train_batches). Resume with the same values, or start a new run folder "
                "(run.resume=never starts this one over, its checkpoints set aside).")
        positions = {(p["epoch"], p["batches"]) for p in ranks}
        if len(positions) != 1:
            raise ResumeError(f"the checkpoint's ranks stopped at different positions {sorted(positions)}")
        epoch, steps = positions.pop()
        changed = [f"{k} {saved.get(k)} -> {now[k]}" for k in ("world_size", "num_workers", "path")
                   if saved.get(k) != now[k]]
        if changed:
            self.log_fn(f"data: resuming at epoch {epoch}, global batch {steps} on a new topology "
                        f"({', '.join(changed)}); the global order continues where it stopped")
        self._resume = {"epoch": epoch, "steps": steps}
