"""The LightningDataModule: loaders for the trainer's rank and world size, and every rank's stream
position in each checkpoint (exact resume, docs/resume.md)."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from pipeline.data.location import load_manifest
from pipeline.data.plan import EpochPlan
from pipeline.data.stream import make_loader
from pipeline.errors import ResumeError


class ShardDataModule(pl.LightningDataModule):
    """train/val/test loaders from a data root, for the trainer's rank and world size.

    Its state (saved in every checkpoint) is each rank's stream position: epoch and batches
    consumed, gathered from all ranks, with the topology they were computed for. On resume every
    rank restarts its stream exactly there; a different topology is refused (see docs/resume.md)."""

    def __init__(self, data_cfg, seed: int = 0):
        super().__init__()
        self.cfg, self.seed = data_cfg, seed
        self.manifest = load_manifest(data_cfg.root)
        self._resume: dict | None = None  # this rank's saved position, until its epoch's loader is built
        self._train_loader: DataLoader | None = None
        self._val_loader: DataLoader | None = None

    @property
    def last_plan(self) -> EpochPlan | None:
        """The current training epoch's plan (dropped / repeated samples, for reports)."""
        return self._train_loader.dataset.plan if self._train_loader is not None else None

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["splits"]["train"]["shape"])

    def _rank_world(self) -> tuple[int, int]:
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def _topology(self) -> dict:
        _, world = self._rank_world()
        return {"world_size": world, "num_workers": self.cfg.num_workers, "batch_size": self.cfg.batch_size,
                "seed": self.seed, "root": str(self.cfg.root)}

    def _loader(self, split: str, train: bool = False) -> DataLoader:
        rank, world = self._rank_world()
        epoch = self.trainer.current_epoch if (train and self.trainer is not None) else 0
        skip = 0
        if train and self._resume is not None and self._resume["epoch"] == epoch:
            skip, self._resume = self._resume["batches"], None
        loader = make_loader(self.cfg.root, split, self.cfg.batch_size if train else self.cfg.eval_batch_size,
                             shuffle=train, seed=self.seed, epoch=epoch, shuffle_buffer=self.cfg.shuffle_buffer,
                             num_workers=self.cfg.num_workers, binarize=self.cfg.binarize, manifest=self.manifest,
                             rank=rank, world_size=world, skip=skip, on_error=self.cfg.on_error,
                             worker_start=self.cfg.worker_start, persistent=split != "test")
        return loader

    def train_dataloader(self):
        """Lightning asks at every epoch start (reload_dataloaders_every_n_epochs=1), after its own
        restart bookkeeping, so the current epoch is right here whatever the resume path. One loader
        serves the whole run, its workers kept alive (starting them costs ~1 s, most of a small
        epoch): it is moved to the epoch, and each worker reads that epoch's plan, shuffle and
        binarisation when Lightning starts the epoch's iteration."""
        if self._train_loader is None:
            self._train_loader = self._loader("train", train=True)
        else:
            self._train_loader.dataset.set_epoch(self.trainer.current_epoch if self.trainer is not None else 0)
        return self._train_loader

    def val_dataloader(self):
        """The same loader at every validation, its workers kept alive (the split never changes)."""
        if self._val_loader is None:
            self._val_loader = self._loader("val")
        return self._val_loader

    def test_dataloader(self):
        return self._loader("test")

    # --- exact resume ---------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Called on every rank while a checkpoint is assembled: gather all ranks' positions."""
        t = self.trainer
        batches = t.fit_loop.epoch_loop.batch_progress.current.processed if t is not None else 0
        mine = {"rank": self._rank_world()[0], "epoch": t.current_epoch if t is not None else 0,
                "batches": int(batches), **self._topology()}
        ranks = [mine]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            ranks = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(ranks, mine)
        return {"stream_positions": ranks}

    def load_state_dict(self, state: dict) -> None:
        ranks = state.get("stream_positions") or []
        rank, _ = self._rank_world()
        now = self._topology()
        if not ranks:
            return
        saved = {k: ranks[0][k] for k in now}
        if len(ranks) != now["world_size"] or any(saved[k] != now[k] for k in ("world_size", "num_workers", "batch_size", "seed")):
            raise ResumeError(
                "cannot resume the data stream exactly: the checkpoint was written with "
                f"world_size={saved['world_size']}, data.num_workers={saved['num_workers']}, "
                f"data.batch_size={saved['batch_size']}, run.seed={saved['seed']}; this run has "
                f"world_size={now['world_size']}, data.num_workers={now['num_workers']}, "
                f"data.batch_size={now['batch_size']}, run.seed={now['seed']}. Resume with the same "
                "values, or start a new run folder (run.resume=never keeps the old one untouched).")
        self._resume = {"epoch": ranks[rank]["epoch"], "batches": ranks[rank]["batches"]}
