"""`vaepipe submit`: render an sbatch script from the config, write it into the run folder, sbatch it.

Nothing from a config reaches the shell unquoted: #SBATCH values must match a conservative pattern
(sbatch parses them, not the shell), everything on a command line is shlex-quoted. Only
`slurm.setup` is shell code, on purpose: it is the site's own (module load, source a venv).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from string import Template

from omegaconf import DictConfig, OmegaConf

from pipeline.config import ConfigError, to_yaml
from pipeline.outputs import write_text
from pipeline.redact import holds_secrets
from pipeline.run_lock import RunFolderLock

TEMPLATES = Path(__file__).resolve().parents[2] / "slurm"
SAFE = re.compile(r"^[A-Za-z0-9_.:,=@/+%-]+$")  # what may stand in an #SBATCH line
# Slurm's time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S (minutes and hours may exceed 59 / 23)
REQUEUE_TIMEOUT_S = 60
TIME = re.compile(r"^(?:(?P<d>\d+)-(?P<dh>\d+)(?::(?P<dm>\d+)(?::(?P<ds>\d+))?)?"
                  r"|(?P<h>\d+):(?P<hm>\d+):(?P<hs>\d+)|(?P<m>\d+)(?::(?P<ms>\d+))?)$")


def slurm_seconds(text: str) -> int:
    """Seconds in a Slurm time limit (`--time`), or a ConfigError naming it."""
    match = TIME.match(str(text))
    if not match:
        raise ConfigError(f"--time {text!r} is not a Slurm time (M, M:S, H:M:S, D-H, D-H:M or D-H:M:S)")
    g = {k: int(v) for k, v in match.groupdict().items() if v is not None}
    if "d" in g:
        return ((g["d"] * 24 + g["dh"]) * 60 + g.get("dm", 0)) * 60 + g.get("ds", 0)
    if "h" in g:
        return (g["h"] * 60 + g["hm"]) * 60 + g["hs"]
    return g["m"] * 60 + g.get("ms", 0)


def _sbatch_value(key: str, value) -> str:
    text = str(value)
    if not SAFE.match(text):
        raise ConfigError(f"{key}={text!r} cannot go into an #SBATCH line: use letters, digits and _.:,=@/+%- only")
    return text


def check_sizes(cfg: DictConfig, nodes: int | None, gpus_per_node: int | None) -> tuple[int, int, int]:
    """(nodes, tasks per node, gpus per node), refusing a request that disagrees with the trainer:
    Lightning needs one task per device, `--nodes` = trainer.num_nodes, tasks per node = devices."""
    devices = cfg.trainer.devices
    if not isinstance(devices, int) or devices < 1:
        raise ConfigError(f"trainer.devices must be a number of devices per node for a Slurm job, got {devices!r}")
    if nodes is not None and nodes != cfg.trainer.num_nodes:
        raise ConfigError(f"--nodes {nodes} but trainer.num_nodes={cfg.trainer.num_nodes}: Lightning would refuse "
                          f"the job; make them equal (add trainer.num_nodes={nodes})")
    gpus = cfg.slurm.gpus_per_node if gpus_per_node is None else gpus_per_node
    if gpus and gpus != devices:
        raise ConfigError(f"--gpus-per-node {gpus} but trainer.devices={devices}: one task per GPU is needed, so "
                          f"they must be equal (add trainer.devices={gpus})")
    return cfg.trainer.num_nodes, devices, gpus


def render(cfg: DictConfig, *, nodes: int | None = None, gpus_per_node: int | None = None,
           partition: str | None = None, time: str | None = None, account: str | None = None,
           config_path: str | Path, workdir: str | Path | None = None, extra: dict | None = None,
           template: str | Path | None = None) -> str:
    """The sbatch script for this config (no file written, nothing submitted)."""
    s = cfg.slurm
    n_nodes, tasks, gpus = check_sizes(cfg, nodes, gpus_per_node)
    time = str(time or s.time)
    limit_s = slurm_seconds(time)
    if not 0 < int(s.signal_grace_s) < limit_s:
        raise ConfigError(f"slurm.signal_grace_s={s.signal_grace_s} must be positive and shorter than --time {time} "
                          f"({limit_s} s): the job is told to checkpoint that long before its limit")
    lines = []
    for key, value in (("partition", partition or s.partition), ("account", account or s.account)):
        if value:
            lines.append(f"#SBATCH --{key}={_sbatch_value(key, value)}")
    if gpus:
        lines.append(f"#SBATCH --gpus-per-node={gpus}")
    for opt in s.extra_sbatch:
        if not opt.startswith("--") or not SAFE.match(opt):
            raise ConfigError(f"slurm.extra_sbatch entry {opt!r} must be one --option=value of safe characters")
        lines.append(f"#SBATCH {opt}")
    for key in s.env:
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", str(key)):
            raise ConfigError(f"slurm.env key {key!r} is not an environment variable name")
    run_dir = Path(cfg.run.dir).resolve()
    values = {
        "job_name": _sbatch_value("run.name", f"vaepipe-{cfg.run.name}"),
        "nodes": n_nodes, "tasks_per_node": tasks, "cpus_per_task": int(s.cpus_per_task), "time": time,
        "signal_grace_s": int(s.signal_grace_s), "output": _sbatch_value("run.dir", run_dir / "slurm-%j.out"),
        "sbatch_lines": "\n".join(lines), "workdir": shlex.quote(str(Path(workdir or os.getcwd()).resolve())),
        "setup": "\n".join(s.setup), "python": shlex.quote(sys.executable),
        "env": "\n".join(f"export {k}={shlex.quote(str(v))}" for k, v in s.env.items()),
        "config": shlex.quote(str(Path(config_path).resolve())), **(extra or {}),
    }
    path = Path(template or s.template or TEMPLATES / "train.sbatch")
    if not path.is_file():
        raise FileNotFoundError(f"sbatch template not found: {path}")
    # safe_substitute: a $NAME that is not one of ours ($HOME, $SLURM_JOB_ID in a site's own template)
    # is the shell's and stays as written; ours are filled in
    return Template(path.read_text()).safe_substitute(values)


def submit(cfg: DictConfig, *, dry_run: bool = False, **options) -> tuple[Path, str | None]:
    """Write config + script into the run folder, then sbatch it; returns (script, job id or None)."""
    run_dir = Path(cfg.run.dir)
    config_path = run_dir / "config.yaml"
    text = render(cfg, config_path=config_path, **options)
    if dry_run:
        return run_dir / "job.sbatch", text
    # refused while a fit holds the folder (one writer per run folder); held while writing and submitting
    with RunFolderLock(run_dir, "submit"):
        private = holds_secrets(OmegaConf.to_container(cfg))  # slurm.env tokens: owner-only files
        write_text(config_path, to_yaml(cfg), "config", private=private)  # atomically: a requeued job reads it
        return submit_script(run_dir, "job.sbatch", text, private=private)


def submit_script(folder: Path, name: str, text: str, private: bool = False) -> tuple[Path, str]:
    """Write the script into `folder` and sbatch it; (script path, job id)."""
    folder.mkdir(parents=True, exist_ok=True)
    script = write_text(folder / name, text, "job script", private=private)  # atomically, never through a link
    try:
        out = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, check=True)
    except FileNotFoundError:
        raise FileNotFoundError("sbatch not found: run `vaepipe submit` on a Slurm login node") from None
    except subprocess.CalledProcessError as err:
        raise ValueError(f"sbatch refused {script}: {err.stderr.strip()}") from None
    return script, out.stdout.strip().split(";")[0]


def under_slurm_batch() -> bool:
    """Inside an sbatch allocation that Lightning's SLURMEnvironment will recognise."""
    return "SLURM_JOB_ID" in os.environ and "SLURM_NTASKS" in os.environ and \
        os.environ.get("SLURM_JOB_NAME") not in ("bash", "interactive")


def requeue_self() -> bool:
    """Rank 0, after the preemption checkpoint: put this job back in the queue (same job id, so the
    same run folder and, with the tracking issue, the same wandb run)."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job else os.environ.get("SLURM_JOB_ID")
    if not job:
        return False
    try:  # bounded: a controller that does not answer must not keep a stopped run from exiting
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=REQUEUE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as err:
        print(f"requeue of job {job} failed ({type(err).__name__}: {err}); resubmit it to resume", flush=True)
        return False
    print(f"requeue of job {job}: {'done' if result.returncode == 0 else result.stderr.strip()}", flush=True)
    return result.returncode == 0
