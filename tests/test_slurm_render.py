"""The sbatch scripts `vaepipe submit` and `vaepipe sweep ... --slurm` render (no cluster needed):
Slurm's time formats, the signal grace against the time limit, a site's own template with shell
variables, and the job's size reaching every sweep trial."""

import shutil

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.launch.slurm import render, slurm_seconds
from tests.conftest import vaepipe


@pytest.mark.parametrize("text,seconds", [
    ("120", 7200), ("5", 300), ("1:30", 90), ("04:00:00", 14400), ("100:00:00", 360000),
    ("2-12", 216000), ("1-0:30", 88200), ("1-02:03:04", 93784)])
def test_slurm_time_formats(text, seconds):
    # sbatch(1): "minutes", "minutes:seconds", "hours:minutes:seconds", "days-hours",
    # "days-hours:minutes", "days-hours:minutes:seconds"
    assert slurm_seconds(text) == seconds


@pytest.mark.parametrize("text", ["", "1:2:3:4", "$(reboot)", "4h", "1-", "-1", "1:30:"])
def test_not_a_slurm_time(text):
    with pytest.raises(ConfigError, match="is not a Slurm time"):
        slurm_seconds(text)


def test_minutes_above_99_are_accepted_by_submit(tmp_path):
    out = vaepipe("submit", "--dry-run", f"run.dir={tmp_path / 'r'}", "--time", "120").stdout
    assert "#SBATCH --time=120\n" in out


@pytest.mark.parametrize("args", [["--time", "2"], ["--time", "2:00", "slurm.signal_grace_s=120"],
                                  ["slurm.signal_grace_s=0"]])
def test_signal_grace_must_fit_in_the_time_limit(tmp_path, args):
    # --time 2 (minutes) with the default 120 s grace: the job would be told to stop as it starts
    proc = vaepipe("submit", "--dry-run", f"run.dir={tmp_path / 'r'}", *args, check=False)
    assert proc.returncode == 2 and "slurm.signal_grace_s=" in proc.stderr and "shorter than --time" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_site_template_keeps_shell_variables(tmp_path):
    template = tmp_path / "site.sbatch"
    template.write_text("#!/bin/bash\n#SBATCH --time=${time}\nsource $HOME/venv/bin/activate\n"
                        "echo ${SLURM_JOB_ID} $$PWD\nsrun ${python} -m pipeline fit -c ${config}\n")
    cfg = load_config([], [f"run.dir={tmp_path / 'run'}", f"slurm.template={template}"])
    text = render(cfg, config_path=tmp_path / "run" / "config.yaml")
    assert "#SBATCH --time=04:00:00\n" in text and "source $HOME/venv/bin/activate\n" in text
    assert "echo ${SLURM_JOB_ID} $PWD\n" in text and f"-c {tmp_path / 'run' / 'config.yaml'}" in text


def test_sweep_trials_get_the_jobs_size_from_a_site_config(tmp_path):
    # devices and requeue only in -c site.yaml: every trial's `vaepipe fit` must get them too, or
    # Lightning refuses a 2-task job whose trial asks for 1 device
    site = tmp_path / "site.yaml"
    site.write_text("trainer: {devices: 2}\nslurm: {requeue: false, cpus_per_task: 1}\n")
    spec = tmp_path / "beta.yaml"
    spec.write_text("method: grid\nmetric: {name: val/loss, goal: minimize}\n"
                    "parameters: {model.beta: {values: [1.0, 4.0]}}\n"
                    "command: ['${env}', vaepipe, fit, '${args_no_hyphens}']\n")
    out = vaepipe("sweep", "local", str(spec), "--out", str(tmp_path / "sweep"), "--slurm", "--dry-run",
                  "-c", str(site)).stdout
    assert "#SBATCH --ntasks-per-node=2" in out
    assert "export VAEPIPE_TRIAL_OVERRIDES='trainer.devices=2 trainer.num_nodes=1 slurm.requeue=false'" in out


def test_fit_applies_the_trial_overrides(sprites_root, tmp_path):
    run = tmp_path / "run"
    vaepipe("fit", f"data.root={sprites_root}", f"run.dir={run}", "model.arch=mlp", "model.hidden=[16]",
            "model.latent_dim=2", "trainer.max_steps=5", "trainer.max_epochs=-1", "logger.backend=none",
            "model.eval_k=0", "run.test=false", "trainer.enable_progress_bar=false", "trainer.steps_per_call=1",
            env={"VAEPIPE_TRIAL_OVERRIDES": "trainer.max_steps=3 slurm.requeue=false"})
    written = (run / "config.yaml").read_text()
    assert "max_steps: 3\n" in written and "requeue: false\n" in written


def test_requeue_gives_up_when_scontrol_is_missing_or_hangs(tmp_path, monkeypatch, capsys):
    # A stopped run under Slurm requeues its job; without a reachable controller it must still exit.
    from pipeline.launch import slurm

    sleep = shutil.which("sleep")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol
    assert slurm.requeue_self() is False and "requeue of job 42 failed (FileNotFoundError" in capsys.readouterr().out
    (tmp_path / "scontrol").write_text(f"#!/bin/sh\nexec {sleep} 30\n")
    (tmp_path / "scontrol").chmod(0o755)
    monkeypatch.setattr(slurm, "REQUEUE_TIMEOUT_S", 1)
    assert slurm.requeue_self() is False and "TimeoutExpired" in capsys.readouterr().out
