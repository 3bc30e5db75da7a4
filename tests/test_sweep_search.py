"""Local sweeps that search (pipeline/launch/search.py): wandb's early_terminate read as wandb
documents it; the pruner stops exactly the trials it should at the bands min_iter * eta^k; bayes
with hyperband reaches a known optimum in fewer trial-steps than random search; a pruned trial
of a real `vaepipe fit` stops cleanly and is told apart from failed and metric-never-logged; a
crashed agent leaves the study consistent. The Slurm array of agents: tests/test_slurm.py."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError
from pipeline.launch import search
from pipeline.launch import sweep as sw
from tests.conftest import ROOT, vaepipe
from tests.test_sweeps import TINY

FIT = ["${env}", "vaepipe", "fit", "${args_no_hyphens}"]


def write_sweep(folder: Path, **body) -> dict:
    """A sweep folder's sweep.yaml (what `sweep local` copies there); the loaded, checked sweep."""
    folder.mkdir(parents=True, exist_ok=True)
    spec = {"metric": {"name": "val/loss", "goal": "minimize"}, "command": FIT, **body}
    (folder / "sweep.yaml").write_text(yaml.safe_dump(spec))
    return sw.load_sweep(folder / "sweep.yaml", compose=False)


def run_engine_trial(folder: Path, sweep: dict, slot: int, curve, max_iter: int, fixed=None, seed=0, fast=False,
                     trials=10):
    """One trial through the real engine (study, journal, sampler, pruner) with a cheap objective in
    place of `vaepipe fit`: report curve(params, it) at iterations 1..max_iter until pruned (each
    report through the journal file as a fit does; fast: through the agent's open study).
    Returns (iterations run, final value or None when pruned)."""
    study = search.open_study(folder, sweep, seed, slot, trials)
    number, params, _ = search.start_trial(study, slot, sweep, fixed=fixed)
    for it in range(1, max_iter + 1):
        value = curve(params, it)
        if search.report(folder, number, value, it, study=study if fast else None):
            search.finish_trial(study, number, {"pruned": {"iteration": it}, "metrics": {}}, 0, "val/loss")
            return it, None
    search.finish_trial(study, number, {"metrics": {"val/loss": value}}, 0, "val/loss")
    return max_iter, value


# --- early_terminate as wandb reads it ------------------------------------------------------------

def test_hyperband_settings_follow_wandb():
    check = search.check_early_terminate
    assert check("s", None) is None
    hb = check("s", {"type": "hyperband", "min_iter": 3})  # eta defaults to 3, bands unbounded
    assert hb == {"min_iter": 3, "eta": 3, "rungs": None} and search.bands(hb, 100) == [3, 9, 27, 81]
    # max_iter with s bands: wandb's int(max_iter / eta^i), i = 1..s
    hb = check("s", {"type": "hyperband", "max_iter": 27, "eta": 3, "s": 2})
    assert search.bands(hb, 1000) == [3, 9]
    assert search.bands(check("s", {"type": "hyperband", "max_iter": 81, "eta": 3, "s": 3}), 1000) == [3, 9, 27]
    for spec, words in [({"type": "envelope"}, "hyperband"), ({"type": "hyperband"}, "min_iter"),
                        ({"type": "hyperband", "min_iter": 1, "eta": 1}, "'eta'"),
                        ({"type": "hyperband", "min_iter": 0}, "'min_iter'"),
                        ({"type": "hyperband", "min_iter": 1, "etta": 2}, "'etta'"),
                        ({"type": "hyperband", "max_iter": 50, "eta": 3, "s": 3}, "geometric"),
                        ({"type": "hyperband", "max_iter": 2, "eta": 3, "s": 1}, "no band")]:
        with pytest.raises(ConfigError, match=words):
            check("f.yaml", spec)


# --- the pruner, trial by trial -------------------------------------------------------------------

# Six trials' learning curves, started one after another (lower is better). Worked by hand with
# asynchronous successive halving (eta = 3): at a band, a trial goes on when its value is among the
# best floor(n / eta) of the n trials that have reached the band (itself included; at least the best one).
CURVES = [lambda it: 5.0,                                      # first everywhere: goes on
          lambda it: 4.0 if it < 2 else 6.0,                   # best at 1 (of 2); worst at 3 (of 2)
          lambda it: 6.0 if it < 2 else 1.0,                   # worst at 1 (of 3): stopped, though it would win
          lambda it: 3.0 if it < 3 else 4.0 if it < 9 else 4.5,
          lambda it: 2.0 if it < 3 else 5.5,
          lambda it: 4.5]                                      # 4th of 6 at band 1: best 2 go on


@pytest.mark.parametrize("early,expected", [
    # bands 1, 3, 9
    ({"type": "hyperband", "min_iter": 1, "eta": 3}, [(9, 5.0), (3, None), (1, None), (9, 4.5), (3, None), (1, None)]),
    # max_iter 9, s 1: one band, at 3 (int(9 / 3)); nothing compared at 1 or 9
    ({"type": "hyperband", "max_iter": 9, "eta": 3, "s": 1}, [(9, 5.0), (3, None), (9, 1.0), (3, None), (3, None),
                                                                (3, None)]),
])
def test_the_pruner_stops_the_trials_it_should_at_the_bands(tmp_path, early, expected):
    sweep = write_sweep(tmp_path, method="grid", early_terminate=early,
                        parameters={"model.latent_dim": {"values": list(range(1, 7))}})
    got = [run_engine_trial(tmp_path, sweep, i, lambda p, it, i=i: CURVES[i](it), 9, fixed={"model.latent_dim": i + 1})
           for i in range(6)]
    assert got == expected
    # what the study holds: a pruned trial's reports end at its band, and every slot has one trial
    study = search.open_study(tmp_path, sweep)
    trials = search.slot_trials(study)
    assert sorted(trials) == list(range(6)) and len(study.trials) == 6
    for i, (iterations, final) in enumerate(expected):
        assert sorted(trials[i].intermediate_values) == list(range(1, iterations + 1))
        assert trials[i].state.name == ("COMPLETE" if final is not None else "PRUNED")


# --- search against random, on an objective whose optimum is known -------------------------------

def objective(params: dict, it: int) -> float:
    """Final value f >= 0, 0 at lr 1e-2, beta 0.3, latent 8; its learning curve f + 3 / it."""
    f = (math.log10(params["optim.lr"]) + 2) ** 2 + 4 * (params["model.beta"] - 0.3) ** 2 \
        + (0 if params["model.latent_dim"] == 8 else 0.5)
    return f + 3.0 / it


def steps_to_reach(trials: list, tolerance: float) -> int | None:
    """Trial-steps (validations run, all trials) until a finished trial's value is within
    `tolerance` of the optimum 0; None if none was."""
    steps = 0
    for iterations, final in trials:
        steps += iterations
        if final is not None and final - 3.0 / 9 <= tolerance:
            return steps
    return None


def test_bayes_with_hyperband_reaches_the_optimum_in_fewer_trial_steps_than_random(tmp_path):
    # 30 trials of 9 validations each; bayes (TPE) with hyperband (min_iter 1, eta 3) against random
    # without early termination, the same seeds. Measured over seeds 0-19 (2026-12-07): bayes got
    # within 0.1 of the optimum in fewer trial-steps in 15 of 20 seeds, random in 3, neither in 2
    # (bayes reached it in 16 seeds, random in 9; bayes used 60-154 trial-steps in all, random 270).
    # Seeded, so the outcome below is fixed; the bound leaves room for another platform's TPE draws.
    space = {"optim.lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1.0},
             "model.beta": {"min": 0.0, "max": 1.0}, "model.latent_dim": {"values": [4, 8, 16]}}
    wins = {"bayes": 0, "random": 0}
    for seed in range(10):
        runs = {}
        for method, early in (("bayes", {"type": "hyperband", "min_iter": 1, "eta": 3}), ("random", None)):
            folder = tmp_path / f"{method}{seed}"
            sweep = write_sweep(folder, method=method, parameters=space, **({"early_terminate": early} if early else {}))
            fixed = sw.draw(sweep, 30, seed)
            runs[method] = [run_engine_trial(folder, sweep, i, objective, 9, fixed=fixed[i], seed=seed, fast=True, trials=30)
                            for i in range(30)]
        assert all(it == 9 for it, _ in runs["random"])  # nothing stops random here
        b, r = (steps_to_reach(runs[m], 0.1) for m in ("bayes", "random"))
        if b is not None and (r is None or b < r):
            wins["bayes"] += 1
        elif r is not None and (b is None or r < b):
            wins["random"] += 1
    print("wins over seeds 0-9:", wins)
    assert wins["bayes"] >= 6 and wins["bayes"] >= 2 * wins["random"], wins


# --- a real sweep: pruned, failed, metric never logged --------------------------------------------

def read_rows(out: Path) -> dict:
    return {int(r["trial"]): r for r in csv.DictReader(open(out / "results.csv"))}


def test_a_pruned_trial_stops_cleanly_and_is_told_apart(sprites_root, tmp_path):
    # Grid (the order is known): trial 1's learning rate barely moves the weights, so at the first
    # band (validation 1, eta 2) it is worse than trial 0 and is stopped there; trial 2's latent size
    # 0 is refused by its fit (exit 2): failed, not pruned.
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({
        "method": "grid", "metric": {"name": "val/loss", "goal": "minimize"}, "command": FIT,
        "early_terminate": {"type": "hyperband", "min_iter": 1, "eta": 2},
        "parameters": {"optim.lr": {"values": [3e-3, 1e-7, 3e-3]}, "model.latent_dim": {"values": [4]}}}))
    out = tmp_path / "sweep"
    small = {**TINY, "trainer.max_steps": "40", "trainer.val_check_interval": "10"}
    proc = vaepipe("sweep", "local", spec, "--out", out, f"data.root={sprites_root}",
                   *[f"{k}={v}" for k, v in small.items()], check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_rows(out)
    assert [rows[i]["status"] for i in (0, 1, 2)] == ["done", "pruned", "done"]
    assert [int(rows[i]["iterations"]) for i in (0, 1, 2)] == [4, 1, 4]
    pruned = json.loads((Path(rows[1]["run_dir"]) / "summary.json").read_text())
    assert pruned["pruned"] == {"iteration": 1, "step": 10, "value": pytest.approx(float(rows[1]["val/loss"]))}
    assert pruned["global_step"] == 10 and pruned["preempted_at"] is None
    from pipeline.checkpoints import load_checkpoint
    assert load_checkpoint(Path(rows[1]["run_dir"]) / "checkpoints/last.ckpt")["global_step"] == 10
    assert "pruned at validation 1" in proc.stderr and "pruned by the sweep's early_terminate at step 10" in proc.stdout
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| pruned |" in (out / "results.md").read_text() and "results.png" in (out / "results.md").read_text()
    # Run again: every slot has ended, nothing is run twice
    again = vaepipe("sweep", "local", spec, "--out", out, f"data.root={sprites_root}",
                    *[f"{k}={v}" for k, v in small.items()])
    assert again.stdout.count("already ended") == 3

    # failed and metric-never-logged, each named as such
    spec.write_text(yaml.safe_dump({
        "method": "grid", "metric": {"name": "val/never", "goal": "minimize"}, "command": FIT,
        "parameters": {"model.latent_dim": {"values": [4, -1]}}}))
    proc = vaepipe("sweep", "local", spec, "--out", tmp_path / "other", f"data.root={sprites_root}",
                   *[f"{k}={v}" for k, v in small.items()], check=False)
    assert proc.returncode == 1
    rows = read_rows(tmp_path / "other")
    assert rows[0]["status"] == "metric val/never never logged"
    assert rows[1]["status"].startswith("failed (exited 2")


def test_a_bayes_sweep_asks_the_study_for_each_point(sprites_root, tmp_path):
    spec = tmp_path / "b.yaml"
    spec.write_text(yaml.safe_dump({
        "method": "bayes", "metric": {"name": "val/loss", "goal": "minimize"}, "command": FIT,
        "parameters": {"optim.lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2},
                       "model.hidden": {"values": [[16], [32]]}, "model.latent_dim": {"min": 2, "max": 6}}}))
    out = tmp_path / "sweep"
    # the trials log to wandb (offline here): the results picture and table go there too
    small = {**TINY, "trainer.max_steps": "4", "logger.backend": "wandb", "logger.mode": "offline"}
    small.pop("model.hidden")
    proc = vaepipe("sweep", "local", spec, "--out", out, "--trials", "3", f"data.root={sprites_root}",
                   *[f"{k}={v}" for k, v in small.items()])
    assert "wandb run b-results (offline)" in proc.stdout
    pictures = list((out / "wandb").glob("offline-run-*/files/media/images/sweep/results_*.png"))
    assert len(pictures) == 1 and pictures[0].read_bytes()[:4] == b"\x89PNG"
    rows = read_rows(out)
    assert all(r["status"] == "done" for r in rows.values())
    points = set()
    for r in rows.values():  # each point in the space, and the one its fit trained with
        cfg = yaml.safe_load((Path(r["run_dir"]) / "config.yaml").read_text())
        assert 1e-4 <= float(r["optim.lr"]) <= 1e-2 and cfg["optim"]["lr"] == pytest.approx(float(r["optim.lr"]))
        assert json.dumps(cfg["model"]["hidden"]) == r["model.hidden"] and 2 <= cfg["model"]["latent_dim"] <= 6
        points.add((r["optim.lr"], r["model.hidden"], r["model.latent_dim"]))
    assert len(points) == 3  # three agents' seeds: three points
    assert json.loads((out / "trials.json").read_text())["trials"][0]["params"] is None


# --- a crashed agent ------------------------------------------------------------------------------

def start_agent(out: Path, slot: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline", "sweep", "trial", str(out), str(slot)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def kill_when_checkpointed(agent: subprocess.Popen, run_dir: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not list((run_dir / "checkpoints").glob("step-*.ckpt")) and time.time() < deadline:
        assert agent.poll() is None, agent.stdout.read()[-3000:]
        time.sleep(0.2)
    os.killpg(agent.pid, signal.SIGKILL)  # the agent and its fit, as a node that dies
    agent.wait()


def test_a_crashed_agent_leaves_the_study_consistent(sprites_root, tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"method": "random", "metric": {"name": "val/loss", "goal": "minimize"},
                                    "command": FIT, "parameters": {"model.latent_dim": {"min": 2, "max": 6}}}))
    out = tmp_path / "sweep"
    small = {**TINY, "trainer.max_steps": "300", "trainer.val_check_interval": "100", "run.every_n_train_steps": "20",
             "trainer.check_val_every_n_epoch": "null",
             "model.arch": "conv", "data.batch_size": "16"}
    small.pop("model.hidden")
    # plan only: the agents are started by hand below (what each array task runs)
    sw.plan_local(spec, out, 3, 0, [f"data.root={sprites_root}", *[f"{k}={v}" for k, v in small.items()]])
    plan = json.loads((out / "trials.json").read_text())

    # slot 0's agent dies; its own slot, started again, resumes the same trial and run folder
    kill_when_checkpointed(start_agent(out, 0), Path(plan["trials"][0]["run_dir"]))
    study = search.open_study(out, sw.load_sweep(out / "sweep.yaml", compose=False))
    assert search.slot_trials(study)[0].state.name == "RUNNING"
    resumed = subprocess.run([sys.executable, "-m", "pipeline", "sweep", "trial", str(out), "0"], cwd=ROOT,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "trial 0 (resumed)" in resumed.stdout and "resuming from" in resumed.stdout
    # slot 1's agent dies and is not started again: the next agent to ask marks its trial failed
    kill_when_checkpointed(start_agent(out, 1), Path(plan["trials"][1]["run_dir"]))
    done = subprocess.run([sys.executable, "-m", "pipeline", "sweep", "trial", str(out), "2"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0 and "trial 1: marked failed" in done.stdout, done.stdout[-3000:]
    rows = read_rows(out)
    assert rows[0]["status"] == "done" and rows[2]["status"] == "done"
    assert rows[1]["status"].startswith("failed (its agent is gone: that process has exited")
    # the journal is whole: Optuna itself reads one trial per slot, in the states above
    study = search.open_study(out, sw.load_sweep(out / "sweep.yaml", compose=False))
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert sorted(study.trials[0].intermediate_values) == [1, 2, 3]  # each validation reported once
    # slot 1 started again later (the same sweep run again): its point, its folder, on from its checkpoint
    again = subprocess.run([sys.executable, "-m", "pipeline", "sweep", "trial", str(out), "1"], cwd=ROOT,
                           capture_output=True, text=True)
    assert again.returncode == 0 and "trial 1 (resumed)" in again.stdout and "resuming from" in again.stdout, \
        again.stdout[-3000:]
    assert read_rows(out)[1]["status"] == "done"
    study = search.open_study(out, sw.load_sweep(out / "sweep.yaml", compose=False))
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert study.trials[3].user_attrs["params"] == study.trials[1].user_attrs["params"]


def test_a_fit_ended_by_the_stop_signal_is_left_to_be_resumed(tmp_path):
    """Slurm's SIGTERM at a requeue reaches the agent and the fit together and can land while the
    checkpointed fit is still exiting: the fit dies of it (-15). That trial was stopped, not failed:
    its requeued task resumes it (a Slurm run of test_slurm.py ended it `failed (exited -15)` and
    the requeued task then refused to run it). A death without a stop signal still fails."""
    values = list(range(2, 9))
    sweep = write_sweep(tmp_path, method="grid", parameters={"model.latent_dim": {"values": values}})
    study = search.open_study(tmp_path, sweep, 0, 0, len(values))
    started = [search.start_trial(search.open_study(tmp_path, sweep, 0, slot, len(values)), slot, sweep,
                                  fixed={"model.latent_dim": v})[0] for slot, v in enumerate(values)]
    preempted = {"preempted_at": 40, "metrics": {"val/loss": 1.0}}
    term = signal.SIGTERM
    ends = [(preempted, -term, False), (preempted, 128 + term, False),  # SIGTERM as Popen / as srun report it
            ({}, -term, True), (preempted, 75, False),  # killed while its agent forwarded; EXIT_PREEMPTED
            ({}, -term, False), ({}, 75, False), ({}, 1, False)]  # no preemption, no stop signal: failed
    got = [search.finish_trial(study, n, summary, code, "val/loss", forwarded=fwd)
           for n, (summary, code, fwd) in zip(started, ends)]
    # 75 without a preemption's summary: a write failure's exit (EXIT_RETRYABLE), failed, not resumed forever
    assert got == ["stopped"] * 4 + ["exited -15", "exited 75", "exited 1"]
    states = [t.state.name for t in search.open_study(tmp_path, sweep).trials]
    assert states == ["RUNNING"] * 4 + ["FAIL"] * 3  # a RUNNING slot is resumed by its next agent
    # (test_a_crashed_agent_leaves_the_study_consistent; the requeue: tests/test_slurm.py)


def test_the_agent_passes_a_stop_signal_on_and_says_so():
    """The agent's own SIGTERM (Slurm signals every process of the job) reaches the fit, and the
    agent knows it passed one on; a child that ends by itself was passed nothing."""
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    give_up = threading.Event()
    before = signal.getsignal(signal.SIGTERM)  # the default, or a fit's own handler from an earlier test

    def terminate_the_agent():  # once its handler is in (before it, SIGTERM would go to `before`)
        while signal.getsignal(signal.SIGTERM) is before:
            if give_up.wait(0.05):
                return
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    sender = threading.Thread(target=terminate_the_agent)
    sender.start()
    try:
        started = time.time()
        assert sw._run_forwarding_signals(sleeper, dict(os.environ)) == (-signal.SIGTERM, True)
        assert time.time() - started < 30
    finally:
        give_up.set()
        sender.join()
    assert signal.getsignal(signal.SIGTERM) is before  # this process's own handler is back
    assert sw._run_forwarding_signals([sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ)) == (3, False)


def test_a_planted_journal_link_is_refused(tmp_path):
    sweep = write_sweep(tmp_path, method="grid", parameters={"model.latent_dim": {"values": [2]}})
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    (tmp_path / search.JOURNAL).symlink_to(victim)
    with pytest.raises(ConfigError, match="link or not a regular file"):
        search.open_study(tmp_path, sweep)
    assert victim.read_text() == "keep"
