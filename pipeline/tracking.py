"""Experiment tracking: the Lightning logger for `logger.backend`, wandb's mode and run id, and what
every run logs besides the metrics (flattened config, system facts, checkpoint paths).

The wandb run id is created once per run folder and stored there (`wandb_run_id`) and in every
checkpoint, so a resumed or requeued job continues the same wandb run on the same step axis
(`trainer/global_step`); see docs/tracking.md.
"""

from __future__ import annotations

import importlib.util
import netrc
import os
import platform
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from pipeline.config import ConfigError, flatten  # noqa: F401 - flatten re-exported
from pipeline.outputs import write_text
from pipeline.redact import redact, redact_argv

RUN_ID_FILE = "wandb_run_id"


def _has_api_key(host: str) -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(host) is not None  # where `wandb login` stores the key
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def _reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_wandb_mode(mode: str) -> tuple[str, str | None]:
    """(online | offline | disabled, why it fell back or None). `auto` honours WANDB_MODE, else goes
    online when an API key and the server are there; online without them falls back to offline
    instead of hanging in wandb.init's retries or crashing."""
    if mode == "auto" and os.environ.get("WANDB_MODE"):
        mode = {"dryrun": "offline", "run": "online"}.get(os.environ["WANDB_MODE"], os.environ["WANDB_MODE"])
        return mode, (f"WANDB_MODE={os.environ['WANDB_MODE']} in the environment" if mode == "offline" else None)
    if mode in ("offline", "disabled"):
        return mode, None
    url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    parsed = urlparse(url)
    host = parsed.hostname or "api.wandb.ai"
    if not _has_api_key(host):
        return "offline", "no wandb API key (set WANDB_API_KEY or run `wandb login`)"
    if not _reachable(host, parsed.port or (80 if parsed.scheme == "http" else 443)):
        return "offline", f"wandb server {host} unreachable"
    return "online", None


def wandb_run_id(run_dir: Path, from_checkpoint: str | None = None, write: bool = True, new: bool = False) -> str:
    """The run's wandb id: a sweep agent's WANDB_RUN_ID, else the one stored in the run folder, else
    the one in the checkpoint being resumed, else a new one (stored for the next restart). `new`: a
    run started over in its folder (run.resume=never) gets a new wandb run, not the old one's."""
    path = Path(run_dir) / RUN_ID_FILE
    run_id = os.environ.get("WANDB_RUN_ID")
    if not run_id and path.is_file() and not new:
        run_id = path.read_text().strip()
    run_id = run_id or from_checkpoint
    if not run_id:
        from wandb.sdk.lib.runid import generate_id

        run_id = generate_id()
    if write and (not path.is_file() or path.read_text().strip() != run_id):
        write_text(path, run_id + "\n", "wandb run id")
    return run_id


def build_logger(cfg: DictConfig, run_dir: Path, run_id: str | None = None):
    """The Lightning logger for `logger.backend` (False for none). Loggers write on rank 0 only."""
    backend = cfg.logger.backend
    if backend == "none":
        return False
    if backend == "csv":
        from pytorch_lightning.loggers import CSVLogger

        return CSVLogger(save_dir=str(run_dir), name="logs")  # logs/version_N: one per (re)start
    if backend == "tensorboard":
        from pytorch_lightning.loggers import TensorBoardLogger

        if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
            raise ConfigError("logger.backend=tensorboard needs the tensorboard package (pip install tensorboard), "
                              "which is not installed; logger.backend=csv writes the same metrics without it")

        return TensorBoardLogger(save_dir=str(run_dir), name="logs")
    from pytorch_lightning.loggers import WandbLogger

    mode, why = resolve_wandb_mode(cfg.logger.mode)
    project = os.environ.get("WANDB_PROJECT") if os.environ.get("WANDB_SWEEP_ID") else None  # the sweep's
    # WandbLogger(offline=True) would set WANDB_MODE for the whole process; mode= says the same per run.
    logger = redacted_argv_logger(WandbLogger)(project=project or cfg.logger.project, entity=cfg.logger.entity, group=cfg.logger.group,
                         tags=list(cfg.logger.tags) or None, save_dir=str(run_dir), name=cfg.run.name, id=run_id,
                         mode=mode, resume="allow", config=redact(flatten(OmegaConf.to_container(cfg, resolve=True))))
    logger._wandb_init.pop("anonymous", None)  # Lightning always passes it; wandb warns it is obsolete
    logger.vaepipe_offline_reason = why  # RunFacts says it once the run's folder is known
    return logger


def redacted_argv_logger(base):
    """WandbLogger whose run records the command line without tokens: wandb stores sys.argv in
    every run's metadata, and a token may be on it (`slurm.env.HF_TOKEN=...`, a URL with a
    password). sys.argv is swapped only while the run starts: Lightning's DDP launcher re-runs it."""
    from pytorch_lightning.loggers.logger import rank_zero_experiment

    class RedactedArgvWandbLogger(base):
        @property
        @rank_zero_experiment
        def experiment(self):
            if self._experiment is not None:
                return self._experiment
            argv, sys.argv = sys.argv, redact_argv(sys.argv)
            try:
                return base.experiment.fget(self)
            finally:
                sys.argv = argv

    return RedactedArgvWandbLogger


def system_facts(trainer: pl.Trainer) -> dict:
    import importlib.metadata

    import torch
    import webdataset

    from pipeline import __version__

    try:  # facts for every logger; wandb itself is needed only by the wandb backend
        wandb_version = importlib.metadata.version("wandb")
    except importlib.metadata.PackageNotFoundError:
        wandb_version = "not installed"

    facts = {
        "world_size": trainer.world_size, "num_nodes": trainer.num_nodes, "devices_per_node": trainer.num_devices,
        "precision": str(trainer.precision), "accelerator": type(trainer.accelerator).__name__,
        "strategy": type(trainer.strategy).__name__, "hostname": platform.node(),
        "python": sys.version.split()[0], "torch": torch.__version__, "lightning": pl.__version__,
        "wandb": wandb_version, "webdataset": getattr(webdataset, "__version__", "?"), "vaepipe": __version__,
        "cuda": torch.version.cuda or "none",
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }
    for key in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT",
                "WANDB_SWEEP_ID"):
        if key in os.environ:
            facts[key.lower()] = os.environ[key]
    return {f"system.{k}": v for k, v in facts.items()}


def wandb_run(trainer: pl.Trainer):
    """The wandb Run of this trainer's logger on rank 0, else None."""
    from pytorch_lightning.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and trainer.is_global_zero:
            return logger.experiment
    return None


class RunFacts(pl.Callback):
    """Logs the flattened config and the system facts once training starts (rank 0: Lightning's
    loggers are rank-zero-only), keeps the wandb run id in every checkpoint, and tells an offline
    user where the run is and how to upload it."""

    def __init__(self, cfg: DictConfig, run_id: str | None):
        self.flat = flatten(OmegaConf.to_container(cfg, resolve=True))
        self.run_id = run_id

    def on_fit_start(self, trainer, module):
        params = redact({**self.flat, **system_facts(trainer)})  # no tokens in a (shared) wandb project
        for logger in trainer.loggers:
            logger.log_hyperparams(params)
        run = wandb_run(trainer)
        if run is not None and run.settings.mode == "offline":
            why = getattr(trainer.logger, "vaepipe_offline_reason", None) or "logger.mode=offline"
            folder = Path(run.dir).parent
            print(f"wandb: {why}: run {run.id} logs offline to {folder}; upload later with "
                  f"`wandb sync {folder}`", flush=True)

    def on_save_checkpoint(self, trainer, module, checkpoint):
        checkpoint.setdefault("vaepipe", {})["wandb_run_id"] = self.run_id


def finish_wandb(trainer: pl.Trainer, summary: dict, preempted: bool) -> None:
    """Checkpoint paths into the run summary; mark a preempted run (a sweep then re-queues that
    trial with the same run id) and close it so an offline run is complete on disk."""
    run = wandb_run(trainer)
    if run is None:
        return
    run.summary.update(summary)
    if preempted:
        try:
            run.mark_preempting()
        except Exception:  # noqa: BLE001 - offline runs cannot reach the sweep server; nothing to mark
            pass
    run.finish(exit_code=75 if preempted else 0)
