"""Typed configuration: one dataclass per group, YAML files merged in order, then dotlist overrides.

An unknown key or a value of the wrong type fails here, before any training, naming the key and
the valid keys of its group (omegaconf's structured configs do the checking).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException


@dataclass
class ModelConfig:
    family: str = "vae"  # vae (VAE, IWAE, beta-VAE) | vqvae (Concept 11.23; keys codebook_size ... vq_channels)
    objective: str = "elbo"  # elbo | iwae
    k: int = 1  # latent samples per example (ELBO: mean of K ELBOs; IWAE: L_K)
    beta: float = 1.0  # KL weight (beta-VAE, Concept 11.25); 1 is the VAE
    beta_warmup_steps: int = 0  # linear warm-up of beta from 0 over this many steps
    estimator: str = "reparam"  # encoder gradient: reparam | score (Concept 11.22) | stl | dreg (docs/estimators.md)
    likelihood: str = "bernoulli"  # bernoulli (logits) | gaussian (N(f(z), sigma^2 I)) | discretized_logistic | discretized_gaussian (8-bit pixels: bits/dim; docs/images.md)
    mixtures: int = 1  # discretized_logistic: 1 = the IAF paper's (channels independent), M >= 2 = PixelCNN++'s mixture of M
    sigma: float = 1.0  # Gaussian decoder std: fixed value, or initial value when learn_sigma
    learn_sigma: bool = False
    arch: str = "conv"  # conv | resnet (square images 16-256 px, power of two, or 28) | mlp
    latent_dim: int = 10  # the top (prior's) stochastic layer
    latent_grid: int = 0  # conv/resnet: 0 = latent_dim as a vector (linear heads); G = a G x G map of latent_dim / G^2 channels (3x3 conv heads)
    stochastic_layers: int = 1  # 1 | 2 (the IWAE paper's second model, arch mlp: x - hidden - latent1_dim - hidden2 - latent_dim)
    latent1_dim: int = 100  # two stochastic layers: the middle layer z1
    hidden2: list[int] = field(default_factory=lambda: [100, 100])  # two stochastic layers: widths between z1 and z2
    hidden: list[int] = field(default_factory=lambda: [200, 200])  # MLP widths; [] = linear
    activation: str = "relu"
    init: str = "torch"  # torch (PyTorch's layer defaults) | iwae (Glorot-uniform, zero biases, output bias = logit of the data mean)
    conv_channels: list[int] = field(default_factory=list)  # conv/resnet: width of each stride-2 stage (side -> 4), a short list repeats its last; [] = 32, 32, 64, 64 cut to the stages
    conv_hidden: int = 256
    res_blocks: int = 1  # resnet: residual blocks per stage
    norm: str = "auto"  # resnet: auto (= group: GroupNorm) | group | none (zero-initialised branches only); never batch statistics (docs/images.md)
    eval_k: int = 10  # K of the IWAE bound computed on validation (0 = skip)
    codebook_size: int = 512  # VQ-VAE: K codes ...
    code_dim: int = 64  # ... of dimension D
    commitment: float = 0.25  # beta_c, weight of ||z_e - sg(e)||^2
    ema: bool = False  # codebook by exponential moving averages (all-reduced under DDP) instead of its loss
    ema_decay: float = 0.99
    dead_code_threshold: float = 0.0  # EMA: restart codes assigned fewer than this many vectors per step (EMA; 0 = never)
    vq_channels: int = 64  # VQ-VAE conv width
    compile: Any = "auto"  # torch.compile the training step: auto (on CUDA) | true | false (docs/performance.md)


@dataclass
class DataConfig:
    name: str = "sprites"  # sprites | gmm | mnist | binarized-mnist | frey | npz
    root: str = "data/${data.name}"  # folder with the shards and manifest.json
    shards: Optional[str] = None  # where shards indexed by `vaepipe index` are, instead of the manifest's roots (a pipe: one must be given here)
    source: Optional[str] = None  # raw input for `prepare` (mnist folder, npz/npy file)
    prepare: bool = True  # `fit` prepares missing shards (generated sources, or with `source`)
    batch_size: int = 64
    eval_batch_size: int = 256
    num_workers: int = 1
    shuffle_buffer: int = 2000  # training order: shards grouped in windows of at least this many samples, shuffled within (data/order.py); 0: no shuffle, the split's order every epoch
    binarize: str = "none"  # none | dynamic (x ~ Bernoulli(pixel), redrawn each pass) | threshold (> 0.5)
    shard_bytes: int = 64_000_000  # new shard after this many bytes ...
    shard_samples: int = 0  # ... or this many samples (0 = no count limit)
    on_error: str = "stop"  # an unreadable shard or corrupt record: stop (default) | skip (warn, count, go on)
    verify: bool = True  # check every record against its checksum in the manifest as it is read (docs/data.md)
    resident: Any = "auto"  # auto | true | false: train/val splits held on the training device (data/resident.py)
    resident_max_gb: float = 0.0  # budget for resident splits per process (0: a quarter of the device's memory)
    worker_start: str = "forkserver"  # how loader workers start: forkserver (safe beside DDP threads) | fork | spawn


@dataclass
class OptimConfig:
    name: str = "adam"  # adam | adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    scheduler: str = "none"  # none | cosine | exponential | iwae (lr * 10^(-i/7) for 3^i epochs)
    gamma: float = 0.999  # exponential decay per epoch
    warmup_steps: int = 0  # linear learning-rate warm-up
    max_nonfinite_steps: int = 20  # skip steps with a NaN/inf loss or gradient; stop after this many in a row


@dataclass
class TrainerConfig:
    """Passed to pytorch_lightning.Trainer as keyword arguments."""

    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    steps_per_call: int = 16  # optimizer steps per Lightning batch (docs/performance.md); not a Trainer argument
    cuda_graph: bool = True  # one GPU, compiled step: capture the whole optimizer step as one CUDA graph (docs/performance.md)
    max_steps: int = -1
    max_epochs: Optional[int] = 5
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    val_check_interval: Any = None
    check_val_every_n_epoch: Optional[int] = 1
    log_every_n_steps: int = 50
    gradient_clip_val: Optional[float] = None
    num_sanity_val_steps: int = 0
    enable_progress_bar: bool = True
    deterministic: bool = False


@dataclass
class LoggerConfig:
    backend: str = "wandb"  # wandb | csv | tensorboard | none (docs/tracking.md)
    mode: str = "auto"  # wandb: auto (online with an API key and a reachable server, else offline) | online | offline | disabled
    project: str = "vaepipe"
    entity: Optional[str] = None  # wandb team or user (default: the API key's)
    group: Optional[str] = None  # wandb run group, e.g. one per experiment
    tags: list[str] = field(default_factory=list)
    image_every_n_epochs: int = 1  # image grids: PNG in the run folder and to the logger (0 = never)


@dataclass
class RunConfig:
    name: str = "vae_sprites"
    dir: str = "runs/${run.name}"  # stable across restarts: derived from the config, never a timestamp
    seed: int = 0
    save_top_k: int = 1  # best checkpoints kept, by `monitor`
    monitor: str = "val/loss"
    every_n_train_steps: int = 0  # extra periodic checkpoints step-*.ckpt (0 = only at validation) ...
    keep_last: int = 2  # ... of which the newest keep_last are kept
    test: bool = True  # after training, evaluate the test split (test/* metrics), when the data has one
    resume: str = "auto"  # auto (continue from the run folder's last.ckpt) | never | PATH to a checkpoint
    init_from: Optional[str] = None  # a new run starting from this checkpoint's model weights (fresh optimizer, step 0)


@dataclass
class SlurmConfig:
    """Site settings for `vaepipe submit` (docs/slurm.md); CLI flags override the first five."""

    partition: Optional[str] = None
    account: Optional[str] = None
    time: str = "04:00:00"  # walltime; the job requeues itself before it runs out
    gpus_per_node: int = 0  # 0 on CPU clusters; must equal trainer.devices when > 0
    cpus_per_task: int = 4
    signal_grace_s: int = 120  # SIGUSR1 this long before the time limit: checkpoint, requeue
    requeue: bool = True  # on SIGUSR1/SIGTERM, rank 0 runs `scontrol requeue` after the checkpoint
    setup: list[str] = field(default_factory=list)  # shell lines before srun: module load, source venv, ...
    env: dict[str, str] = field(default_factory=dict)  # exported before srun (values shell-quoted)
    extra_sbatch: list[str] = field(default_factory=list)  # more #SBATCH options, e.g. "--constraint=a100"
    template: Optional[str] = None  # another sbatch template (default: slurm/train.sbatch)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    run: RunConfig = field(default_factory=RunConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


def _valid_keys(schema: DictConfig, full_key: str) -> str:
    """The keys of the group that holds `full_key` ('model.kk' -> the keys of `model`)."""
    node: Any = schema
    for part in str(full_key).split(".")[:-1]:
        if isinstance(node, DictConfig) and part in node:
            node = node[part]
    return ", ".join(node.keys()) if isinstance(node, DictConfig) else ""


def _explain(err: OmegaConfBaseException, schema: DictConfig, origin: str) -> ConfigError:
    key = getattr(err, "full_key", None) or "?"
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)):
        return ConfigError(f"{origin}: unknown config key '{key}'. Valid keys here: {_valid_keys(schema, key)}")
    msg = str(err).splitlines()[0]
    missing = re.match(r"Interpolation key '([A-Za-z_][A-Za-z0-9_]*)' not found", msg)
    if missing:  # most often a shell variable in slurm.setup / slurm.env, which OmegaConf reads as its own
        msg += (f" (a shell variable? write ${missing.group(1)} without braces: ${{...}} is a config interpolation "
                "such as ${run.dir})")
    return ConfigError(f"{origin}: bad value for '{key}': {msg}")


CHOICES = {
    "model.family": ("vae", "vqvae"),
    "model.objective": ("elbo", "iwae"),
    "model.estimator": ("reparam", "score", "stl", "dreg"),
    "model.likelihood": ("bernoulli", "gaussian", "discretized_logistic", "discretized_gaussian"),
    "model.arch": ("mlp", "conv", "resnet"),
    "model.norm": ("auto", "none", "group"),
    "model.init": ("torch", "iwae"),
    "data.binarize": ("none", "dynamic", "threshold"),
    "data.on_error": ("stop", "skip"),
    "data.worker_start": ("forkserver", "fork", "spawn"),
    "data.resident": ("auto", "true", "false"),
    "model.compile": ("auto", "true", "false"),
    "optim.name": ("adam", "adamw", "sgd"),
    "optim.scheduler": ("none", "cosine", "exponential", "iwae"),
    "logger.backend": ("csv", "wandb", "tensorboard", "none"),
    "logger.mode": ("auto", "online", "offline", "disabled"),
}
POSITIVE = ("model.k", "model.latent_dim", "model.mixtures", "data.batch_size", "data.eval_batch_size", "model.codebook_size",
            "model.code_dim", "trainer.steps_per_call", "trainer.num_nodes", "trainer.log_every_n_steps",
            "run.keep_last")
NON_NEGATIVE = ("model.res_blocks", "run.every_n_train_steps", "optim.lr", "optim.warmup_steps", "optim.max_nonfinite_steps")


def validate(cfg: DictConfig) -> None:
    """Checks a type cannot express: enumerations and positive counts."""
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"bad value for '{key}': {value!r}; choose one of {', '.join(allowed)}")
    for key in POSITIVE:
        if OmegaConf.select(cfg, key) < 1:
            raise ConfigError(f"bad value for '{key}': {OmegaConf.select(cfg, key)}; it must be >= 1")
    for key in ("model.beta", *NON_NEGATIVE):
        if OmegaConf.select(cfg, key) < 0:
            raise ConfigError(f"bad value for '{key}': {OmegaConf.select(cfg, key)}; it must be >= 0")
    if cfg.run.save_top_k < -1:
        raise ConfigError(f"bad value for 'run.save_top_k': {cfg.run.save_top_k}; it must be >= -1 (-1: keep all)")
    if cfg.model.sigma <= 0:
        raise ConfigError(f"bad value for 'model.sigma': {cfg.model.sigma}; the Gaussian decoder's standard deviation "
                          "must be > 0")
    devices = cfg.trainer.devices
    if isinstance(devices, int) and devices < 1 and devices != -1:
        raise ConfigError(f"bad value for 'trainer.devices': {devices}; a number >= 1, -1 (all), 'auto' or a list")
    interval = cfg.trainer.val_check_interval
    if interval is not None and not (isinstance(interval, int) and interval >= 1
                                     or isinstance(interval, float) and 0 < interval <= 1):
        raise ConfigError(f"bad value for 'trainer.val_check_interval': {interval!r}; steps (an integer >= 1) "
                          "or a fraction of an epoch (0 < f <= 1)")
    t, o = cfg.trainer, cfg.optim
    if t.check_val_every_n_epoch is not None and t.check_val_every_n_epoch < 1:
        raise ConfigError(f"bad value for 'trainer.check_val_every_n_epoch': {t.check_val_every_n_epoch}; it must be "
                          ">= 1, or null (validation every val_check_interval steps across epochs); "
                          "trainer.limit_val_batches=0 turns validation off")
    if t.gradient_clip_val is not None and t.gradient_clip_val < 0:
        raise ConfigError(f"bad value for 'trainer.gradient_clip_val': {t.gradient_clip_val}; the largest gradient "
                          "norm must be >= 0 (0 or null: no clipping)")
    limit = t.limit_train_batches
    if limit is not None and not (isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1
                                  or isinstance(limit, float) and 0 < limit <= 1):
        raise ConfigError(f"bad value for 'trainer.limit_train_batches': {limit!r}; steps per epoch (an integer "
                          ">= 1) or a fraction of the epoch (0 < f <= 1)")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"bad value for 'optim.betas': {list(o.betas)}; Adam's two decay rates, each in [0, 1)")
    if o.gamma <= 0:
        raise ConfigError(f"bad value for 'optim.gamma': {o.gamma}; the exponential decay per epoch must be > 0")
    if o.scheduler == "cosine" and t.max_steps < 0 and (t.max_epochs is None or t.max_epochs < 0):
        raise ConfigError("optim.scheduler=cosine decays over the run's length: set trainer.max_steps or "
                          "trainer.max_epochs (both are unlimited now)")
    if cfg.data.shuffle_buffer < 0:
        raise ConfigError(f"bad value for 'data.shuffle_buffer': {cfg.data.shuffle_buffer}; it must be >= 0 "
                          "(0: no shuffle, the split's stored order every epoch)")
    m = cfg.model
    if m.arch != "resnet" and (m.res_blocks != 1 or m.norm not in ("auto", "none")):
        raise ConfigError(f"model.res_blocks={m.res_blocks} and model.norm={m.norm} are the ResNet's "
                          f"(model.arch=resnet); model.arch={m.arch} has no residual blocks")
    if m.latent_grid and (m.family != "vae" or m.arch not in ("conv", "resnet") or m.stochastic_layers != 1):
        raise ConfigError(f"model.latent_grid={m.latent_grid} is a map of latents for model.family=vae, model.arch=conv "
                          f"or resnet, one stochastic layer (got {m.family}, {m.arch}, {m.stochastic_layers}): "
                          "use model.latent_grid=0")
    if m.mixtures > 1 and m.likelihood != "discretized_logistic":
        raise ConfigError(f"model.mixtures={m.mixtures} is a mixture of discretised logistics: use "
                          f"model.likelihood=discretized_logistic (or model.mixtures=1)")
    if m.arch == "resnet" and m.init == "iwae":
        raise ConfigError("model.init=iwae would overwrite the ResNet's zero-initialised residual branches "
                          "(docs/images.md): use model.init=torch with model.arch=resnet")
    if m.likelihood.startswith("discretized"):
        if cfg.data.binarize != "none":
            raise ConfigError(f"model.likelihood={m.likelihood} models 8-bit pixels; data.binarize="
                              f"{cfg.data.binarize} leaves 0 or 255 only: use model.likelihood=bernoulli")
        if m.init == "iwae":
            raise ConfigError(f"model.init=iwae sets a Bernoulli or Gaussian output bias; with model.likelihood="
                              f"{m.likelihood} use model.init=torch")
        if m.family == "vqvae":
            raise ConfigError(f"model.family=vqvae takes model.likelihood bernoulli or gaussian, not {m.likelihood}")
    if m.stochastic_layers not in (1, 2):
        raise ConfigError(f"bad value for 'model.stochastic_layers': {m.stochastic_layers}; choose 1 or 2")
    if m.stochastic_layers == 2:
        if m.family != "vae" or m.arch != "mlp":
            raise ConfigError("model.stochastic_layers=2 is the IWAE paper's fully connected model: it needs "
                              f"model.family=vae and model.arch=mlp (got {m.family}, {m.arch})")
        if m.estimator not in ("reparam", "stl"):
            raise ConfigError(f"bad value for 'model.estimator': {m.estimator!r}; with model.stochastic_layers=2 "
                              "choose reparam or stl")


def _separate_sweep_trial(cfg: DictConfig) -> None:
    """Under a wandb sweep agent (WANDB_SWEEP_ID, WANDB_RUN_ID set) every trial gets its own run
    folder, keyed by its run id: trials do not resume each other, and a preempted trial that the
    sweep re-queues (same run id) finds its own checkpoints."""
    run_id = os.environ.get("WANDB_RUN_ID")
    if not (os.environ.get("WANDB_SWEEP_ID") and run_id) or str(cfg.run.name).endswith(run_id):
        return
    raw_dir = OmegaConf.to_container(cfg.run, resolve=False)["dir"]
    if "run.name" not in str(raw_dir):  # a folder that the trial's name below does not already separate
        cfg.run.dir = str(Path(OmegaConf.select(cfg, "run.dir")) / run_id)
    cfg.run.name = f"{cfg.run.name}-{run_id}"


def load_config(files: list[str | Path] = (), overrides: list[str] = ()) -> DictConfig:
    """Compose the config: dataclass defaults <- each YAML file in order <- dotlist overrides."""
    schema = OmegaConf.structured(Config)
    cfg = schema.copy()
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = OmegaConf.load(path)
        except yaml.YAMLError as err:  # a syntax error: the parser's own line and column
            raise ConfigError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"{path}: a config file holds a mapping of keys (model:, data:, ...), "
                              f"not a {type(loaded).__name__}")
        for group, value in loaded.items_ex(resolve=False):
            if group in schema and isinstance(schema[group], DictConfig) and not isinstance(value, DictConfig):
                raise ConfigError(f"{path}: '{group}' is a group of keys ({_valid_keys(schema, f'{group}.x')}), "
                                  f"not a value ({value!r})")
        written = (yaml.load(path.read_text(), Loader=yaml.BaseLoader) or {}).get("slurm")  # every scalar a string
        if isinstance(written, dict) and isinstance(written.get("time"), str):
            loaded.slurm.time = written["time"]  # as written: YAML 1.1 reads 12:00:00 as 43200 (base 60)
        try:
            cfg = OmegaConf.merge(cfg, loaded)
        except OmegaConfBaseException as err:
            raise _explain(err, schema, str(path)) from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value (e.g. model.beta=4)")
        key, _, value = item.partition("=")
        try:
            if key.strip() == "slurm.time":  # a Slurm time as written, not YAML's base-60 number
                cfg = OmegaConf.merge(cfg, {"slurm": {"time": value.strip().strip("'\"")}})
                continue
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as err:
            raise _explain(err, schema, f"override '{item}'") from None
        except yaml.YAMLError as err:  # the value is parsed as YAML: `model.hidden=[1,2` and the like
            raise ConfigError(f"override '{item}': its value is not valid YAML ({' '.join(str(err).split())})") from None
    _separate_sweep_trial(cfg)
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise _explain(err, schema, "interpolation") from None
    for key in ("data.resident", "model.compile"):  # YAML and dotlists read true/false as booleans
        value = OmegaConf.select(cfg, key)
        if isinstance(value, bool):
            OmegaConf.update(cfg, key, str(value).lower())
    validate(cfg)
    return cfg


def config_object(config: dict | DictConfig) -> Config:
    """A resolved config (e.g. a checkpoint's) as the typed dataclasses: plain attribute reads."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), config))


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def flatten(tree: dict, prefix: str = "") -> dict:
    """{'model': {'beta': 4}} -> {'model.beta': 4}: the names sweeps and dotlist overrides use."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat
