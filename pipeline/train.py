"""`vaepipe fit`: prepare data if needed, build the module and the Lightning Trainer, train."""

from __future__ import annotations

import time
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar

from pipeline.callbacks import AtomicCheckpointIO, FinalCheckpoint, ImageGrids
from pipeline.config import ConfigError, to_yaml
from pipeline.data.shards import MANIFEST, prepare
from pipeline.data.sources import SOURCE_NAMES
from pipeline.data.stream import ShardDataModule
from pipeline.models.vae_module import VAEModule

GENERATED = ("sprites", "gmm")  # sources that need no input file


def ensure_prepared(data_cfg, seed: int, log=print) -> None:
    """Prepare the shards when the data root has no manifest and `data.prepare` allows it."""
    root = Path(data_cfg.root)
    if (root / MANIFEST).exists():
        return
    if not data_cfg.prepare:
        raise FileNotFoundError(f"no {MANIFEST} in data.root '{root}' and data.prepare=false")
    if data_cfg.name not in SOURCE_NAMES:
        raise ConfigError(f"bad value for 'data.name': {data_cfg.name!r}; choose one of {', '.join(SOURCE_NAMES)}")
    if data_cfg.name not in GENERATED and not data_cfg.source:
        raise FileNotFoundError(
            f"data.root '{root}' has no {MANIFEST}; data set '{data_cfg.name}' needs its raw files: set "
            f"data.source=PATH (or run `vaepipe prepare {data_cfg.name} --source PATH --out {root}`)")
    log(f"preparing '{data_cfg.name}' shards in {root} ...")
    prepare(data_cfg.name, root, source=data_cfg.source, seed=seed, shard_bytes=data_cfg.shard_bytes,
            shard_samples=data_cfg.shard_samples, log=log)


def resume_checkpoint(cfg: DictConfig, ckpt_dir: Path) -> str | None:
    """run.resume: auto (newest last.ckpt in the run folder, if any), never, or a checkpoint path."""
    mode = cfg.run.get("resume", "auto")
    if mode == "never":
        return None
    if mode != "auto":
        if not Path(mode).is_file():
            raise FileNotFoundError(f"run.resume={mode}: no such checkpoint")
        return mode
    last = ckpt_dir / "last.ckpt"
    return str(last) if last.is_file() else None


def build_trainer(cfg: DictConfig, run_dir: Path, images: ImageGrids) -> pl.Trainer:
    ckpt_dir = run_dir / "checkpoints"
    callbacks = [
        ModelCheckpoint(dirpath=ckpt_dir, filename="best-{epoch:03d}-{step}", monitor=cfg.run.monitor, mode="min",
                        save_top_k=cfg.run.save_top_k, save_last=True, auto_insert_metric_name=False),
        images,
        FinalCheckpoint(ckpt_dir / "last.ckpt"),
    ]
    if cfg.trainer.enable_progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=10))
    if cfg.run.every_n_train_steps > 0:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="step-{step}", save_top_k=-1,
                                         every_n_train_steps=cfg.run.every_n_train_steps))
    logger = build_logger(cfg, run_dir)
    if logger:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return pl.Trainer(**kwargs, default_root_dir=str(run_dir), callbacks=callbacks, logger=logger,
                      plugins=[AtomicCheckpointIO()], reload_dataloaders_every_n_epochs=1)


def build_logger(cfg: DictConfig, run_dir: Path):
    backend = cfg.logger.backend
    if backend == "none":
        return False
    if backend == "csv":
        from pytorch_lightning.loggers import CSVLogger

        return CSVLogger(save_dir=str(run_dir), name="logs", version="")
    if backend == "tensorboard":
        from pytorch_lightning.loggers import TensorBoardLogger

        return TensorBoardLogger(save_dir=str(run_dir), name="logs", version="")
    from pytorch_lightning.loggers import WandbLogger

    return WandbLogger(project=cfg.logger.project, save_dir=str(run_dir), offline=cfg.logger.mode == "offline",
                       mode=cfg.logger.mode, name=cfg.run.name, config=OmegaConf.to_container(cfg, resolve=True))


def fit(cfg: DictConfig) -> dict:
    """Train as configured; returns the paths a user wants next (checkpoint, config, images)."""
    t0 = time.time()
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    pl.seed_everything(cfg.run.seed, workers=True, verbose=False)
    ensure_prepared(cfg.data, cfg.run.seed)
    datamodule = ShardDataModule(cfg.data, seed=cfg.run.seed)
    module = VAEModule(OmegaConf.to_container(cfg, resolve=True), list(datamodule.sample_shape))
    images = ImageGrids(run_dir / "images", cfg.logger.image_every_n_epochs)
    trainer = build_trainer(cfg, run_dir, images)
    ckpt_path = resume_checkpoint(cfg, run_dir / "checkpoints")
    if ckpt_path and trainer.is_global_zero:
        print(f"resuming from {ckpt_path}")
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    result = {
        "run_dir": str(run_dir), "config": str(run_dir / "config.yaml"), "checkpoint": str(ckpt),
        "best_checkpoint": trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else "",
        "images": [str(p) for p in images.latest], "seconds": time.time() - t0,
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
    }
    if trainer.is_global_zero:
        print(f"\ndone in {result['seconds']:.0f} s")
        print(f"  checkpoint: {ckpt}")
        print(f"  config:     {result['config']}")
        for p in result["images"]:
            print(f"  images:     {p}")
        print(f"  next:       vaepipe eval {ckpt} --k 5000")
    return result
