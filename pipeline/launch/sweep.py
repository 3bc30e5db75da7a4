"""Hyperparameter sweeps in wandb's YAML format (docs/sweeps.md).

With a wandb server: `vaepipe sweep create FILE` registers the sweep, `vaepipe sweep submit ID`
runs its trials as a Slurm job array, one `wandb agent --count 1` per array task. Without one
(air-gapped clusters, tests): `vaepipe sweep local FILE` draws the same YAML's grid or random
trials here, runs each with the command line wandb's agent would build (wandb's own macro code),
one after the other or as a Slurm array, and writes a results table.

Parameter names are dotted config keys (`model.beta`), so `${args_no_hyphens}` hands them to
`vaepipe fit` as dotlist overrides.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import random
import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.config import ConfigError, load_config

METHODS = ("grid", "random", "bayes")
DISTRIBUTIONS = ("constant", "categorical", "uniform", "int_uniform", "q_uniform", "log_uniform_values",
                 "q_log_uniform_values", "log_uniform", "normal")


def load_sweep(path: str | Path) -> dict:
    """The sweep YAML, checked: method, metric, command, and every parameter a config key with a
    distribution this module (or, for bayes, the wandb server) can draw from."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep file not found: {path}")
    try:
        sweep = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(sweep, dict):
        raise ConfigError(f"{path}: a sweep is a mapping with method, metric, parameters, command")
    where = str(path)
    if sweep.get("method") not in METHODS:
        raise ConfigError(f"{where}: bad value for 'method': {sweep.get('method')!r}; choose one of {', '.join(METHODS)}")
    metric = sweep.get("metric") or {}
    if not metric.get("name") or metric.get("goal", "minimize") not in ("minimize", "maximize"):
        raise ConfigError(f"{where}: 'metric' needs a name (e.g. val/loss) and goal minimize|maximize")
    command = [str(c) for c in sweep.get("command") or []]
    if "${args_no_hyphens}" not in command or "fit" not in command:
        raise ConfigError(f"{where}: 'command' must run `vaepipe fit ... ${{args_no_hyphens}}` (dotlist overrides)")
    params = sweep.get("parameters") or {}
    if not params:
        raise ConfigError(f"{where}: no 'parameters'")
    for name, spec in params.items():
        if not isinstance(spec, dict) or "parameters" in spec:
            raise ConfigError(f"{where}: parameter '{name}': use a dotted config key (model.beta) with "
                              "value/values/distribution, not nested parameters")
        kind = distribution(spec)
        if kind not in DISTRIBUTIONS:
            raise ConfigError(f"{where}: parameter '{name}': unknown distribution {kind!r}; "
                              f"known: {', '.join(DISTRIBUTIONS)}")
        if sweep["method"] == "grid" and kind not in ("constant", "categorical"):
            raise ConfigError(f"{where}: parameter '{name}': a grid sweep needs 'values' (or 'value'), got {kind}")
    configs = [str(c) for i, c in enumerate(command) if i and command[i - 1] in ("-c", "--config")]
    for trial in draw(sweep, 1, seed=0) if sweep["method"] != "bayes" else [first_values(params)]:
        try:  # every name a real config key, every drawn value of the right type
            load_config(configs, overrides(trial))
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
    return sweep


def distribution(spec: dict) -> str:
    """wandb's inference: values -> categorical, value -> constant, int min/max -> int_uniform."""
    if "distribution" in spec:
        return spec["distribution"]
    if "values" in spec:
        return "categorical"
    if "value" in spec:
        return "constant"
    if isinstance(spec.get("min"), int) and isinstance(spec.get("max"), int):
        return "int_uniform"
    return "uniform" if "min" in spec and "max" in spec else "?"


def first_values(params: dict) -> dict:
    return {k: s["values"][0] if "values" in s else s.get("value", s.get("min", s.get("mu"))) for k, s in params.items()}


def _sample(spec: dict, rng: random.Random):
    kind = distribution(spec)
    lo, hi = spec.get("min"), spec.get("max")
    if kind == "constant":
        return spec["value"]
    if kind == "categorical":
        return rng.choice(spec["values"])
    if kind == "uniform":
        return rng.uniform(lo, hi)
    if kind == "int_uniform":
        return rng.randint(lo, hi)
    if kind == "q_uniform":
        return round(rng.uniform(lo, hi) / spec.get("q", 1)) * spec.get("q", 1)
    if kind == "log_uniform_values":
        return math.exp(rng.uniform(math.log(lo), math.log(hi)))
    if kind == "q_log_uniform_values":
        q = spec.get("q", 1)
        return round(math.exp(rng.uniform(math.log(lo), math.log(hi))) / q) * q
    if kind == "log_uniform":  # min and max are natural logarithms
        return math.exp(rng.uniform(lo, hi))
    return rng.gauss(spec.get("mu", 0.0), spec.get("sigma", 1.0))  # normal


def draw(sweep: dict, trials: int | None, seed: int = 0) -> list[dict]:
    """Parameter sets: the grid in order (its first `trials`), or `trials` random draws."""
    params = sweep["parameters"]
    if sweep["method"] == "bayes":
        raise ConfigError("method: bayes needs the wandb server (it models the results so far): use "
                          "`vaepipe sweep create` + `vaepipe sweep submit`, or set method: random for local sweeps")
    if sweep["method"] == "grid":
        names = list(params)
        choices = [params[n]["values"] if "values" in params[n] else [params[n]["value"]] for n in names]
        grid = [dict(zip(names, combo)) for combo in itertools.product(*choices)]
        return grid[:trials] if trials else grid
    rng = random.Random(seed)
    return [{name: _sample(spec, rng) for name, spec in params.items()} for _ in range(trials or 10)]


def overrides(params: dict) -> list[str]:
    """The `${args_no_hyphens}` the agent builds, from wandb's own code."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    return create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})["args_no_hyphens"]


def agent_command(sweep: dict, params: dict) -> list[str]:
    """The command line wandb's agent runs for one trial (wandb_agent.Agent._command_run): its
    ${envvar:...} expansion, then each ${macro} replaced by its argument list."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    macros = create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    macros.update(interpreter=["python"], program=[sweep.get("program", "")], env=["/usr/bin/env"])
    command = []
    for c in create_sweep_command(list(sweep["command"])):
        c = str(c)
        command += macros.get(c[2:-1]) or [] if c.startswith("${") and c.endswith("}") else [c]
    return command


# --- local sweeps ---------------------------------------------------------------------------------

def _trial_env() -> dict:
    """The trial's environment: this Python's scripts first on PATH (`vaepipe` in the command)."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}


def plan_local(path: str | Path, out_dir: str | Path, trials: int | None, seed: int, extra: list[str]) -> dict:
    """Draw the trials and write them to out_dir/trials.json (the array tasks read it from there)."""
    sweep = load_sweep(path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sweep.yaml").write_text(Path(path).read_text())
    name = Path(path).stem
    rows = []
    for i, params in enumerate(draw(sweep, trials, seed)):
        run_dir = out_dir / f"trial-{i:03d}"
        command = agent_command(sweep, params) + list(extra) + [
            f"run.name={name}-trial{i:03d}", f"run.dir={run_dir.resolve()}", f"logger.group={name}"]
        rows.append({"index": i, "params": params, "run_dir": str(run_dir), "command": command})
    plan = {"sweep": name, "metric": sweep["metric"], "trials": rows}
    (out_dir / "trials.json").write_text(json.dumps(plan, indent=1, default=str) + "\n")
    return plan


def run_trial(out_dir: str | Path, index: int, replace_process: bool = False) -> int:
    trial = json.loads((Path(out_dir) / "trials.json").read_text())["trials"][index]
    print(f"trial {index}: {shlex.join(trial['command'])}", flush=True)
    if replace_process:  # a Slurm array task: signals reach `vaepipe fit` directly
        os.execvpe(trial["command"][0], trial["command"], _trial_env())
    return subprocess.run(trial["command"], env=_trial_env()).returncode


def results(out_dir: str | Path) -> list[dict]:
    """params -> final metric of every trial so far (from each run folder's summary.json), best
    first; also written to results.csv and results.md in the sweep folder."""
    out_dir = Path(out_dir)
    plan = json.loads((out_dir / "trials.json").read_text())
    metric, goal = plan["metric"]["name"], plan["metric"].get("goal", "minimize")
    rows = []
    for t in plan["trials"]:
        summary = Path(t["run_dir"]) / "summary.json"
        done = json.loads(summary.read_text()) if summary.is_file() else {}
        value = done.get("metrics", {}).get(metric)
        status = "not run" if not done else ("stopped" if done.get("preempted_at") is not None else "done")
        if status == "done" and value is None:  # finished, but nothing to compare it by
            status = f"metric {metric} never logged"
        rows.append({"trial": t["index"], **t["params"], metric: value, "status": status, "run_dir": t["run_dir"]})
    worst = math.inf if goal == "minimize" else -math.inf
    rows.sort(key=lambda r: (r[metric] if r[metric] is not None else worst) * (1 if goal == "minimize" else -1))
    keys = list(rows[0]) if rows else []
    with open(out_dir / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    (out_dir / "results.md").write_text(f"# sweep {plan['sweep']}: {metric} ({goal}), best first\n\n"
                                        + "\n".join(lines) + "\n")
    return rows


def run_local(path: str | Path, out_dir: str | Path, trials: int | None = None, seed: int = 0,
              extra: list[str] = ()) -> list[dict]:
    """Every trial, one after the other; a failed trial is reported and the sweep goes on."""
    plan = plan_local(path, out_dir, trials, seed, extra)
    for t in plan["trials"]:
        code = run_trial(out_dir, t["index"])
        if code != 0:
            print(f"trial {t['index']} exited {code}; see {t['run_dir']}", file=sys.stderr, flush=True)
        results(out_dir)
    return results(out_dir)


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "(no trials)"
    keys = [k for k in rows[0] if k != "run_dir"]
    cells = [[f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


# --- Slurm arrays ---------------------------------------------------------------------------------

def submit_array(cfg, *, template: str, array: str, name: str, extra: dict, dry_run: bool = False,
                 **options) -> tuple[Path, str]:
    """Render a job-array template (trial launch, array range filled in) into the sweep folder
    (cfg.run.dir) and sbatch it."""
    from pipeline.launch.slurm import TEMPLATES, render, submit_script

    tasks = cfg.trainer.devices * cfg.trainer.num_nodes
    # A multi-process trial: the agent (or trial runner) is one process; `vaepipe fit` relaunches
    # itself under srun to get one task per device (pipeline.cli).
    launch = 'export VAEPIPE_TRIAL_SRUN="srun --kill-on-bad-exit=1"' if tasks > 1 else ""
    # The job's size and requeue setting reach every trial's `vaepipe fit` (pipeline.cli), also when
    # they came from `-c site.yaml`, which the trial's own command line does not name.
    sizing = (f"trainer.devices={cfg.trainer.devices} trainer.num_nodes={cfg.trainer.num_nodes} "
              f"slurm.requeue={str(cfg.slurm.requeue).lower()}")
    launch += f"\nexport VAEPIPE_TRIAL_OVERRIDES={shlex.quote(sizing)}"
    run_dir = Path(cfg.run.dir)
    values = {"array": array, "trial_launch": launch, "output": str(run_dir.resolve() / "slurm-%A_%a.out"),
              "job_name": re.sub(r"[^A-Za-z0-9_.-]", "_", f"vaepipe-sweep-{name}"), **extra}
    text = render(cfg, config_path=run_dir / "config.yaml", template=TEMPLATES / template, extra=values, **options)
    if dry_run:
        return run_dir / "sweep.sbatch", text
    return submit_script(run_dir, "sweep.sbatch", text)


def sweep_folder(sweep_id: str) -> Path:
    return Path("runs") / "sweeps" / re.sub(r"[^A-Za-z0-9_.-]", "_", sweep_id)
