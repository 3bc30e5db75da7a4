"""A run that ends between validations validates once more on the way out (max_steps before the
first validation: the sweep's metric, the best checkpoint and summary.json have a value); never
twice, and never after a stop signal (that path must stay fast)."""

import csv
import json
import os

from pipeline.launch import sweep as sw
from tests.conftest import FAST, vaepipe

# sprites: 640 samples, batch 32: 20 steps an epoch
RUN = ["model.arch=mlp", "model.hidden=[32]", "model.latent_dim=4", "model.eval_k=0", "data.batch_size=32",
       "trainer.max_epochs=-1", "logger.image_every_n_epochs=0", "run.test=false", "trainer.log_every_n_steps=2",
       *FAST]


def val_steps(run_dir):
    rows = [r for p in run_dir.glob("logs/*/metrics.csv") for r in csv.DictReader(open(p))]
    return [int(r["step"]) for r in rows if r.get("val/loss")]


def test_max_steps_before_the_first_validation_still_validates(sprites_root, tmp_path):
    run_dir = tmp_path / "run"
    vaepipe("fit", f"data.root={sprites_root}", f"run.dir={run_dir}", "trainer.max_steps=12", *RUN)
    assert len(val_steps(run_dir)) == 1  # once, at the end
    assert list((run_dir / "checkpoints").glob("best-*.ckpt"))
    assert json.loads((run_dir / "summary.json").read_text())["metrics"]["val/loss"] > 0


def test_final_validation_also_off_the_validation_epochs(sprites_root, tmp_path):
    run_dir = tmp_path / "run"  # validation every 5 epochs; training ends in the first
    vaepipe("fit", f"data.root={sprites_root}", f"run.dir={run_dir}", "trainer.max_steps=12",
            "trainer.check_val_every_n_epoch=5", *RUN)
    assert len(val_steps(run_dir)) == 1


def test_no_second_validation_when_one_just_ran(sprites_root, tmp_path):
    run_dir = tmp_path / "run"
    vaepipe("fit", f"data.root={sprites_root}", f"run.dir={run_dir}", "trainer.max_steps=12",
            "trainer.val_check_interval=6", *RUN)
    assert len(val_steps(run_dir)) == 2  # at steps 6 and 12, not a third time at the end
    run2 = tmp_path / "epochs"
    vaepipe("fit", f"data.root={sprites_root}", f"run.dir={run2}", *RUN, "trainer.max_epochs=1")
    assert len(val_steps(run2)) == 1  # the epoch-end validation is the last one


def test_a_signal_stopped_run_does_not_validate(sprites_root, tmp_path):
    run_dir = tmp_path / "run"
    proc = vaepipe("fit", f"data.root={sprites_root}", f"run.dir={run_dir}", "trainer.max_steps=16",
                   "trainer.steps_per_call=4", *RUN, check=False, env={"VAEPIPE_FAULT": "8:TERM"})
    assert proc.returncode == 75
    assert val_steps(run_dir) == []


def test_a_run_with_nothing_left_to_train_keeps_its_summary(sprites_root, tmp_path):
    # The same command again after a finished run (or a requeue): the summary keeps the run's
    # metrics (validated again: the same weights and noise), best checkpoint and pictures (it was
    # rewritten with none of them)
    run_dir = tmp_path / "run"
    args = ["fit", f"data.root={sprites_root}", f"run.dir={run_dir}", "trainer.max_steps=12", *RUN,
            "logger.image_every_n_epochs=1"]
    vaepipe(*args)
    first = json.loads((run_dir / "summary.json").read_text())
    vaepipe(*args)
    again = json.loads((run_dir / "summary.json").read_text())
    assert first["metrics"]["val/loss"] > 0 and again["metrics"]["val/loss"] == first["metrics"]["val/loss"]
    assert again["best_checkpoint"] == first["best_checkpoint"] != "" and again["images"] != []
    # a stop signal that lands on the last step skips the final validation; the next start does it
    stopped = tmp_path / "stopped"
    proc = vaepipe("fit", f"data.root={sprites_root}", f"run.dir={stopped}", "trainer.max_steps=8",
                   "trainer.steps_per_call=4", *RUN, check=False, env={"VAEPIPE_FAULT": "8:TERM"})
    assert proc.returncode == 75 and val_steps(stopped) == []
    vaepipe("fit", f"data.root={sprites_root}", f"run.dir={stopped}", "trainer.max_steps=8",
            "trainer.steps_per_call=4", *RUN)
    assert json.loads((stopped / "summary.json").read_text())["metrics"]["val/loss"] > 0


def test_sweep_table_says_why_a_metric_is_missing(tmp_path):
    trials = []
    for i, metrics in enumerate([{"val/loss": 3.0}, {"train/loss": 1.0}, {"val/loss": 2.0}]):
        run_dir = tmp_path / f"t{i}"
        run_dir.mkdir()
        (run_dir / "summary.json").write_text(json.dumps({"metrics": metrics, "preempted_at": None}))
        trials.append({"index": i, "params": {"model.beta": i}, "run_dir": str(run_dir), "command": ["vaepipe", "fit"]})
    (tmp_path / "trials.json").write_text(json.dumps({"sweep": "s", "metric": {"name": "val/loss"}, "trials": trials}))
    rows = sw.results(tmp_path)
    assert [r["trial"] for r in rows] == [2, 0, 1]  # best first, the one without a value last
    assert rows[-1]["status"] == "metric val/loss never logged" and rows[0]["status"] == "done"


def test_a_preempted_slurm_run_requeues_as_its_very_last_act(sprites_root, tmp_path):
    """Under Slurm (SLURM_JOB_ID) rank 0 requeues a preempted job only after summary.json, wandb's
    finish and the run folder's lock are done with: the requeue makes Slurm SIGTERM every process
    of the job at once (a sweep trial died of it while still exiting). Also when the summary cannot
    be written: the checkpoint is there, so the job still goes back in the queue. `scontrol` here is
    a script on PATH that records what the run folder held when it was called (the real requeue:
    tests/test_slurm.py)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    seen = tmp_path / "seen.txt"
    (bin_dir / "scontrol").write_text(
        f'#!/bin/sh\necho "$@ | summary: $(test -f "$RUN/summary.json" && echo yes || echo no)'
        f' | lock: $(test -e "$RUN/.vaepipe-run.lock" && echo held || echo free)" >> {seen}\n')
    (bin_dir / "scontrol").chmod(0o755)
    for case in ("plain", "summary unwritable"):
        run_dir = tmp_path / case.replace(" ", "_")
        if case != "plain":
            (run_dir / "summary.json").mkdir(parents=True)  # a folder in its place: the summary's write fails
        proc = vaepipe("fit", f"data.root={sprites_root}", f"run.dir={run_dir}", "trainer.max_steps=16",
                       "trainer.steps_per_call=4", *RUN, check=False,
                       env={"VAEPIPE_FAULT": "8:USR1", "SLURM_JOB_ID": "4242", "SLURM_ARRAY_JOB_ID": None,
                            "RUN": str(run_dir), "PATH": f"{bin_dir}:{os.environ['PATH']}"})
        # 75: stopped, run the same command to resume; a summary in a folder's place is an error (2)
        assert proc.returncode == (75 if case == "plain" else 2), proc.stdout[-2000:] + proc.stderr[-2000:]
        assert (run_dir / "checkpoints" / "last.ckpt").is_file()
        assert "SIGUSR1: checkpoint of step 8" in proc.stderr and "requeue of job 4242: done" in proc.stdout
        if case == "plain":  # the run's report first (the same stream), the requeue last
            assert proc.stdout.index("requeue of job 4242: done") > proc.stdout.index("stopped by signal at step 8")
        else:
            assert "Is a directory" in proc.stderr and "summary.json" in proc.stderr, proc.stderr[-2000:]
    assert seen.read_text().splitlines() == ["requeue 4242 | summary: yes | lock: free",
                                             "requeue 4242 | summary: no | lock: free"]
