"""The search behind `vaepipe sweep local` (docs/sweeps.md): one Optuna study per sweep folder, kept
in a journal file beside trials.json and shared by every agent of a Slurm array.

- Storage: Optuna's JournalFileBackend with its open-lock (appends under an O_EXCL lock file, which
  works on NFS and Lustre; SQLite over NFS does not lock reliably). The journal holds JSON only.
- method bayes: Optuna's TPE sampler, multivariate, with the constant liar, so each agent's next
  point accounts for every finished, pruned and still running trial. grid and random: the points
  pipeline.launch.sweep draws (as before), fixed into the study's trials.
- early_terminate {type: hyperband}: Optuna's asynchronous successive halving at wandb's bands
  (min_iter * eta^k, or max_iter / eta^k with s bands); an "iteration" is one validation.
A trial's state lives in the study: RUNNING while its agent (or its requeued Slurm task) has it,
then COMPLETE, PRUNED or FAIL; each trial knows its slot (its trial-NNN folder)."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import warnings
from pathlib import Path

from pipeline.config import ConfigError

JOURNAL = "study.journal"
AGENT_GONE = "its agent is gone"  # a failure its own slot retries (start_trial)
ITERATION = "validation"  # what one hyperband iteration is here


# --- early_terminate ------------------------------------------------------------------------------

def check_early_terminate(where: str, spec) -> dict | None:
    """wandb's early_terminate, checked: None (absent) or {min_iter, eta, rungs (None: unbounded)}."""
    if spec is None:
        return None
    at = f"{where}: early_terminate"
    if not isinstance(spec, dict) or spec.get("type") != "hyperband":
        raise ConfigError(f"{at}: bad value {spec!r}; e.g. early_terminate: {{type: hyperband, min_iter: 1, eta: 3}} "
                          "(hyperband is the one type wandb defines)")
    unknown = sorted(set(spec) - {"type", "min_iter", "max_iter", "eta", "s", "strict"})
    if unknown:
        raise ConfigError(f"{at}: unknown key(s) {', '.join(map(repr, unknown))}; known: min_iter, max_iter, s, eta")
    for key in ("min_iter", "max_iter", "s", "eta"):
        value = spec.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{at}: bad value for '{key}': {value!r}; an integer >= 1")
    eta = spec.get("eta", 3)
    if eta < 2:
        raise ConfigError(f"{at}: bad value for 'eta': {eta!r}; >= 2 (each band keeps the best 1/eta)")
    if "max_iter" not in spec:  # with both, wandb's server takes max_iter and s
        if "min_iter" not in spec:
            raise ConfigError(f"{at}: give min_iter (the first band), or max_iter with s (the number of bands)")
        return {"min_iter": spec["min_iter"], "eta": eta, "rungs": None}
    s = spec.get("s", 0)
    # wandb's bands: int(max_iter / eta^i) for i = 1..s, those >= 1
    bands = sorted({int(spec["max_iter"] / eta ** i) for i in range(1, s + 1) if spec["max_iter"] / eta ** i >= 1})
    if not bands:
        raise ConfigError(f"{at}: max_iter {spec['max_iter']} with eta {eta} and s {s!r} gives no band >= 1; "
                          "raise max_iter or s")
    if bands != [bands[0] * eta ** k for k in range(len(bands))]:
        raise ConfigError(f"{at}: the bands {bands} (int(max_iter / eta^i)) are not a geometric series, which "
                          f"successive halving needs; use a max_iter divisible by eta^s, or min_iter: {bands[0]}")
    return {"min_iter": bands[0], "eta": eta, "rungs": len(bands)}


def bands(hyperband: dict, up_to: int) -> list[int]:
    """The iterations at which trials are compared (and the worse stopped), up to `up_to`."""
    out, k = [], 0
    while (hyperband["rungs"] is None or k < hyperband["rungs"]) and hyperband["min_iter"] * hyperband["eta"] ** k <= up_to:
        out.append(hyperband["min_iter"] * hyperband["eta"] ** k)
        k += 1
    return out


def _pruner(hyperband: dict | None):
    import optuna

    if hyperband is None:
        return optuna.pruners.NopPruner()
    sha = optuna.pruners.SuccessiveHalvingPruner(min_resource=hyperband["min_iter"], reduction_factor=hyperband["eta"],
                                                 min_early_stopping_rate=0)
    if hyperband["rungs"] is None:
        return sha
    last = bands(hyperband, hyperband["min_iter"] * hyperband["eta"] ** hyperband["rungs"])[-1]

    class AtBands(optuna.pruners.BasePruner):
        """Successive halving with wandb's last band: no comparison after it (max_iter, s)."""

        def prune(self, study, trial) -> bool:
            return trial.last_step is not None and trial.last_step <= last and sha.prune(study, trial)

    return AtBands()


# --- the search space -----------------------------------------------------------------------------

def encode(value) -> str:
    """A categorical value as Optuna stores it: JSON text (values may be lists, e.g. model.hidden)."""
    return json.dumps(value, sort_keys=True)


def distributions(where: str, params: dict) -> dict:
    """wandb's parameter specs as Optuna distributions (for bayes; constants stay out of the model)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from pipeline.launch.sweep import distribution

    out = {}
    for name, spec in params.items():
        kind, lo, hi = distribution(spec), spec.get("min"), spec.get("max")
        if kind == "categorical":
            out[name] = CategoricalDistribution([encode(v) for v in spec["values"]])
        elif kind == "int_uniform":
            out[name] = IntDistribution(lo, hi)
        elif kind in ("uniform", "q_uniform"):
            out[name] = FloatDistribution(lo, hi)  # q: rounded after the draw, as wandb does
        elif kind in ("log_uniform_values", "q_log_uniform_values"):
            out[name] = FloatDistribution(lo, hi, log=True)
        elif kind == "log_uniform":  # wandb's min and max are natural logarithms here
            out[name] = FloatDistribution(math.exp(lo), math.exp(hi), log=True)
        elif kind == "normal":
            raise ConfigError(f"{where}: parameter '{name}': method bayes models a bounded range; distribution "
                              "normal has none: use uniform (min/max) or log_uniform_values")
    return out


def decode(params: dict, specs: dict) -> dict:
    """The values a trial's command gets, from the study's parameters and the sweep's specs."""
    from pipeline.launch.sweep import distribution

    out = {}
    for name, spec in specs.items():
        kind = distribution(spec)
        if kind == "constant":
            out[name] = spec["value"]
            continue
        value = params[name]
        if kind == "categorical":
            value = json.loads(value)
        elif kind in ("q_uniform", "q_log_uniform_values"):
            value = round(value / spec.get("q", 1)) * spec.get("q", 1)
        out[name] = value
    return out


# --- the study ------------------------------------------------------------------------------------

def open_study(folder: str | Path, sweep: dict, seed: int = 0, slot: int = 0, trials: int = 10):
    """The sweep folder's study (created by the first agent, loaded by the others). The sampler's
    seed differs per slot: agents started at once must not draw the same first points; `trials`
    (the sweep's size) sets how many of them bayes draws at random before modelling."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    path = str(Path(folder) / JOURNAL)
    if os.path.lexists(path) and (os.path.islink(path) or not os.path.isfile(path)):
        # a shared folder is data: a planted link would have the study appended to its target
        raise ConfigError(f"{path}: a link or not a regular file; a sweep's study journal is a plain file "
                          "that `vaepipe sweep` writes (move it away)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = JournalStorage(JournalFileBackend(path, lock_obj=JournalFileOpenLock(path)))
        sampler = optuna.samplers.TPESampler(
            seed=seed * 100003 + slot, multivariate=True, constant_liar=True,
            n_startup_trials=min(10, max(3, trials // 3))) if sweep["method"] == "bayes" else None
        return optuna.create_study(storage=storage, study_name="sweep", load_if_exists=True, sampler=sampler,
                                   pruner=_pruner(check_early_terminate("sweep", sweep.get("early_terminate"))),
                                   direction="maximize" if sweep["metric"].get("goal") == "maximize" else "minimize")


def slot_trials(study) -> dict[int, object]:
    """slot -> the study's (newest) trial for it."""
    out = {}
    for t in study.get_trials(deepcopy=False):
        slot = t.user_attrs.get("slot")
        if isinstance(slot, int):
            out[slot] = t
    return out


def _holder_gone(holder, mine: dict) -> str | None:
    """Why the agent that holds a trial is provably gone, or None. A Slurm task is judged by Slurm
    alone (a requeued task's old process is dead, but the task is pending and will resume it)."""
    from pipeline.run_lock import gone, slurm_job_ended

    if not isinstance(holder, dict):
        return "no agent recorded"
    job = holder.get("slurm_job")
    if isinstance(job, str) and re.fullmatch(r"\d+(_\d+)?", job):
        if job == mine.get("slurm_job"):
            return "this is the same Slurm task, requeued since"
        return f"Slurm says job {job} is no longer running" if slurm_job_ended(job) else None
    return gone(holder, {**mine, "slurm_job": None})


def settle_stale(study, log=print) -> list[int]:
    """RUNNING trials whose agent is provably gone (a crashed process, an ended Slurm job that was not
    requeued) become FAIL, so the search and the results stop counting them as running. A requeued
    task's trial stays RUNNING: its slot resumes it."""
    import optuna

    from pipeline.run_lock import describe, me

    mine, settled = me("sweep trial"), []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        holder = t.user_attrs.get("agent")
        why = _holder_gone(holder, mine)
        if why and t.user_attrs.get("slot") is not None and "same Slurm task" not in why:
            study._storage.set_trial_user_attr(t._trial_id, "failed", f"{AGENT_GONE}: {why}")
            study.tell(t.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)  # another agent may be first
            log(f"trial {t.user_attrs.get('slot')}: marked failed ({describe(holder) if isinstance(holder, dict) else '?'}: {why})")
            settled.append(t.number)
    return settled


def check_params(where: str, specs: dict, params) -> dict:
    """A trial's parameters read back from the study (a shared file: data), checked against the
    sweep's own specs: every name, nothing else, each value one the spec can give."""
    from pipeline.launch.sweep import BOUNDED, _check_value, distribution

    if not isinstance(params, dict) or set(params) != set(specs):
        raise ConfigError(f"{where}: the study's parameters {sorted(params) if isinstance(params, dict) else params!r} "
                          f"are not the sweep's {sorted(specs)}")
    for name, spec in specs.items():
        value, kind = params[name], distribution(spec)
        ok = True
        if kind == "constant":
            ok = value == spec["value"]
        elif kind == "categorical":
            ok = any(encode(value) == encode(v) for v in spec["values"])
        elif kind in BOUNDED:
            lo, hi = (math.exp(spec["min"]), math.exp(spec["max"])) if kind == "log_uniform" else (spec["min"], spec["max"])
            slack = spec.get("q", 0)  # wandb rounds q-distributions after the draw
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and lo - slack <= value <= hi + slack \
                and (kind != "int_uniform" or isinstance(value, int))
        if not ok:
            raise ConfigError(f"{where}: the study gives {name}={value!r}, which the sweep's spec {spec!r} cannot")
        _check_value(where, name, value)
    return params


def start_trial(study, slot: int, sweep: dict, fixed: dict | None = None, log=print):
    """Slot `slot`'s trial: its RUNNING one resumed (a requeued task, a restarted local sweep), or a
    new one asked of the study (bayes: the sampler's next point; grid/random: `fixed`). Returns
    (trial number, params, resumed), or None when the slot's trial has already ended."""
    import optuna

    from pipeline.errors import RunFolderBusy
    from pipeline.run_lock import describe, me

    mine = me("sweep trial")
    where = f"the sweep's study ({JOURNAL}), trial {slot}"
    old = slot_trials(study).get(slot)
    if old is not None and old.state == optuna.trial.TrialState.RUNNING:  # its own first: then the others'
        holder = old.user_attrs.get("agent")
        if _holder_gone(holder, mine) is None:
            raise RunFolderBusy(f"trial {slot} of this sweep is being run by "
                                f"{describe(holder) if isinstance(holder, dict) else '?'}")
        study._storage.set_trial_user_attr(old._trial_id, "agent", mine)
        return old.number, check_params(where, sweep["parameters"], old.user_attrs.get("params")), True
    retry = old is not None and old.state == optuna.trial.TrialState.FAIL and \
        str(old.user_attrs.get("failed", "")).startswith(AGENT_GONE)
    if old is not None and not retry:
        return None
    settle_stale(study, log)  # before asking: a crashed agent's point no longer counts as running
    if retry:  # the slot's crashed trial, settled by another agent: again, same point, same run folder
        params = check_params(where, sweep["parameters"], old.user_attrs.get("params"))
        trial = study.ask()
        for key, value in (("params", params), ("agent", mine), ("retry_of", old.number), ("slot", slot)):
            trial.set_user_attr(key, value)
        return trial.number, params, True
    if sweep["method"] == "bayes":
        trial = study.ask(distributions(where, sweep["parameters"]))
        params = decode(trial.params, sweep["parameters"])
    else:
        trial, params = study.ask(), dict(fixed or {})
    for key, value in (("params", params), ("agent", mine), ("slot", slot)):  # slot last: it makes the trial the slot's
        trial.set_user_attr(key, value)
    return trial.number, check_params(where, sweep["parameters"], params), False


def finish_trial(study, number: int, summary: dict, code: int, metric: str, forwarded: bool = False) -> str:
    """Tell the study how the trial ended; its status for the results. A stopped trial is not told
    anything: its requeued task (or its slot started again) resumes it, and if none ever does, the
    next agent to ask finds its agent gone (settle_stale). Stopped: the fit exited for a preemption
    (75 or 0, with preempted_at in its summary), or it died of SIGTERM after its preemption's
    checkpoint, or it ended with an error while its agent was passing on a stop signal: Slurm's
    SIGTERM at a requeue can land while the checkpointed fit is still exiting (exit -15)."""
    import optuna

    state = optuna.trial.TrialState
    trial = study._storage.get_trial(study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number))
    if trial.state != state.RUNNING:
        return trial.state.name.lower()
    # 75: EXIT_PREEMPTED (also a write failure's exit: stopped only with the preemption's summary);
    # -15 / 143: SIGTERM, as Popen / srun report it
    preempted = summary.get("preempted_at") is not None
    if (preempted and code in (0, 75, -signal.SIGTERM, 128 + signal.SIGTERM)) or (forwarded and code != 0):
        return "stopped"
    value = (summary.get("metrics") or {}).get(metric) if isinstance(summary.get("metrics"), dict) else None
    if code == 0 and summary.get("pruned"):
        study.tell(number, state=state.PRUNED, skip_if_finished=True)
        return "pruned"
    number_ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if code == 0 and number_ok and math.isfinite(value):
        study.tell(number, value, skip_if_finished=True)
        return "done"
    why = f"exited {code}" if code else f"metric {metric} {'is not finite' if number_ok else 'never logged'}"
    study._storage.set_trial_user_attr(trial._trial_id, "failed", why)
    study.tell(number, state=state.FAIL, skip_if_finished=True)
    return why


def report(folder: str | Path, number: int, value: float, iteration: int, study=None) -> bool:
    """From inside a trial's fit, after validation `iteration`: the metric into the study, and
    whether the pruner stops the trial here. Reporting an iteration twice (a resumed run
    validating again) keeps the first value. `study`: one already open (else the folder's)."""
    import optuna

    from pipeline.launch.sweep import load_sweep

    study = study or open_study(folder, load_sweep(Path(folder) / "sweep.yaml", compose=False))
    trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
    trial = optuna.trial.Trial(study, trial_id)
    if iteration not in study._storage.get_trial(trial_id).intermediate_values:
        trial.report(value, iteration)
    return trial.should_prune()


def trial_outcome(trial, summary: dict, metric: str) -> tuple[float | None, str, int]:
    """(metric value, status, iterations reported) of a slot, from its study trial (None: a sweep
    folder without a study, or a slot not started) and its run's summary.json."""
    def number(v):
        return v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None

    final = number((summary.get("metrics") or {}).get(metric)) if isinstance(summary.get("metrics"), dict) else None
    if trial is None:
        if not summary:
            return None, "not run", 0
        if summary.get("preempted_at") is not None:
            return final, "stopped", 0
        return final, "done" if final is not None else f"metric {metric} never logged", 0
    reports = trial.intermediate_values
    last = number(reports[max(reports)]) if reports else None
    state = trial.state.name
    if state == "COMPLETE":
        return number(trial.value), "done", len(reports)
    if state == "PRUNED":
        return last, "pruned", len(reports)
    if state == "FAIL":
        why = str(trial.user_attrs.get("failed", "failed"))
        return last, why if why.startswith("metric") else f"failed ({why})", len(reports)
    stopped = summary.get("preempted_at") is not None
    return last, "stopped" if stopped else "running", len(reports)
