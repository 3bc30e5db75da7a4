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
import io
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
from omegaconf import OmegaConf

from pipeline.config import ConfigError, flatten, load_config
from pipeline.launch.search import JOURNAL, check_early_terminate, distributions
from pipeline.outputs import write_text

METHODS = ("grid", "random", "bayes")
DISTRIBUTIONS = ("constant", "categorical", "uniform", "int_uniform", "q_uniform", "log_uniform_values",
                 "q_log_uniform_values", "log_uniform", "normal")


def load_sweep(path: str | Path, compose: bool = True, local: bool = True) -> dict:
    """The sweep YAML, checked: method, metric, early_terminate, command, and every parameter a
    config key with a distribution this module (bayes: pipeline.launch.search) can draw from.
    compose=False skips composing the trial's config (a trial's own fit reading its sweep);
    local=False (a sweep for the wandb server) leaves out what only the local engine cannot do."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep file not found: {path}")
    try:
        sweep = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(sweep, dict):
        raise ConfigError(f"{path}: a sweep is a mapping with method, metric, parameters, command")
    where = str(path)
    if sweep.get("method") not in METHODS:
        raise ConfigError(f"{where}: bad value for 'method': {sweep.get('method')!r}; choose one of {', '.join(METHODS)}")
    _check_metric(where, sweep.get("metric"))
    if local:  # the server has its own rules (any eta > 1, its own bands)
        check_early_terminate(where, sweep.get("early_terminate"))
    command = sweep.get("command")
    # a string would be read letter by letter, a mapping by its keys: only a list is a command line
    if not isinstance(command, list) or not all(isinstance(c, (str, int, float)) for c in command):
        raise ConfigError(f"{where}: bad value for 'command': {command!r}; a list of words, e.g. "
                          "[${env}, vaepipe, fit, ${args_no_hyphens}]")
    command = [str(c) for c in command]
    if "${args_no_hyphens}" not in command or "fit" not in command:
        raise ConfigError(f"{where}: 'command' must run `vaepipe fit ... ${{args_no_hyphens}}` (dotlist overrides)")
    check_fit_command(command, where)
    params = sweep.get("parameters")
    if not params:
        raise ConfigError(f"{where}: no 'parameters'")
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: bad value for 'parameters': {params!r}; a mapping of dotted config keys to "
                          "their values, e.g. parameters: {model.beta: {values: [1, 4]}}")
    for name, spec in params.items():
        _check_parameter(where, sweep["method"], name, spec)
        for value in _values(spec):
            _check_value(where, name, value)
    if sweep["method"] == "bayes" and local:
        distributions(where, params)  # what the study cannot model is refused here, not by the first agent
    if not compose:
        return sweep
    configs = [str(c) for i, c in enumerate(command) if i and command[i - 1] in ("-c", "--config")]
    words = [c for c in command[command.index("fit") + 1:] if "=" in c and not c.startswith("-")]
    for trial in draw(sweep, 1, seed=0) if sweep["method"] != "bayes" else [first_values(params)]:
        try:  # every name a real config key, every drawn value of the right type
            cfg = load_config(configs, [*words, *overrides(trial)])
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
        # what the sweep's own words resolve to (interpolations, YAML escapes, its -c files): no command
        for key, value in flatten(OmegaConf.to_container(cfg, resolve=True)).items():
            _no_pipe(value, f"{where}: {key}")
    return sweep


def _check_metric(where: str, metric) -> None:
    if not (isinstance(metric, dict) and isinstance(metric.get("name"), str) and metric["name"]
            and metric.get("goal", "minimize") in ("minimize", "maximize")):
        raise ConfigError(f"{where}: bad value for 'metric': {metric!r}; a name (e.g. val/loss) and goal "
                          "minimize|maximize, e.g. metric: {name: val/loss, goal: minimize}")


# The distributions drawn between 'min' and 'max' (wandb's sweep config schema).
BOUNDED = ("uniform", "int_uniform", "q_uniform", "log_uniform_values", "q_log_uniform_values", "log_uniform")


def _check_parameter(where: str, method: str, name, spec) -> None:
    """One parameter's spec, checked so that drawing from it cannot fail (or quietly misread it)."""
    at = f"{where}: parameter '{name}'"
    if not isinstance(name, str):
        raise ConfigError(f"{at}: a parameter's name is a dotted config key such as model.beta")
    if not isinstance(spec, dict):
        raise ConfigError(f"{at}: bad value {spec!r}; a mapping with value, values, or distribution/min/max, "
                          "e.g. {values: [1, 4]}")
    if "parameters" in spec:
        raise ConfigError(f"{at}: use a dotted config key (model.beta) with value/values/distribution, "
                          "not nested parameters")
    kind = distribution(spec)
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"{at}: unknown distribution {kind!r}; known: {', '.join(DISTRIBUTIONS)}")
    if method == "grid" and kind not in ("constant", "categorical"):
        raise ConfigError(f"{at}: a grid sweep needs 'values' (or 'value'), got {kind}")
    if kind == "constant" and "value" not in spec:
        raise ConfigError(f"{at}: distribution constant needs 'value'")
    if kind == "categorical" and not (isinstance(spec.get("values"), list) and spec["values"]):
        # a string would be drawn letter by letter: only a list is a set of values
        raise ConfigError(f"{at}: bad value for 'values': {spec.get('values')!r}; a non-empty list, "
                          "e.g. values: [1, 4]")
    if kind in BOUNDED:
        _check_bounds(at, kind, spec)
    if kind == "normal":
        for key in ("mu", "sigma"):
            if key in spec:
                _number(at, key, spec[key])
        if spec.get("sigma", 1.0) <= 0:
            raise ConfigError(f"{at}: bad value for 'sigma': {spec['sigma']!r}; the standard deviation must be > 0")


def _number(at: str, key: str, value, integer: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        hint = ""
        if isinstance(value, str):
            try:
                float(value)
                hint = f" (YAML reads {value} as text: write it with a decimal point, e.g. 1.0e-4)"
            except ValueError:
                pass
        raise ConfigError(f"{at}: bad value for '{key}': {value!r}; {'an integer' if integer else 'a number'}{hint}")


def _check_bounds(at: str, kind: str, spec: dict) -> None:
    for key in ("min", "max"):
        if key not in spec:
            raise ConfigError(f"{at}: distribution {kind} needs 'min' and 'max'")
        _number(at, key, spec[key], integer=kind == "int_uniform")
    lo, hi = spec["min"], spec["max"]
    if lo > hi:
        raise ConfigError(f"{at}: 'min' {lo!r} is above 'max' {hi!r}")
    if kind in ("log_uniform_values", "q_log_uniform_values") and lo <= 0:
        raise ConfigError(f"{at}: bad value for 'min': {lo!r}; {kind} draws between the values themselves, "
                          "which must be > 0 (log_uniform takes their logarithms)")
    if "q" in spec:
        _number(at, "q", spec["q"])
        if spec["q"] <= 0:
            raise ConfigError(f"{at}: bad value for 'q': {spec['q']!r}; the step must be > 0")


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
    if sweep["method"] == "bayes":  # its points come from the study, one per trial as it starts
        return [None] * (trials or 10)
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


def dotlist_item(key: str, text: str) -> str:
    """`key=value` that a config reads back as exactly `text` (a path, a name): a dotlist value is
    parsed as YAML (` #` starts a comment, `a: b` is a mapping, `- x` a list), so it goes in YAML
    double quotes. `${` is refused: the config would read an interpolation there, even escaped
    (a resolved config reads its values again)."""
    if "${" in text:
        raise ValueError(f"{key}={text!r}: a folder or name with '${{' in it would be read as a config "
                         "interpolation (such as ${run.dir}); choose one without it")
    quoted = yaml.safe_dump(text, default_style='"', width=math.inf, allow_unicode=True).rstrip("\n")
    return f"{key}={quoted}"


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


def trial_command(sweep: dict, params: dict, extra: list[str], name: str, index: int, run_dir: Path) -> list[str]:
    """Trial `index`'s command: the agent's, the user's overrides after it, its folder and names
    exactly as given (quoted), whatever characters they hold."""
    return agent_command(sweep, params) + list(extra) + [
        dotlist_item("run.name", f"{name}-trial{index:03d}"), dotlist_item("run.dir", str(run_dir)),
        dotlist_item("logger.group", name)]


def plan_local(path: str | Path, out_dir: str | Path, trials: int | None, seed: int, extra: list[str]) -> dict:
    """Draw the trials and write them to out_dir/trials.json (the array tasks read it from there).
    A bayes sweep's points are not drawn here: each trial asks the study as it starts."""
    if trials is not None and trials < 1:  # 0 would mean the whole grid, -1 all but its last point
        raise ValueError(f"--trials must be >= 1, got {trials}")
    sweep = load_sweep(path)
    name = Path(path).stem
    rows = []
    points = draw(sweep, trials, seed)
    if trials is not None and len(points) < trials:
        print(f"note: the grid of {path} has {len(points)} points: --trials {trials} runs each once", file=sys.stderr)
    for i, params in enumerate(points):
        # absolute, as the command has it: `sweep results` may run from another folder
        run_dir = (Path(out_dir) / f"trial-{i:03d}").resolve()
        command = trial_command(sweep, params, extra, name, i, run_dir) if params is not None else None
        rows.append({"index": i, "params": params, "run_dir": str(run_dir), "command": command})
    _check_trial_command(path, trial_command(sweep, first_values(sweep["parameters"]), extra, name, 0, Path(rows[0]["run_dir"]))
                         if sweep["method"] == "bayes" else rows[0]["command"])
    plan = {"sweep": name, "method": sweep["method"], "metric": sweep["metric"], "seed": seed, "extra": list(extra),
            "trials": rows}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / JOURNAL).exists():  # the same sweep again continues it; another one would mix two studies
        new = json.loads(json.dumps(plan, default=str))
        try:
            old = read_plan(out_dir)
            same_sweep = (out_dir / "sweep.yaml").read_text() == Path(path).read_text() and \
                {k: v for k, v in old.items() if k != "trials"} == {k: v for k, v in new.items() if k != "trials"}
        except (ConfigError, OSError):
            old, same_sweep = {}, False
        # more --trials extend it: the trials so far are the first ones of the longer plan (random draws
        # in order from the seed; bayes asks the study), so each keeps its point and folder
        extends = same_sweep and len(new["trials"]) > len(old["trials"]) and new["trials"][:len(old["trials"])] == old["trials"]
        if not (same_sweep and (new["trials"] == old["trials"] or extends)):
            raise FileExistsError(f"{out_dir} holds the study of another sweep (or other --seed/overrides, or fewer "
                                  f"--trials); `vaepipe sweep results {out_dir}` shows it: choose another --out")
        if extends:
            write_text(out_dir / "trials.json", json.dumps(plan, indent=1, default=str) + "\n", "sweep plan")
            print(f"{out_dir}: the sweep's {len(old['trials'])} trials extended to {len(new['trials'])}", file=sys.stderr)
        return plan
    write_text(out_dir / "sweep.yaml", Path(path).read_text(), "sweep file")  # never through a planted link
    write_text(out_dir / "trials.json", json.dumps(plan, indent=1, default=str) + "\n", "sweep plan")
    return plan


def _check_trial_command(path: str | Path, command: list[str]) -> None:
    """The first trial's `vaepipe fit` command as that command will read it: a mistyped override
    (added to every trial) is refused here, once, not by every trial of the sweep."""
    from pipeline.cli import build_parser

    args, rest = build_parser().parse_known_args(command[command.index("fit"):])
    unknown = [t for t in rest if t.startswith("-") or "=" not in t]  # as pipeline.cli.main reads them
    try:
        if unknown:
            raise ConfigError(f"`vaepipe fit` takes no {' '.join(unknown)}")
        load_config(args.config, [*args.overrides, *rest])
    except ConfigError as err:
        raise ConfigError(f"{path}: the trials' command would be refused: {err}") from None


def read_plan(out_dir: str | Path) -> dict:
    """A local sweep folder's trials.json (plan_local), checked: a folder that is not a sweep's, or a
    damaged plan, is named here rather than failing mid-way."""
    path = Path(out_dir) / "trials.json"
    if not path.is_file():
        raise FileNotFoundError(f"{out_dir}: not a local sweep folder (no trials.json; `vaepipe sweep local` "
                                "writes one)")
    try:
        plan = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: damaged plan, not valid JSON ({err}); `vaepipe sweep local` writes it "
                          "again") from None
    problem = _plan_problem(plan)
    if problem:
        raise ConfigError(f"{path}: damaged plan: {problem}; `vaepipe sweep local` writes it again")
    return plan


def _plan_problem(plan) -> str | None:
    """What in a trials.json is not as plan_local writes it (None: nothing)."""
    if not isinstance(plan, dict):
        return f"a JSON object expected, got {type(plan).__name__}"
    if not isinstance(plan.get("sweep"), str):
        return f"bad value for 'sweep': {plan.get('sweep')!r}"
    if not isinstance(plan.get("metric"), dict) or not isinstance(plan["metric"].get("name"), str):
        return f"bad value for 'metric': {plan.get('metric')!r}"
    if not isinstance(plan.get("trials"), list):
        return f"bad value for 'trials': {plan.get('trials')!r}"
    bayes = plan.get("method") == "bayes"  # its trials' points and commands come from the study
    if not isinstance(plan.get("extra", []), list) or not all(isinstance(c, str) for c in plan.get("extra", [])):
        return f"bad value for 'extra': {plan.get('extra')!r}"
    shapes = {"index": int, "params": type(None) if bayes else dict, "run_dir": str, "command": type(None) if bayes else list}
    for i, t in enumerate(plan["trials"]):
        bad = [k for k, kind in shapes.items() if not isinstance(t, dict) or not isinstance(t.get(k), kind)]
        if bad or not bayes and (not t["command"] or not all(isinstance(c, str) for c in t["command"])):
            return f"trial {i}: bad value for '{(bad or ['command'])[0]}'"
    return None


# --- a sweep file runs `vaepipe fit`, nothing else (docs/trust.md) ---------------------------------

# what may stand before `fit`: wandb's ${env} (or /usr/bin/env), then vaepipe or `python -m pipeline`
LAUNCHERS = (["vaepipe"], ["${interpreter}", "-m", "pipeline"], ["python", "-m", "pipeline"],
             ["python3", "-m", "pipeline"])


def check_fit_command(command: list[str], where: str, allow_pipe: bool = False) -> list[str]:
    """The arguments after `fit` of a sweep's (or a trial's) command, once it is known to run
    `vaepipe fit` with only `-c FILE` and key=value words: a shared sweep file is data, and must not
    make `sweep local` (or an agent) run another program, or fit's own flags it does not expect."""
    fit = command.index("fit") if "fit" in command else -1
    head = command[:fit] if fit >= 0 else command
    head = head[1:] if head[:1] in (["${env}"], ["/usr/bin/env"]) else head
    if fit < 0 or head not in LAUNCHERS:
        raise ConfigError(f"{where}: 'command' must run vaepipe fit ([${{env}}, vaepipe, fit, ...] or [${{env}}, "
                          f"${{interpreter}}, -m, pipeline, fit, ...]), not {' '.join(command[:fit + 1 or None])[:120]!r}")
    args, i = command[fit + 1:], 0
    while i < len(args):
        word = args[i]
        if word in ("-c", "--config") and i + 1 < len(args):
            i += 2
            continue
        if word.startswith("-") or ("=" not in word and not (word.startswith("${") and word.endswith("}"))):
            raise ConfigError(f"{where}: 'command' passes {word[:80]!r} to vaepipe fit, which takes -c FILE and "
                              "key=value overrides only")
        if not allow_pipe:
            _no_pipe(word.split("=", 1)[-1], f"{where}: 'command'")
        i += 1
    return args


def _no_pipe(value, where: str) -> None:
    if isinstance(value, str) and value.lstrip(" \t'\"").startswith(("pipe:", "!!str pipe:")):
        raise ConfigError(f"{where}: a `pipe:` value ({value[:80]!r}) is a shell command, which a sweep file may not "
                          "give; pass it yourself on the command line (`vaepipe sweep local FILE data.root=...`)")


def _check_value(where: str, name: str, value) -> None:
    """One value of a parameter as its trial reads it (wandb's `key=value`, parsed by the config as
    YAML: quotes and escapes undone): no pipe: command, no interpolation that could build one."""
    at = f"{where}: parameter '{name}'"
    if isinstance(value, str) and "${" in value:
        raise ConfigError(f"{at}: {value[:80]!r} holds a config interpolation; a sweep value is a value")
    for item in overrides({name: value}):
        try:
            read = OmegaConf.to_container(OmegaConf.from_dotlist([item]))
        except Exception:  # noqa: BLE001 - what the config cannot read is refused by load_config below
            continue
        for key, got in flatten(read).items():
            _no_pipe(got, at)
            if isinstance(got, str) and "${" in got:
                raise ConfigError(f"{at}: {str(got)[:80]!r} reads as a config interpolation; a sweep value is a value")


def _values(spec) -> list:
    return list(spec.get("values") or []) + ([spec["value"]] if "value" in spec else []) if isinstance(spec, dict) else []


def run_trial(out_dir: str | Path, index: int) -> int:
    """Run trial `index` of a local sweep folder: always this Python's `vaepipe fit`, with the
    trial's checked arguments (a trials.json names no program that runs), as a trial of the
    folder's study (pipeline/launch/search.py): the point asked of it (bayes), the metric reported
    at each validation, the end told to it. A slot whose trial already ended is not run again; one
    still RUNNING (a requeued Slurm task, a restarted sweep) resumes its run folder."""
    from pipeline.launch import search

    out_dir = Path(out_dir).resolve()
    plan = read_plan(out_dir)
    trials = plan["trials"]
    if not 0 <= index < len(trials):  # -1 would run the last trial
        raise ValueError(f"{out_dir}: no trial {index}: this sweep has {len(trials)} trials"
                         + (f" (0-{len(trials) - 1})" if trials else ""))
    trial = trials[index]
    sweep = load_sweep(out_dir / "sweep.yaml", compose=False)
    study = search.open_study(out_dir, sweep, plan.get("seed", 0), index, len(trials))
    started = search.start_trial(study, index, sweep, fixed=trial["params"])
    if started is None:
        print(f"trial {index}: already ended ({search.slot_trials(study)[index].state.name.lower()}); not run again")
        return 0
    number, params, resumed = started
    if trial["command"] is None:  # bayes: the command of the point the study gave, in the slot's own folder
        trial["run_dir"] = str(out_dir / f"trial-{index:03d}")
        trial["command"] = trial_command(sweep, params, plan.get("extra", []), plan["sweep"], index, Path(trial["run_dir"]))
    # the plan `sweep local` wrote, with the user's own overrides (a pipe: data root among them, maybe):
    # the program is never taken from it
    args = check_fit_command(trial["command"], str(out_dir / "trials.json"), allow_pipe=True)
    command = [sys.executable, "-m", "pipeline", "fit", *args]
    print(f"trial {index}{' (resumed)' if resumed else ''}: {shlex.join(command)}", flush=True)
    env = {**_trial_env(), "VAEPIPE_SWEEP_DIR": str(out_dir), "VAEPIPE_SWEEP_TRIAL": str(number)}
    code, forwarded = _run_forwarding_signals(command, env)
    status = search.finish_trial(study, number, _summary(Path(trial["run_dir"]) / "summary.json"), code,
                                 plan["metric"]["name"], forwarded)
    print(f"trial {index}: {status}", flush=True)
    try:  # the table and picture as of this trial's end (each array task refreshes them)
        results(out_dir)
    except (ConfigError, OSError, ValueError) as err:
        print(f"results not refreshed ({err}); `vaepipe sweep results {out_dir}` writes them", flush=True)
    return 75 if status == "stopped" else code  # 75: pipeline.train.EXIT_PREEMPTED, whatever signal ended the fit


def _run_forwarding_signals(command: list[str], env: dict) -> tuple[int, bool]:
    """The trial's fit as a child, this process staying to tell the study how it ended. Slurm's
    time-limit signal (B:USR1) and SIGTERM reach this process (the batch shell): passed on to the
    fit, which checkpoints (and requeues the task). (exit code, whether a signal was passed on)."""
    import signal

    child = subprocess.Popen(command, env=env)
    forwarded = []

    def forward(signum, frame):
        if child.returncode is None:  # a signal after the child's end stopped nothing
            forwarded.append(signum)
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        return child.wait(), bool(forwarded)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def results(out_dir: str | Path) -> list[dict]:
    """params -> final metric and status of every trial so far, best first; also written to
    results.csv, results.md and results.png (pipeline/launch/plots.py) in the sweep folder. Status:
    done, pruned (stopped by early_terminate at a band), failed (its reason), metric never logged,
    stopped (preempted, to be resumed), running, not run."""
    from pipeline.launch import search

    out_dir = Path(out_dir)
    plan = read_plan(out_dir)
    metric, goal = plan["metric"]["name"], plan["metric"].get("goal", "minimize")
    slots = {}
    if (out_dir / JOURNAL).is_file():
        study = search.open_study(out_dir, load_sweep(out_dir / "sweep.yaml", compose=False), plan.get("seed", 0))
        search.settle_stale(study)
        slots = search.slot_trials(study)
    rows = []
    for t in plan["trials"]:
        done = _summary(Path(t["run_dir"]) / "summary.json")
        trial = slots.get(t["index"])
        params = t["params"] if t["params"] is not None else (trial.user_attrs.get("params") if trial else None)
        params = params if isinstance(params, dict) else {}
        value, status, iterations = search.trial_outcome(trial, done, metric)
        rows.append({"trial": t["index"], **params, metric: value, "status": status, "iterations": iterations,
                     "order": trial.number if trial else None, "run_dir": t["run_dir"]})
    sign = 1 if goal == "minimize" else -1
    rank = {"done": 0, "pruned": 1}
    rows.sort(key=lambda r: (rank.get(r["status"], 2), r[metric] * sign if r[metric] is not None else math.inf))
    keys = list(dict.fromkeys(k for r in rows for k in r if k != "order"))
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=keys, extrasaction="ignore", restval="")
    writer.writeheader()
    writer.writerows(rows)
    write_text(out_dir / "results.csv", table.getvalue(), "sweep results")
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    write_text(out_dir / "results.md", f"# sweep {plan['sweep']}: {metric} ({goal}), best first\n\n"
               + "\n".join(lines) + "\n\n![results](results.png)\n", "sweep results")
    from pipeline.launch.plots import plot_results

    plot_results(out_dir / "results.png", rows, [k for k in keys if k not in ("trial", metric, "status", "iterations",
                                                                                "run_dir")], metric, goal)
    return rows


def _summary(path: Path) -> dict:
    """A trial's summary.json, or {} when it is missing or not a summary (a damaged file is not run)."""
    try:
        done = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return done if isinstance(done, dict) else {}


def run_local(path: str | Path, out_dir: str | Path, trials: int | None = None, seed: int = 0,
              extra: list[str] = ()) -> list[dict]:
    """Every trial, one after the other; a failed trial is reported and the sweep goes on."""
    plan = plan_local(path, out_dir, trials, seed, extra)
    for t in plan["trials"]:
        code = run_trial(out_dir, t["index"])
        if code == 75:  # pipeline.train.EXIT_PREEMPTED: a signal stopped the sweep, not only this trial
            print(f"trial {t['index']} stopped by a signal (checkpointed): the sweep stops here; the same command "
                  "continues it", file=sys.stderr, flush=True)
            break
        if code != 0:
            print(f"trial {t['index']} exited {code}; see {t['run_dir']}", file=sys.stderr, flush=True)
    return results(out_dir)


def format_table(rows: list[dict]) -> str:
    if not rows:
        return "(no trials)"
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in ("run_dir", "order")]
    rows = [{k: r.get(k, "") for k in keys} for r in rows]
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

    tasks = job_size(cfg)
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
    return submit_script(run_dir, "sweep.sbatch", text, private=bool(cfg.slurm.env))  # its exports hold tokens


def job_size(cfg) -> int:
    """Processes per trial (devices x nodes): the array's tasks are sized by it, so each factor must
    be a count ('auto', -1 or a list of GPU ids cannot size a Slurm job)."""
    for key in ("devices", "num_nodes"):
        value = cfg.trainer[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"bad value for 'trainer.{key}': {value!r}; a Slurm job array needs an integer "
                              f">= 1 ({'devices per node' if key == 'devices' else 'nodes'} of each trial)")
    return cfg.trainer.devices * cfg.trainer.num_nodes


def sweep_folder(sweep_id: str) -> Path:
    return Path("runs") / "sweeps" / re.sub(r"[^A-Za-z0-9_.-]", "_", sweep_id)
