"""Sweeps: every ready sweep YAML validates and its agent-built command (wandb's own macro code)
trains; `vaepipe sweep local` runs a 3-trial grid end to end and writes the results table; bad
sweeps and server-only requests fail clearly. Slurm arrays of trials: tests/test_slurm.py."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError
from pipeline.launch import sweep as sw
from tests.conftest import ROOT, vaepipe

SWEEPS = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))
TINY = {"data.name": "sprites", "model.arch": "mlp", "model.hidden": "[32]", "model.eval_k": "3",
        "trainer.max_steps": "4", "trainer.max_epochs": "-1", "trainer.enable_progress_bar": "false",
        "data.num_workers": "0", "logger.backend": "csv", "logger.image_every_n_epochs": "0", "run.test": "false",
        "trainer.accelerator": "cpu", "model.beta_warmup_steps": "0"}


def test_there_are_ready_sweeps():
    names = {p.stem for p in SWEEPS}
    assert {"beta_vae_sprites_beta", "iwae_mnist_k_lr", "vae_sprites_latent"} <= names


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_sweep_yaml_validates_and_its_agent_command_trains(path, sprites_root, tmp_path):
    spec = sw.load_sweep(path)
    if spec["method"] == "bayes":  # its points come from the study as each trial starts
        assert sw.draw(spec, 2) == [None, None]
        params = sw.first_values(spec["parameters"])
    else:
        params = sw.draw(spec, 1, seed=3)[0]
    command = sw.agent_command(spec, params)
    assert command[:3] == ["/usr/bin/env", "vaepipe", "fit"]
    for name, value in params.items():  # dotted names, as dotlist overrides
        assert f"{name}={value}" in command
    # Small and on sprites, whatever the sweep's data; keys the sweep sets are left to it.
    extra = [f"{k}={v}" for k, v in {**TINY, "data.root": sprites_root, "run.dir": tmp_path / "run"}.items()
             if k not in params]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(command + extra, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["global_step"] == 4
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    for name, value in params.items():
        group, key = name.split(".")
        assert resolved[group][key] == value  # the sampled value reached the trial's config


def write_sweep(path: Path, body: dict) -> Path:
    base = {"method": "grid", "metric": {"name": "val/loss", "goal": "minimize"},
            "command": ["${env}", "vaepipe", "fit", "${args_no_hyphens}"]}
    path.write_text(yaml.safe_dump({**base, **body}))
    return path


def test_local_grid_sweep_end_to_end(sprites_root, tmp_path):
    spec = write_sweep(tmp_path / "latent.yaml", {"parameters": {"model.latent_dim": {"values": [2, 3, 4]}}})
    out = tmp_path / "sweep"
    # 8 steps, fewer than an epoch (10): the metric comes from the validation fit runs at the end
    small = {**TINY, "trainer.max_steps": "8"}
    proc = vaepipe("sweep", "local", spec, "--out", out, f"data.root={sprites_root}",
                   *[f"{k}={v}" for k, v in small.items()])
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert sorted(int(r["model.latent_dim"]) for r in rows) == [2, 3, 4]
    assert all(r["status"] == "done" and math.isfinite(float(r["val/loss"])) for r in rows)
    losses = [float(r["val/loss"]) for r in rows]
    assert losses == sorted(losses)  # best (lowest) first
    for r in rows:  # each trial trained with its own value, in its own folder
        cfg = yaml.safe_load((Path(r["run_dir"]) / "config.yaml").read_text())
        assert cfg["model"]["latent_dim"] == int(r["model.latent_dim"]) and cfg["logger"]["group"] == "latent"
    assert "model.latent_dim" in proc.stdout and "results.csv" in proc.stdout
    assert (out / "results.md").read_text().count("| done |") == 3


def test_random_draws_follow_their_distributions():
    spec = {"method": "random", "parameters": {
        "optim.lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2},
        "model.latent_dim": {"min": 2, "max": 5}, "model.k": {"values": [1, 5]}, "model.beta": {"value": 2.0}}}
    draws = sw.draw(spec, 400, seed=1)
    lrs = [d["optim.lr"] for d in draws]
    assert all(1e-4 <= v <= 1e-2 for v in lrs)
    # log-uniform: about half the draws below the geometric midpoint 1e-3 (binomial sd 10 of 400)
    assert abs(sum(v < 1e-3 for v in lrs) - 200) < 40
    assert {d["model.latent_dim"] for d in draws} == {2, 3, 4, 5} and {d["model.k"] for d in draws} == {1, 5}
    assert {d["model.beta"] for d in draws} == {2.0}
    assert sw.draw(spec, 5, seed=1) == draws[:5]  # seeded


def test_bad_sweeps_fail_clearly(tmp_path):
    bad_key = write_sweep(tmp_path / "a.yaml", {"parameters": {"model.betta": {"values": [1, 2]}}})
    with pytest.raises(ConfigError, match=r"a\.yaml.*model\.betta"):
        sw.load_sweep(bad_key)
    grid_dist = write_sweep(tmp_path / "b.yaml", {"parameters": {"optim.lr": {"min": 0.001, "max": 0.01}}})
    with pytest.raises(ConfigError, match="grid sweep needs 'values'"):
        sw.load_sweep(grid_dist)
    no_macro = write_sweep(tmp_path / "c.yaml", {"parameters": {"model.beta": {"values": [1]}},
                                                 "command": ["vaepipe", "fit", "${args}"]})
    with pytest.raises(ConfigError, match="args_no_hyphens"):
        sw.load_sweep(no_macro)
    # bayes models a bounded range: a normal distribution has none (random draws from it)
    normal = write_sweep(tmp_path / "d.yaml", {"method": "bayes", "parameters": {
        "model.beta": {"distribution": "normal", "mu": 1.0, "sigma": 0.5}}})
    proc = vaepipe("sweep", "local", normal, "--out", tmp_path / "s", check=False)
    assert proc.returncode == 2 and "d.yaml" in proc.stderr and "model.beta" in proc.stderr \
        and "normal" in proc.stderr and not (tmp_path / "s").exists(), proc.stderr
    sw.load_sweep(write_sweep(tmp_path / "e.yaml", {"method": "random", "parameters": {
        "model.beta": {"distribution": "normal", "mu": 1.0, "sigma": 0.5}}}))


def test_create_without_a_server_says_what_to_do(tmp_path):
    env = {**{k: None for k in os.environ if k.startswith("WANDB_")}, "HOME": str(tmp_path)}
    proc = vaepipe("sweep", "create", ROOT / "configs/sweeps/vae_sprites_latent.yaml", check=False, env=env)
    assert proc.returncode == 2
    assert "needs the wandb server" in proc.stderr and "vaepipe sweep local" in proc.stderr


def test_submit_renders_an_array_of_agents(tmp_path):
    proc = vaepipe("sweep", "submit", "me/vaepipe/abc123", "--trials", "12", "--parallel", "3", "--dry-run",
                   "trainer.devices=2", "slurm.gpus_per_node=2", "--time", "02:00:00", cwd=tmp_path)
    text = proc.stdout
    assert "#SBATCH --array=0-11%3" in text and "#SBATCH --ntasks-per-node=2" in text
    assert "#SBATCH --signal=B:USR1@120" in text and "#SBATCH --time=02:00:00" in text
    assert "exec " in text and "-m wandb agent --forward-signals --count 1 me/vaepipe/abc123" in text
    assert 'export VAEPIPE_TRIAL_SRUN="srun --kill-on-bad-exit=1"' in text  # 2 tasks: fit runs under srun
    assert "export SRUN_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK}" in text
    assert "slurm-%A_%a.out" in text and "${" not in text.replace("${SLURM", "")


def test_each_agent_trial_gets_its_own_run_folder(monkeypatch):
    from pipeline.config import load_config

    monkeypatch.setenv("WANDB_SWEEP_ID", "sw1")
    monkeypatch.setenv("WANDB_RUN_ID", "abc123")
    cfg = load_config([ROOT / "configs/iwae_mnist.yaml"], ["model.k=50"])
    assert cfg.run.name == "iwae_mnist_k50-abc123" and cfg.run.dir == "runs/iwae_mnist_k50-abc123"
    assert load_config([], ["run.dir=/scratch/x"]).run.dir == "/scratch/x/abc123"  # explicit folders too
    # an interpolated folder that does not use run.name: trials must not share it either
    assert load_config([], ["run.dir=/scratch/${data.name}"]).run.dir == "/scratch/sprites/abc123"
    assert load_config([], ["run.dir=/scratch/${run.name}/out"]).run.dir == "/scratch/vae_sprites-abc123/out"
    monkeypatch.delenv("WANDB_SWEEP_ID")
    assert load_config([], []).run.dir == "runs/vae_sprites"  # outside a sweep: unchanged
