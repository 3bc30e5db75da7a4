"""`vaepipe fit`: prepare data if needed, build the module and the Lightning Trainer, train, resume."""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import TQDMProgressBar

from pipeline.callbacks import (AtomicCheckpointIO, ImageGrids, LastCheckpoint, RankStates, RunModelCheckpoint,
                                StepProgressBar, SweepReport, Throughput, is_own_checkpoint)
from pipeline.checkpoints import load_checkpoint
from pipeline.config import ConfigError, flatten, to_yaml
from pipeline.data.location import is_remote
from pipeline.data.shards import MANIFEST, prepare, read_manifest
from pipeline.data.sources import SOURCE_NAMES
from pipeline.data.datamodule import ShardDataModule
from pipeline.data.resident import pixel_mean
from pipeline.errors import (EXIT_RETRYABLE, Preempted, ResumeError, TrainingDiverged, UnreadableCheckpointError,
                             UnsafeCheckpointError, WriteFailure)
from pipeline.launch.slurm import requeue_self, under_slurm_batch
from pipeline.models.vae_module import VAEModule
from pipeline.outputs import remove_stale_temporaries, storage_error, write_text
from pipeline.redact import holds_secrets, redact, redact_text
from pipeline.run_lock import RunFolderLock
from pipeline.tracking import RunFacts, build_logger, finish_wandb, wandb_run_id

GENERATED = ("sprites", "gmm")  # sources that need no input file
EXIT_PREEMPTED = EXIT_RETRYABLE  # 75, EX_TEMPFAIL: stopped by a signal after checkpointing; run the same command to resume


def module_class(family: str):
    if family == "vqvae":
        from pipeline.models.vqvae_module import VQVAEModule

        return VQVAEModule
    return VAEModule


def is_primary_process() -> bool:
    """True in the process that may write shared files before the process group exists: rank 0 of
    node 0 (Lightning's launcher, torchrun and srun all say so in the environment)."""
    return all(os.environ.get(k, "0") == "0" for k in ("NODE_RANK", "LOCAL_RANK", "SLURM_PROCID", "RANK"))


def ensure_prepared(data_cfg, seed: int, log=print, wait_s: float = 3600) -> None:
    """Prepare the shards when the data root has no manifest and `data.prepare` allows it. Other
    ranks wait for rank 0's manifest instead of writing the same files at the same time."""
    root = Path(data_cfg.root)
    if is_remote(str(data_cfg.root)):
        return
    if (root / MANIFEST).exists():
        check_prepared(data_cfg, root, log)
        return
    if not is_primary_process():
        deadline = time.time() + wait_s
        while not (root / MANIFEST).exists():
            if time.time() > deadline:
                raise TimeoutError(f"waited {wait_s:.0f} s for rank 0 to prepare {root / MANIFEST}")
            time.sleep(1)
        return
    if not data_cfg.prepare:
        raise FileNotFoundError(f"no {MANIFEST} in data.root '{root}' and data.prepare=false")
    if data_cfg.name not in SOURCE_NAMES:
        raise ConfigError(f"bad value for 'data.name': {data_cfg.name!r}; choose one of {', '.join(SOURCE_NAMES)}")
    if data_cfg.name not in GENERATED and not data_cfg.source:
        raise FileNotFoundError(
            f"data.root '{root}' has no {MANIFEST}; data set '{data_cfg.name}' needs its raw files: set "
            f"data.source=PATH (or run `vaepipe prepare {data_cfg.name} --source PATH --out {root}`)")
    # prepare() refuses a folder holding files vaepipe did not write (someone's own WebDataset
    # shards): automatic preparation only into a new or empty folder, decided under its lock
    log(f"preparing '{data_cfg.name}' shards in {root} ...")
    try:
        prepare(data_cfg.name, root, source=data_cfg.source, seed=seed, shard_bytes=data_cfg.shard_bytes,
                shard_samples=data_cfg.shard_samples, log=log)
    except FileExistsError:  # another run (a sweep's array task) prepared it while this one waited
        if not (root / MANIFEST).exists():
            raise  # not prepared meanwhile: files of someone else's appeared (prepare's message says)
        log(f"'{data_cfg.name}' was prepared in {root} meanwhile by another process; using it")
        check_prepared(data_cfg, root, log)


def check_prepared(data_cfg, root: Path, log=print) -> None:
    """An existing data set is reused only if it is the one asked for: another data set's folder
    (data.root shared by two configs, a copied command) must not train silently on the wrong data."""
    try:
        manifest = read_manifest(root)
    except FileNotFoundError:
        return  # removed meanwhile by another process: the data module says so
    have = manifest.get("name")
    if have is not None and have != data_cfg.name:
        raise ConfigError(f"data.root '{root}' holds the data set '{have}', but data.name={data_cfg.name!r}: point "
                          f"data.root at the '{data_cfg.name}' shards (the default is data/<data.name>), or rebuild "
                          f"this folder with `vaepipe prepare {data_cfg.name} --out {root} --force`")
    source = manifest.get("source")
    if data_cfg.source and source and not _same_file(data_cfg.source, source):
        log(f"note: {root / MANIFEST} was prepared from {redact_text(source)}, not data.source="
            f"{redact_text(data_cfg.source)}; using the "
            f"prepared shards (`vaepipe prepare {data_cfg.name} --source ... --out {root} --force` rebuilds them)")


def _same_file(a: str, b: str) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve() or Path(a).samefile(b)
    except OSError:
        return False


def newest_valid_checkpoint(ckpt_dir: Path) -> str | None:
    """The checkpoint with the highest global step among last.ckpt, the periodic step-*.ckpt and the
    best-*.ckpt (all written at consistent points of the loop, with the full training state); one
    that cannot be read (truncated by a crash of the file system, say) is skipped with a warning.
    A folder whose checkpoints are all unreadable is an error: the run never silently starts over."""
    best, best_step = None, -1
    paths = sorted([*ckpt_dir.glob("last.ckpt"), *ckpt_dir.glob("step-*.ckpt"), *ckpt_dir.glob("best-*.ckpt")])
    for path in paths:
        try:
            step = load_checkpoint(path, mmap=True)["global_step"]
        except UnsafeCheckpointError:
            raise  # never silently fall back to an older checkpoint: the user must see this file
        except Exception as err:  # noqa: BLE001 - any unreadable file is skipped, and said so
            warnings.warn(f"skipping unreadable checkpoint {path}: {type(err).__name__}: {err}")
            continue
        if step > best_step or (step == best_step and path.name == "last.ckpt"):
            best, best_step = str(path), step
    if paths and best is None:
        raise ResumeError(f"none of the {len(paths)} checkpoint(s) in {ckpt_dir} can be read ({', '.join(p.name for p in paths)}); "
                          "nothing to resume from. run.resume=never starts the run over (the folder is set aside, "
                          "not deleted)")
    return best


def set_aside(ckpt_dir: Path, paths: list[Path], why: str, log=print) -> None:
    """Move checkpoints a new start or an explicit resume supersedes into checkpoints.replaced-<time>/
    beside the folder: kept for the user, never again found by run.resume=auto."""
    if not paths:
        return
    stamp, n = time.strftime("%Y%m%dT%H%M%S"), 0
    while (dest := ckpt_dir.with_name(f"{ckpt_dir.name}.replaced-{stamp}{f'-{n}' if n else ''}")).exists():
        n += 1  # two starts within a second: never mix (or overwrite) their files
    dest.mkdir(parents=True)
    for path in paths:
        path.rename(dest / path.name)
    log(f"{why}: {len(paths)} checkpoint(s) of the run folder moved to {dest}")


def resume_checkpoint(cfg: DictConfig, ckpt_dir: Path) -> tuple[str | None, list[Path], str]:
    """run.resume: auto (newest valid checkpoint of the run folder, if any), never, or a path.
    Returns (checkpoint or None, the folder's checkpoints this start supersedes, why). never and a
    path leave no checkpoint in the folder that a later auto resume (a requeued job) would prefer to
    this run's own: never supersedes all of them, a path those of later steps. They are set aside
    only once the resume is accepted (`_fit`): a refused one leaves the folder as it was."""
    mode = cfg.run.resume
    own = sorted(p for p in ckpt_dir.glob("*.ckpt") if is_own_checkpoint(p, ckpt_dir)) if ckpt_dir.is_dir() else []
    if mode == "never":
        return None, own, "run.resume=never starts the run over"
    if mode != "auto":
        if not Path(mode).is_file():
            raise FileNotFoundError(f"run.resume={mode}: no such checkpoint")
        step = load_checkpoint(mode, mmap=True)["global_step"]  # refused here, before any set-up, if unsafe
        later = [path for path in own if path.resolve() != Path(mode).resolve() and _step_of(path, step + 1) > step]
        return mode, later, f"run.resume={mode} (step {step}) branches off"
    return (newest_valid_checkpoint(ckpt_dir) if ckpt_dir.is_dir() else None), [], ""


def _step_of(path: Path, unreadable: int) -> int:
    """A checkpoint's global step; `unreadable` for a file that cannot be read."""
    try:
        return load_checkpoint(path, mmap=True)["global_step"]
    except (UnreadableCheckpointError, UnsafeCheckpointError):
        return unreadable


# Settings that define what the weights are and how they are trained: a resume continues the same
# training, so these must be the checkpoint's (run.init_from starts a new run from its weights).
# Everything else (how long, on how many processes, logging, checkpoints, data location) may change.
FIXED_ON_RESUME = ("model.", "optim.", "data.name", "data.binarize", "data.shuffle_buffer", "run.seed",
                   "trainer.limit_train_batches")
MAY_CHANGE_ON_RESUME = ("model.compile", "model.eval_k", "optim.max_nonfinite_steps")


def check_resume_settings(cfg: DictConfig, checkpoint: dict, path: str) -> None:
    """Refuse a resume whose settings of FIXED_ON_RESUME differ from the checkpoint's (checked
    before anything is written to the run folder), naming both values."""
    saved = (checkpoint.get("hyper_parameters") or {}).get("config")
    if not isinstance(saved, dict):
        return
    now = redact(OmegaConf.to_container(cfg, resolve=True))  # as stored (pipeline/redact.py)

    positions = (checkpoint.get("ShardDataModule") or {}).get("stream_positions") or []
    if positions and "global_batch" in positions[0]:  # after elastic_batch_size: differs only if changed
        world = planned_world_size(cfg)
        if positions[0]["global_batch"] != cfg.data.batch_size * world:
            raise ResumeError(
                f"cannot resume from {path}: its global batch is {positions[0]['global_batch']} "
                f"(data.batch_size={positions[0]['batch_size']} x {positions[0]['world_size']} process(es)); this "
                f"command gives {cfg.data.batch_size * world} (data.batch_size={cfg.data.batch_size} x {world}). "
                f"Train on with another batch size from its weights in a new run: run.init_from={path} "
                "run.dir=NEW_FOLDER")
    theirs, mine = flatten(saved), flatten(now)
    for flat in (theirs, mine):  # model.norm=auto is group for the ResNet and nothing for the others
        if flat.get("model.norm") == "auto":
            flat["model.norm"] = "group" if flat.get("model.arch") == "resnet" else "none"
        if flat.get("model.arch") not in ("resnet", None):
            flat.pop("model.norm", None)
        if "model.arch" in flat:  # runs from before model.latent_grid had a latent vector
            flat.setdefault("model.latent_grid", 0)
    fixed = FIXED_ON_RESUME + (("trainer.max_steps", "trainer.max_epochs") if cfg.optim.scheduler == "cosine" else ())
    # (a cosine schedule decays over the run's length: a longer run would jump back up the curve)
    differ = [k for k in mine if k in theirs and mine[k] != theirs[k] and k.startswith(fixed)
              and k not in MAY_CHANGE_ON_RESUME]
    if differ:
        raise ResumeError(
            f"cannot resume from {path}: it was trained with " + ", ".join(f"{k}={theirs[k]}" for k in differ)
            + "; this command sets " + ", ".join(f"{k}={mine[k]}" for k in differ) + ". A resume continues the "
            f"same training: resume with the checkpoint's settings (its config.yaml), or train on with these from its "
            f"weights in a new run: run.init_from={path} run.dir=NEW_FOLDER (run.resume=never starts this folder over; "
            "its checkpoints are set aside)")


def init_weights(module: pl.LightningModule, path: str, log=print) -> None:
    """run.init_from: a new run that starts from another run's model weights: fine-tuning, or going
    on with settings a resume refuses (another batch size, learning rate or schedule). Only the
    weights are taken; the optimizer, the step count and the data order start afresh."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"run.init_from={path}: no such checkpoint")
    try:
        checkpoint = load_checkpoint(path)  # the safe loader: an unsafe file is refused, nothing run
    except UnreadableCheckpointError as err:  # say which setting named the damaged file
        raise UnreadableCheckpointError(f"run.init_from={path}: not a readable checkpoint ({err})") from None
    theirs, mine = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None, module.state_dict()
    if not isinstance(theirs, dict):
        raise ValueError(f"run.init_from={path}: not a vaepipe checkpoint (no state_dict)")
    problems = [f"{k} missing" for k in mine if k not in theirs] + [f"{k} not in this model" for k in theirs if k not in mine]
    problems += [f"{k} is {tuple(theirs[k].shape)}, this model's {tuple(v.shape)}" for k, v in mine.items()
                 if k in theirs and tuple(theirs[k].shape) != tuple(v.shape)]
    if problems:
        raise ValueError(f"run.init_from={path}: its weights do not fit this model ({len(problems)} problem(s): "
                         + "; ".join(problems[:5]) + "): use the model settings of the run that wrote it")
    module.load_state_dict(theirs)
    log(f"initial weights from {path} (its step {checkpoint.get('global_step', '?')}); optimizer and step count start afresh")


def planned_world_size(cfg: DictConfig) -> int:
    """Processes the run will have (trainer.devices x trainer.num_nodes), known before the Trainer."""
    devices = cfg.trainer.devices
    gpus = torch.cuda.device_count() if torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda") else 0
    if str(devices) == "-1" and gpus == 0:
        raise ConfigError("trainer.devices=-1 means every GPU, and none is visible here: give the number of "
                          "processes (trainer.devices=2) or 'auto'")
    if isinstance(devices, int):
        n = gpus if devices == -1 else devices
    elif str(devices) in ("auto", "-1"):
        n = gpus or 1
    else:
        n = len(devices) if not isinstance(devices, str) else len([d for d in devices.split(",") if d.strip()])
    return max(1, n) * cfg.trainer.num_nodes


def elastic_batch_size(cfg: DictConfig, checkpoint: dict, log=print) -> None:
    """Keep the checkpoint's global batch when a run resumes on another number of processes: the
    per-process data.batch_size becomes global batch / processes (2 x 32 -> 1 x 64), so the run
    continues its global sample order (data/order.py). With the same number of processes nothing
    changes (a changed batch size is then refused by the data module, naming both values)."""
    positions = (checkpoint.get("ShardDataModule") or {}).get("stream_positions") or []
    if not positions or "global_batch" not in positions[0]:
        return
    saved_world, saved_global = positions[0]["world_size"], positions[0]["global_batch"]
    world = planned_world_size(cfg)
    if world == saved_world:
        return
    if saved_global % world:
        divisors = [d for d in range(1, saved_global + 1) if saved_global % d == 0 and d <= 64]
        raise ResumeError(
            f"the run was written by {saved_world} process(es) with a global batch of {saved_global}, which "
            f"{world} processes cannot share equally: resume on a number of processes dividing {saved_global} "
            f"({', '.join(map(str, divisors))}), or start a new run folder for another global batch")
    batch = saved_global // world
    if batch != cfg.data.batch_size:
        log(f"resuming on {world} process(es) instead of {saved_world}: data.batch_size {cfg.data.batch_size} -> "
            f"{batch} per process, keeping the run's global batch of {saved_global}")
        cfg.data.batch_size = batch


def planned_device(cfg: DictConfig) -> torch.device:
    if cfg.trainer.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


def steps_per_call(cfg: DictConfig, steps_per_epoch: int, log=print) -> int:
    """trainer.steps_per_call, lowered to the largest value that divides the step intervals calls
    must end on: validation every N steps (Lightning counts calls: within an epoch, or across
    epochs when check_val_every_n_epoch is null, which needs the epoch's steps too), validation
    at a fraction f of each epoch (Lightning takes int(f x calls): the epoch's steps and
    int(f x steps)), and periodic checkpoints every N steps (global steps: the epoch's steps too)."""
    want, t = cfg.trainer.steps_per_call, cfg.trainer
    align = []
    if isinstance(t.val_check_interval, int) and t.check_val_every_n_epoch is not None \
            and t.val_check_interval > steps_per_epoch:  # Lightning would say it in calls, not steps
        raise ConfigError(f"trainer.val_check_interval={t.val_check_interval} steps is longer than an epoch "
                          f"({steps_per_epoch} steps): give at most {steps_per_epoch}, or set "
                          "trainer.check_val_every_n_epoch=null to count the steps across epochs")
    if isinstance(t.val_check_interval, int):
        align.append(t.val_check_interval)
        if t.check_val_every_n_epoch is None:
            align.append(steps_per_epoch)
    elif isinstance(t.val_check_interval, float) and t.val_check_interval < 1.0:
        align += [steps_per_epoch, max(1, int(steps_per_epoch * t.val_check_interval))]
    if cfg.run.every_n_train_steps > 0:
        align += [cfg.run.every_n_train_steps, steps_per_epoch]
    k = max(d for d in range(1, want + 1) if all(a % d == 0 for a in align))
    if k < want and is_primary_process():
        log(f"steps per call: {k} (trainer.steps_per_call={want} lowered to divide "
            f"{', '.join(map(str, sorted(set(align))))}: validation / periodic checkpoint intervals, steps per epoch)")
    return k


def trainer_kwargs(cfg: DictConfig, k: int = 1) -> dict:
    """The Trainer's arguments; step counts given per optimizer step become Lightning batches (calls
    of k steps); steps_per_call, cuda_graph, gradient clipping and limit_train_batches are ours (step engine,
    datamodule)."""
    # None is Lightning's default for most keys; for check_val_every_n_epoch it is a setting of its
    # own (val_check_interval counts steps across epochs), so it is passed on.
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg.trainer, resolve=True).items()
              if v is not None or k == "check_val_every_n_epoch"}
    for ours in ("steps_per_call", "cuda_graph", "gradient_clip_val", "limit_train_batches"):
        kwargs.pop(ours, None)
    if isinstance(kwargs.get("val_check_interval"), int):
        kwargs["val_check_interval"] = kwargs["val_check_interval"] // k
    devices = kwargs.get("devices", 1)
    many = kwargs.get("num_nodes", 1) > 1 or (isinstance(devices, int) and devices > 1) or (
        isinstance(devices, (list, str)) and devices not in ("auto", "1", 1) and len(str(devices).split(",")) > 1)
    if kwargs.get("strategy", "auto") == "auto" and many:
        kwargs["strategy"] = "ddp"  # one process per device, launched as subprocesses (or by srun/torchrun)
    return kwargs


def build_trainer(cfg: DictConfig, run_dir: Path, images: ImageGrids, last: LastCheckpoint,
                  throughput: Throughput, run_id: str | None = None, datamodule: ShardDataModule | None = None,
                  k: int = 1, sweep_report: SweepReport | None = None) -> pl.Trainer:
    ckpt_dir = run_dir / "checkpoints"
    callbacks = [
        RunModelCheckpoint(dirpath=ckpt_dir, filename="best-{epoch:03d}-{step}", monitor=cfg.run.monitor, mode="min",
                        save_top_k=cfg.run.save_top_k, save_last=False, auto_insert_metric_name=False),
        images, RankStates(), RunFacts(cfg, run_id), throughput,
    ]
    if cfg.run.every_n_train_steps > 0:  # periodic, the newest `keep_last` kept
        callbacks.append(RunModelCheckpoint(dirpath=ckpt_dir, filename="step-{step:08d}", monitor="step", mode="max",
                                         save_top_k=cfg.run.keep_last, every_n_train_steps=cfg.run.every_n_train_steps,
                                         auto_insert_metric_name=False))
    if sweep_report is not None:  # before last.ckpt is written at the same validation: its count is saved
        callbacks.append(sweep_report)
    callbacks.append(last)  # after the ModelCheckpoints (LastCheckpoint's doc)
    if cfg.trainer.enable_progress_bar:
        callbacks.append(StepProgressBar(lambda: datamodule.steps_per_epoch, refresh_rate=10) if datamodule
                         else TQDMProgressBar(refresh_rate=10))
    logger = build_logger(cfg, run_dir, run_id)  # the learning rate is logged with the step metrics (train/lr)
    plugins = [AtomicCheckpointIO(ckpt_dir)]
    if under_slurm_batch():
        from lightning_fabric.plugins.environments import SLURMEnvironment

        # One owner of requeue: LastCheckpoint saves on SIGUSR1 and fit() requeues; Lightning's own
        # SIGUSR1 handler (hpc_ckpt + scontrol requeue) stays off.
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return pl.Trainer(**trainer_kwargs(cfg, k), default_root_dir=str(run_dir), callbacks=callbacks, logger=logger,
                      plugins=plugins, reload_dataloaders_every_n_epochs=1)  # the same loader, moved on: datamodule


class _NoAdvert(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in str(record.msg)


def quiet_lightning_tips() -> None:
    """Lightning prints an advertisement for its cloud logger ("Tip: ... litlogger") on every fit."""
    import lightning_utilities.core.rank_zero as rank_zero

    if not any(isinstance(f, _NoAdvert) for f in rank_zero.log.filters):
        rank_zero.log.addFilter(_NoAdvert())


def fit(cfg: DictConfig) -> dict:
    """Train as configured; returns the paths a user wants next (checkpoint, config, images). A file
    the storage refuses (disk full, quota, read-only) ends the run with WriteFailure, which names
    the file and the newest good checkpoint to resume from."""
    try:
        return _fit(cfg)
    except (WriteFailure, OSError) as err:
        cause = storage_error(err)
        if not isinstance(err, WriteFailure) and cause is None:
            raise
        what = str(err) if isinstance(err, WriteFailure) else f"could not write {cause.filename or 'a run file'}: {cause}."
        good = newest_valid_checkpoint(Path(cfg.run.dir) / "checkpoints") if Path(cfg.run.dir, "checkpoints").is_dir() else None
        hint = (f"The newest good checkpoint is {good}: free space (or point run.dir elsewhere) and run the same "
                "command to resume." if good else "No checkpoint of this run was saved yet: free space and run the "
                "same command again.")
        raise WriteFailure(f"{what} {hint}") from None


def _fit(cfg: DictConfig) -> dict:
    t0 = time.time()
    # Noise on every run: a local run on a machine that also has Slurm's client tools, and a
    # deprecation inside Lightning itself.
    warnings.filterwarnings("ignore", message=".*The `srun` command is available on your system")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)")
    # The step engine checkpoints between optimizer steps, never inside one: Lightning's advice about
    # saving "pre-optimization state" under manual optimisation does not apply.
    warnings.filterwarnings("ignore", message=".*Using ModelCheckpoint with manual optimization")
    # Lightning compares its batches (calls of trainer.steps_per_call steps) with log_every_n_steps,
    # which vaepipe counts in optimizer steps across epochs (VAEModule._log_step): its warning is wrong here.
    warnings.filterwarnings("ignore", message=".*is smaller than the logging interval")
    quiet_lightning_tips()
    run_dir = Path(cfg.run.dir)
    planned_world_size(cfg)  # refuses trainer.devices=-1 without a GPU before anything is written
    pl.seed_everything(cfg.run.seed, workers=True, verbose=False)
    ensure_prepared(cfg.data, cfg.run.seed)  # before the run folder: a data error leaves nothing behind
    run_dir.mkdir(parents=True, exist_ok=True)
    if not is_primary_process():  # the primary process holds the run folder for every rank
        return _train(cfg, run_dir, t0)
    preempted: dict = {}  # filled by _train at a preemption checkpoint, whatever happens after it
    try:
        with RunFolderLock(run_dir, "fit"):  # one writer per run folder; refused at once if another holds it
            return _train(cfg, run_dir, t0, preempted)
    finally:
        requeue_if_preempted(cfg, preempted)


def requeue_if_preempted(cfg: DictConfig, preempted: dict) -> None:
    """Under Slurm, rank 0 puts a preempted job back in the queue (same job id: same run folder) as
    the run's very last act, also when writing the summary failed after the checkpoint: the requeue
    makes Slurm SIGTERM every process of the job, which must find the summary, wandb's finish and
    the run folder's lock already done with."""
    if preempted.get("step") is not None and cfg.slurm.requeue and "SLURM_JOB_ID" in os.environ:
        requeue_self()


def sweep_trial_report() -> SweepReport | None:
    """The study reporter when this fit is a trial of a local sweep (`vaepipe sweep trial` sets the
    variables: the sweep folder and the study's trial number)."""
    folder, number = os.environ.get("VAEPIPE_SWEEP_DIR"), os.environ.get("VAEPIPE_SWEEP_TRIAL", "")
    if not folder or not number.isdigit():
        return None
    from pipeline.launch.sweep import load_sweep

    metric = load_sweep(Path(folder) / "sweep.yaml", compose=False)["metric"]["name"]
    return SweepReport(folder, int(number), metric)


def _train(cfg: DictConfig, run_dir: Path, t0: float, preempted: dict | None = None) -> dict:
    primary_log = print if is_primary_process() else (lambda *_: None)
    if is_primary_process():
        for tmp in remove_stale_temporaries(run_dir / "checkpoints"):
            primary_log(f"removed {tmp}: a checkpoint write cut short by a killed process")
    ckpt_path, superseded, why = resume_checkpoint(cfg, run_dir / "checkpoints")
    start_step, resumed_run_id = 0, None
    if ckpt_path:
        checkpoint = load_checkpoint(ckpt_path, mmap=True)  # tensors not read
        start_step, resumed_run_id = checkpoint["global_step"], checkpoint.get("vaepipe", {}).get("wandb_run_id")
        elastic_batch_size(cfg, checkpoint, log=primary_log)
        check_resume_settings(cfg, checkpoint, ckpt_path)
        del checkpoint
    if is_primary_process():  # the one process that moves files (the others would race it)
        set_aside(run_dir / "checkpoints", superseded, why, primary_log)
    if is_primary_process():
        # The folder's config is what resumes it (a requeued Slurm job runs `fit -c config.yaml`):
        # run.resume=never or a path was this start's instruction, auto is the next one's.
        saved = cfg.copy()
        saved.run.resume = "auto"
        write_text(run_dir / "config.yaml", to_yaml(saved), "config", private=holds_secrets(OmegaConf.to_container(saved)))
    datamodule = ShardDataModule(cfg.data, seed=cfg.run.seed, world_size=planned_world_size(cfg), device=planned_device(cfg),
                                 limit_train_batches=cfg.trainer.limit_train_batches, log=primary_log)
    k = steps_per_call(cfg, datamodule.steps_per_epoch, log=primary_log)
    datamodule.set_steps_per_call(k)
    # the config stored in every checkpoint, without tokens (pipeline/redact.py): checkpoints travel
    module = module_class(cfg.model.family)(redact(OmegaConf.to_container(cfg, resolve=True)), list(datamodule.sample_shape))
    images = ImageGrids(run_dir / "images", cfg.logger.image_every_n_epochs)
    preemption = LastCheckpoint(run_dir / "checkpoints" / "last.ckpt")
    if ckpt_path is None and cfg.model.init == "iwae" and cfg.model.family == "vae":
        # The paper's output bias; on resume the checkpoint's weights replace it anyway.
        module.vae.set_output_bias(pixel_mean(cfg.data.root, datamodule.manifest, cfg.data.binarize, cfg.data.on_error))
    if ckpt_path is None and cfg.run.init_from:  # on resume the run's own checkpoint wins
        init_weights(module, cfg.run.init_from, log=primary_log)
    run_id = None
    if cfg.logger.backend == "wandb":  # one wandb run per run folder, continued after every restart
        run_id = wandb_run_id(run_dir, resumed_run_id, write=is_primary_process(),
                              new=cfg.run.resume == "never")
    throughput = Throughput()
    sweep_report = sweep_trial_report()
    trainer = build_trainer(cfg, run_dir, images, preemption, throughput, run_id, datamodule, k, sweep_report)
    if ckpt_path and is_primary_process():
        print(f"resuming from {ckpt_path}")
    metrics = {}
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if ckpt_path and trainer.global_step == start_step and not module.diverged and \
                not any(k.startswith("val/") for k in metrics):
            # Nothing was left to train (a finished run's command again, or a stop signal that
            # came at the last step and skipped the final validation): validate the final weights,
            # so that the summary has the run's metrics rather than none.
            trainer.validate(module, datamodule=datamodule, verbose=False)
            metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
        pruned = sweep_report.pruned if sweep_report else None
        if cfg.run.test and not module.diverged and not pruned and "test" in datamodule.manifest["splits"]:
            trainer.test(module, datamodule=datamodule, verbose=False)  # the final weights: test/* metrics
            metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")})
    except Preempted:
        # The checkpoint is saved on every rank's behalf; the summary, wandb's finish and, under
        # Slurm, the requeue follow (requeue_if_preempted), else the exit code EXIT_PREEMPTED.
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if preempted is not None:
            preempted["step"] = preemption.stopped_at
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # no stray 'terminate called' at exit
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    if module.diverged:
        finish_wandb(trainer, {"diverged": module.diverged}, preempted=False)
        raise TrainingDiverged(module.diverged)
    plan = datamodule.last_plan
    result = {
        "run_dir": str(run_dir), "config": str(run_dir / "config.yaml"), "checkpoint": str(ckpt),
        "best_checkpoint": trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else "",
        "images": [str(p) for p in images.latest.values()], "seconds": time.time() - t0,
        "global_step": trainer.global_step, "preempted_at": preemption.stopped_at,
        "epoch_samples_dropped": plan.dropped if plan else 0, "epoch_samples_repeated": plan.repeated if plan else 0,
        "metrics": metrics, "pruned": sweep_report.pruned if sweep_report else None,
        "wandb_run_id": run_id, "train_samples_per_s": throughput.samples_per_s,
    }
    if trainer.is_global_zero:
        write_text(run_dir / "summary.json", json.dumps(result, indent=1) + "\n", "summary")
    finish_wandb(trainer, {"checkpoint/last": str(ckpt.resolve()), "checkpoint/best": result["best_checkpoint"]},
                 preempted=preemption.stopped_at is not None)
    if trainer.is_global_zero:
        ended = "stopped by signal" if preemption.stopped_at is not None else \
            "pruned by the sweep's early_terminate" if result["pruned"] else "done"
        print(f"\n{ended} at step "
              f"{trainer.global_step} in {result['seconds']:.0f} s")
        if plan and (plan.dropped or plan.repeated):
            print(f"  per epoch, to give every rank and worker equal batches: {plan.dropped} samples dropped, "
                  f"{plan.repeated} repeated")
        if throughput.samples_per_s:
            print(f"  throughput: {throughput.samples_per_s:.0f} samples/s (steady state, all ranks, "
                  "validation excluded)")
        print(f"  checkpoint: {ckpt}")
        print(f"  config:     {result['config']}")
        for p in result["images"]:
            print(f"  images:     {p}")
        again = ("run the same command to resume" if cfg.run.resume == "auto" else
                 f"vaepipe fit -c {result['config']} resumes it (run.resume={cfg.run.resume} was this start's)")
        if preemption.stopped_at is None:
            from pipeline.evaluate import eval_suggestion

            again = eval_suggestion(ckpt, module, datamodule.manifest["splits"], module.val_examples)
        print(f"  next:       {again}")
    return result
