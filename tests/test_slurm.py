"""Jobs through a real Slurm cluster on localhost (tests/slurm_cluster.py), with the scripts that
`vaepipe submit` renders from the real template: multi-task and multi-node training, a time limit
that signals, checkpoints, requeues and finishes with the uninterrupted run's weights, and
requests that do not fit the trainer refused before submission."""

import os
import re
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import ROOT
from tests.slurm_cluster import SlurmCluster, explain, missing
from pipeline.checkpoints import load_checkpoint

pytestmark = pytest.mark.skipif(missing() is not None, reason=str(missing()))

COMMON = ["slurm.cpus_per_task=1", "slurm.env.MASTER_ADDR=127.0.0.1", "trainer.enable_progress_bar=false",
          "logger.backend=csv", "logger.image_every_n_epochs=0", "data.batch_size=32", "model.eval_k=0",
          "trainer.max_epochs=-1", "trainer.accelerator=cpu"]
SMALL = ["model.arch=mlp", "model.hidden=[32]", "model.latent_dim=4", "data.num_workers=1"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield c
    c.stop()


def submit(cluster, *args, check=True):
    proc = subprocess.run([sys.executable, "-m", "pipeline", "submit", *map(str, args)], cwd=ROOT, text=True,
                          capture_output=True, env=cluster.env)
    if check:
        assert proc.returncode == 0, proc.stderr[-2000:]
        return re.search(r"submitted job (\d+)", proc.stdout).group(1)
    return proc


def final(run_dir):
    return load_checkpoint(run_dir / "checkpoints/last.ckpt")


@pytest.mark.parametrize("nodes,tasks", [(1, 2), (2, 1)], ids=["1node-2tasks", "2nodes-1task"])
def test_multi_process_jobs_train_and_finish(cluster, sprites_root, tmp_path, nodes, tasks):
    run_dir = tmp_path / "run"
    job = submit(cluster, f"data.root={sprites_root}", f"run.dir={run_dir}", "trainer.max_steps=12",
                 f"trainer.num_nodes={nodes}", f"trainer.devices={tasks}", "--nodes", nodes, *COMMON, *SMALL)
    info = cluster.wait(job, timeout=240)
    log = (run_dir / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", explain(cluster, job, log)
    assert f"{nodes * tasks} task(s)" in log and (nodes == 1 or "n[1-2]" in log)
    ckpt = final(run_dir)
    assert ckpt["global_step"] == 12
    assert [p["world_size"] for p in ckpt["ShardDataModule"]["stream_positions"]] == [nodes * tasks] * (nodes * tasks)
    assert (run_dir / "job.sbatch").read_text().count("#SBATCH --ntasks-per-node=" + str(tasks)) == 1


@pytest.mark.timeout(1200)  # ~3 min alone; a loaded machine slows each restart
def test_time_limit_signal_checkpoint_requeue_and_finish(cluster, sprites_root, tmp_path):
    # --time 3 min with the signal 100 s before the end: Slurm's periodic check delivers it up to
    # 60 s early, so 20-80 s after the start, while the ~2 min of steps (2000 conv steps on 2
    # cores) are running. The job saves and requeues itself; the test then lengthens the requeued
    # job's limit (no second signal: each cycle would only repeat what the first showed) and
    # releases it at once instead of letting Slurm hold it ~120 s. That a resumed run's weights are
    # the uninterrupted run's is checked by test_scancel_signals_and_plain_restart (same handler,
    # same requeue) on a cheaper model.
    run_dir = tmp_path / "run"
    job = submit(cluster, f"data.root={sprites_root}", f"run.dir={run_dir}", "trainer.max_steps=2000",
                 "slurm.signal_grace_s=100", "model.latent_dim=4", "data.num_workers=0", "--time", "00:03:00",
                 *COMMON)
    deadline = time.time() + 300
    while time.time() < deadline:
        info = cluster.job(job)
        if int(info.get("Restarts", 0)) >= 1 or info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
            break
        time.sleep(0.5)
    cluster.run("scontrol", "update", f"JobId={job}", "TimeLimit=00:15:00", check=False)
    info = cluster.wait(job, timeout=600)
    log = (run_dir / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", explain(cluster, job, log)
    assert int(info["Restarts"]) >= 1 and "SIGUSR1: checkpoint of step" in log and f"requeue of job {job}: done" in log
    step = int(re.search(r"SIGUSR1: checkpoint of step (\d+)", log).group(1))
    assert 0 < step < 2000
    assert "resuming from" in log and f"checkpoint of step {step}" in log
    assert final(run_dir)["global_step"] == 2000


def test_a_requeued_job_is_released_at_the_first_safe_second(cluster, tmp_path):
    # Issue 30's cause, without the training: a job that requeues itself and ends at once, released
    # by a harness polling every 20 ms. Released with StartTime=now in the second of its requeue,
    # such a job ended FAILED 1:0 without running again (3 of 42 here); released at the first safe
    # second (SlurmCluster.release_requeued) every one runs again and completes.
    script = tmp_path / "requeue_self.sh"
    for i in range(10):
        out = tmp_path / f"job{i}.out"
        script.write_text("#!/bin/bash\n#SBATCH --requeue\n#SBATCH --open-mode=append\n"
                          f"#SBATCH --output={out}\n"
                          'echo "start ${SLURM_RESTART_COUNT:-0}"\n'
                          'if [ "${SLURM_RESTART_COUNT:-0}" = 0 ]; then scontrol requeue $SLURM_JOB_ID; exit 75; fi\n'
                          "echo finished\n")
        job = cluster.run("sbatch", "--parsable", str(script)).stdout.strip()
        info = cluster.wait(job, timeout=60, poll=0.02)
        text = out.read_text()
        assert info["JobState"] == "COMPLETED" and "start 1" in text and "finished" in text, explain(cluster, job, text)


@pytest.mark.timeout(1200)
def test_scancel_signals_and_plain_restart(cluster, sprites_root, tmp_path):
    # `scancel --signal=USR1` (a user or a script asking for a checkpoint) and SIGTERM (preemption)
    # reach every task: each time the job saves, requeues and continues; a later plain
    # `vaepipe fit` of the same config by hand then finds the run already complete.
    run_dir = tmp_path / "run"
    job = submit(cluster, f"data.root={sprites_root}", f"run.dir={run_dir}", "trainer.max_steps=1500",
                 "run.every_n_train_steps=20", *COMMON, *SMALL)
    for sig, restarts in (("USR1", 0), ("TERM", 1)):
        deadline = time.time() + 120
        while not (cluster.job(job).get("JobState") == "RUNNING" and int(cluster.job(job).get("Restarts", 0)) == restarts
                   and list((run_dir / "checkpoints").glob("step-*.ckpt"))) and time.time() < deadline:
            info = cluster.job(job)
            if info.get("JobState") == "PENDING" and int(info.get("Restarts", 0)) > 0:
                cluster.release_requeued(job, info)
            time.sleep(0.5)
        time.sleep(2)
        cluster.run("scancel", f"--signal={sig}", job)
        deadline = time.time() + 120
        while int(cluster.job(job).get("Restarts", 0)) == restarts and time.time() < deadline:
            time.sleep(0.5)
    info = cluster.wait(job, timeout=300)
    log = (run_dir / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED", explain(cluster, job, log)
    assert "SIGUSR1: checkpoint of step" in log and "SIGTERM: checkpoint of step" in log
    assert int(info["Restarts"]) == 2 and log.count("resuming from") == 2
    assert final(run_dir)["global_step"] == 1500
    # the same config, never interrupted, outside Slurm: the same weights after two signals and requeues
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, "-m", "pipeline", "fit", "-c", run_dir / "config.yaml", f"run.dir={ref}"],
                   cwd=ROOT, check=True, capture_output=True, env={k: v for k, v in os.environ.items()
                                                                    if not k.startswith("SLURM")})
    a, b = final(run_dir), final(ref)
    assert b["global_step"] == 1500
    for name, tensor in b["state_dict"].items():
        assert torch.equal(a["state_dict"][name], tensor), f"{name} differs after the requeues"
    by_hand = subprocess.run([sys.executable, "-m", "pipeline", "fit", "-c", run_dir / "config.yaml"], cwd=ROOT,
                             capture_output=True, text=True, check=True,
                             env={k: v for k, v in os.environ.items() if not k.startswith("SLURM")})
    assert "resuming from" in by_hand.stdout and final(run_dir)["global_step"] == 1500


def test_mis_sized_requests_are_refused_before_submission(cluster, tmp_path):
    jobs_before = cluster.run("squeue", "-h").stdout
    cases = [
        (["trainer.devices=2", "--gpus-per-node", "1"], "--gpus-per-node 1 but trainer.devices=2"),
        (["--nodes", "2"], "--nodes 2 but trainer.num_nodes=1"),
        (["--partition", "multi;touch /tmp/pwned"], "cannot go into an #SBATCH line"),
        (["--time", "$(reboot)"], "is not a Slurm time"),
    ]
    for args, message in cases:
        proc = submit(cluster, f"run.dir={tmp_path / 'run'}", *args, check=False)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert cluster.run("squeue", "-h").stdout == jobs_before  # nothing was submitted
    assert not (tmp_path / "run").exists()


def test_rendered_script_quotes_values(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pipeline", "submit", "--dry-run", f"run.dir={tmp_path / 'r x'}",
                          "slurm.env.NOTE=a b; rm -rf /", "--partition", "multi"], cwd=ROOT, text=True,
                         capture_output=True)
    assert out.returncode == 2 and "cannot go into an #SBATCH line" in out.stderr  # a space in the log path
    out = subprocess.run([sys.executable, "-m", "pipeline", "submit", "--dry-run", f"run.dir={tmp_path / 'r'}",
                          "slurm.env.NOTE=a b; rm -rf /", "--partition", "multi"], cwd=ROOT, text=True,
                         capture_output=True, check=True).stdout
    assert "export NOTE='a b; rm -rf /'" in out and "#SBATCH --partition=multi" in out
    assert "#SBATCH --signal=SIGUSR1@120" in out and "#SBATCH --requeue" in out and "srun " in out
    # the CPUs asked for reach srun's tasks (srun does not inherit sbatch's --cpus-per-task)
    assert out.index("export SRUN_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK}") < out.index("srun --kill-on-bad-exit")


def test_local_sweep_as_a_job_array_with_two_task_trials(cluster, sprites_root, tmp_path):
    # Each array task runs one trial; with trainer.devices=2 the trial's `vaepipe fit` relaunches
    # itself under srun (2 tasks, DDP), as a multi-GPU trial of a wandb sweep does.
    spec = tmp_path / "beta.yaml"
    spec.write_text("method: grid\nmetric: {name: val/loss, goal: minimize}\n"
                    "parameters: {model.beta: {values: [1.0, 4.0]}}\n"
                    "command: ['${env}', vaepipe, fit, '${args_no_hyphens}']\n")
    out = tmp_path / "sweep"
    # the job's size only in the site config: the trials must get it too (VAEPIPE_TRIAL_OVERRIDES)
    site = tmp_path / "site.yaml"
    site.write_text("trainer: {devices: 2}\n")
    args = [f"data.root={sprites_root}", "trainer.max_steps=8", "trainer.val_check_interval=4",
            "run.test=false", *COMMON, *SMALL]
    proc = subprocess.run([sys.executable, "-m", "pipeline", "sweep", "local", str(spec), "--out", str(out), "--slurm",
                           "-c", str(site), *args], cwd=ROOT, text=True, capture_output=True, env=cluster.env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    job = re.search(r"submitted job array (\d+)", proc.stdout).group(1)
    for task in (0, 1):
        info = cluster.wait(f"{job}_{task}", timeout=300)
        log = (out / f"slurm-{job}_{task}.out").read_text()
        assert info["JobState"] == "COMPLETED", explain(cluster, f"{job}_{task}", log)
    rows = subprocess.run([sys.executable, "-m", "pipeline", "sweep", "results", str(out)], cwd=ROOT, text=True,
                          capture_output=True, check=True).stdout
    assert rows.count(" done") == 2, rows
    for trial in ("trial-000", "trial-001"):
        ckpt = final(out / trial)
        assert ckpt["global_step"] == 8
        assert [p["world_size"] for p in ckpt["ShardDataModule"]["stream_positions"]] == [2, 2]  # srun: 2 ranks


@pytest.mark.timeout(1200)
def test_bayes_sweep_agents_share_one_study_and_a_requeued_trial_resumes(cluster, sprites_root, tmp_path):
    # `sweep local --slurm --parallel 2`: two array tasks at once, each an agent of the folder's one
    # study (journal file); bayes asks each point given the others, hyperband compares at
    # validations 2 and 4. Task 0 is signalled (USR1 to its batch shell, as Slurm's time limit does):
    # its fit checkpoints and requeues the task, which resumes the same trial and run folder, and
    # the trial's validations are reported once each.
    spec = tmp_path / "bayes.yaml"
    spec.write_text("method: bayes\nmetric: {name: val/loss, goal: minimize}\n"
                    "early_terminate: {type: hyperband, min_iter: 2, eta: 2}\n"
                    "parameters: {optim.lr: {distribution: log_uniform_values, min: 1.0e-4, max: 3.0e-3},"
                    " model.latent_dim: {min: 2, max: 6}}\n"
                    "command: ['${env}', vaepipe, fit, '${args_no_hyphens}']\n")
    out = tmp_path / "sweep"
    args = [f"data.root={sprites_root}", "trainer.max_steps=300", "trainer.val_check_interval=75",
            "trainer.check_val_every_n_epoch=null", "run.every_n_train_steps=10", "run.test=false", *COMMON,
            "data.batch_size=16", "data.num_workers=0", "model.eval_k=0"]
    proc = subprocess.run([sys.executable, "-m", "pipeline", "sweep", "local", str(spec), "--out", str(out), "--trials",
                           "3", "--slurm", "--parallel", "2", *args], cwd=ROOT, text=True, capture_output=True,
                          env=cluster.env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    job = re.search(r"submitted job array (\d+)", proc.stdout).group(1)
    deadline = time.time() + 180
    while not list((out / "trial-000" / "checkpoints").glob("step-*.ckpt")) and time.time() < deadline:
        time.sleep(0.3)
    cluster.run("scancel", "--batch", "--signal=USR1", f"{job}_0")
    for task in (0, 1, 2):
        info = cluster.wait(f"{job}_{task}", timeout=600)
        log = (out / f"slurm-{job}_{task}.out").read_text()
        assert info["JobState"] == "COMPLETED", explain(cluster, f"{job}_{task}", log)
    log0 = (out / f"slurm-{job}_0.out").read_text()
    assert "SIGUSR1: checkpoint of step" in log0 and f"requeue of job {job}_0: done" in log0, \
        explain(cluster, f"{job}_0", log0)
    assert "trial 0 (resumed)" in log0 and "resuming from" in log0, explain(cluster, f"{job}_0", log0)

    from pipeline.launch import search
    from pipeline.launch import sweep as sw

    study = search.open_study(out, sw.load_sweep(out / "sweep.yaml", compose=False))
    slots = search.slot_trials(study)
    assert len(study.trials) == 3 and sorted(slots) == [0, 1, 2]  # one trial per slot, the requeued one too
    for t in study.trials:
        assert t.state.name in ("COMPLETE", "PRUNED")
        reported = sorted(t.intermediate_values)
        assert reported == list(range(1, len(reported) + 1)) and reported, (t.number, reported)
        assert len(reported) == 4 if t.state.name == "COMPLETE" else len(reported) in (2, 4)
    # two agents at once: trials 0 and 1 overlapped in time, each asked with the other running
    a, b = slots[0], slots[1]
    assert a.datetime_start < b.datetime_complete and b.datetime_start < a.datetime_complete
    rows = sw.results(out)
    assert {r["status"] for r in rows} <= {"done", "pruned"} and (out / "results.png").is_file()


@pytest.mark.timeout(1200)
def test_two_node_job_signalled_continues_as_a_one_node_job(cluster, sprites_root, tmp_path):
    # Elastic resume through Slurm: a 2-node job (1 task each, 16 samples per task) is told to stop
    # (scancel --signal=USR1; no requeue), and the run is resubmitted as a 1-node, 1-task job: it
    # continues at the same global position with 32 samples per process and finishes.
    run_dir = tmp_path / "run"
    common = [f"data.root={sprites_root}", f"run.dir={run_dir}", "trainer.max_steps=600", "run.every_n_train_steps=20",
              *COMMON, *SMALL, "data.batch_size=16"]
    job = submit(cluster, *common, "trainer.num_nodes=2", "slurm.requeue=false", "--nodes", 2)
    deadline = time.time() + 180
    while not (cluster.job(job).get("JobState") == "RUNNING" and list((run_dir / "checkpoints").glob("step-*.ckpt"))) \
            and time.time() < deadline:
        time.sleep(0.5)
    cluster.run("scancel", "--signal=USR1", job)
    cluster.wait(job, timeout=240)
    log = (run_dir / f"slurm-{job}.out").read_text()
    assert "SIGUSR1: checkpoint of step" in log, explain(cluster, job, log)
    stopped = final(run_dir)
    assert 0 < stopped["global_step"] < 600
    assert [p["world_size"] for p in stopped["ShardDataModule"]["stream_positions"]] == [2, 2]
    job2 = submit(cluster, *common, "trainer.num_nodes=1", "--nodes", 1)
    info = cluster.wait(job2, timeout=300)
    log2 = (run_dir / f"slurm-{job2}.out").read_text()
    assert info["JobState"] == "COMPLETED", explain(cluster, job2, log2)
    assert "data.batch_size 16 -> 32 per process" in log2 and "world_size 2 -> 1" in log2
    done = final(run_dir)
    assert done["global_step"] == 600
    assert [p["world_size"] for p in done["ShardDataModule"]["stream_positions"]] == [1]


def test_a_run_folder_lock_of_a_job_slurm_ended_is_taken_over(cluster, tmp_path, monkeypatch):
    """A fit killed on another node (out of memory, past its kill wait) leaves its run-folder lock:
    Slurm's controller, asked, says the job ended, and the lock is taken over; a running job's is not."""
    import json

    from pipeline.errors import RunFolderBusy
    from pipeline.run_lock import LOCK_NAME, RunFolderLock, me

    monkeypatch.setenv("SLURM_CONF", cluster.env["SLURM_CONF"])
    ended = cluster.run("sbatch", "--parsable", "-o", "/dev/null", "--wrap", "true").stdout.strip()
    running = cluster.run("sbatch", "--parsable", "-o", "/dev/null", "--wrap", "sleep 300").stdout.strip()
    try:
        assert cluster.wait(ended, timeout=60)["JobState"] == "COMPLETED"
        holder = {**me("fit"), "host": "node17", "pid": 1}
        (tmp_path / LOCK_NAME).write_text(json.dumps({**holder, "slurm_job": running}))
        with pytest.raises(RunFolderBusy, match=f"Slurm job {running}"):
            RunFolderLock(tmp_path).acquire()
        (tmp_path / LOCK_NAME).write_text(json.dumps({**holder, "slurm_job": ended}))
        lines = []
        with RunFolderLock(tmp_path, log=lines.append):
            assert f"Slurm says job {ended} is no longer running" in lines[0]
    finally:
        cluster.run("scancel", running, check=False)
