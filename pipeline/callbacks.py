"""Callbacks and plugins the training run uses: image grids, atomic checkpoint writes."""

from __future__ import annotations

import os
from pathlib import Path

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from pipeline.images import write_model_grids


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save to a temp file in the same folder, fsync, then rename: a crash mid-write leaves
    the previous checkpoint intact instead of a truncated file with the final name."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


class FinalCheckpoint(pl.Callback):
    """Save last.ckpt when training ends: max_steps may stop between validations, where
    ModelCheckpoint would leave last.ckpt at an older step."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_train_end(self, trainer, module):
        trainer.save_checkpoint(self.path)  # every rank calls it; rank 0 writes


class ImageGrids(pl.Callback):
    """Every N validation epochs: samples from fixed prior draws and reconstructions, as PNG."""

    def __init__(self, out_dir: str | Path, every_n_epochs: int = 1):
        self.out_dir, self.every = Path(out_dir), every_n_epochs
        self.latest: list[Path] = []

    def on_validation_epoch_end(self, trainer, module):
        if self.every <= 0 or trainer.sanity_checking or not trainer.is_global_zero:
            return
        if trainer.current_epoch % self.every and not trainer.should_stop:
            return
        self.latest = write_model_grids(module.vae, module.fixed_z, module.val_examples, self.out_dir,
                                        f"epoch{trainer.current_epoch:03d}")

    def on_train_end(self, trainer, module):
        """Grids of the final weights, also when max_steps stopped training between validations."""
        if self.every > 0 and trainer.is_global_zero:
            was_training = module.training
            module.eval()
            self.latest = write_model_grids(module.vae, module.fixed_z, module.val_examples, self.out_dir, "final")
            module.train(was_training)
