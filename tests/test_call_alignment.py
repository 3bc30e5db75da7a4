"""Calls of K optimizer steps stay on the step cadence the user set (periodic checkpoints and
validation every N steps, the logger's step axis) also after a run stopped inside a call
(max_steps) or resumed with another trainer.steps_per_call: the same steps as an uninterrupted run."""

import csv

import pytest
import torch

from pipeline.checkpoints import load_checkpoint
from tests.conftest import FAST, vaepipe

# 640 samples, batch 32: 20 steps an epoch; 40 steps cross one epoch boundary.
RUN = ["model.arch=mlp", "model.hidden=[16]", "model.latent_dim=4", "model.eval_k=0", "data.batch_size=32",
       "trainer.max_epochs=-1", "logger.image_every_n_epochs=0", "run.test=false", "run.keep_last=100",
       "trainer.log_every_n_steps=5", "logger.backend=csv", *FAST]


def val_steps(run_dir):
    rows = [r for p in run_dir.glob("logs/*/metrics.csv") for r in csv.DictReader(open(p))]
    return sorted({int(r["step"]) for r in rows if r.get("val/loss")})


def periodic(run_dir):
    return sorted(int(p.stem.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*.ckpt"))


@pytest.mark.parametrize("stop, k_before, k_after, every", [(12, 5, 5, 5), (15, 5, 10, 10)],
                         ids=["stopped-inside-a-call", "another-k"])
def test_a_resumed_run_keeps_the_step_cadence(sprites_root, tmp_path, stop, k_before, k_after, every):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    common = [f"data.root={sprites_root}", *RUN, "trainer.val_check_interval=10", f"run.every_n_train_steps={every}"]
    vaepipe("fit", *common, f"run.dir={whole}", "trainer.max_steps=40", f"trainer.steps_per_call={k_after}")
    vaepipe("fit", *common, f"run.dir={parts}", f"trainer.max_steps={stop}", f"trainer.steps_per_call={k_before}")
    vaepipe("fit", *common, f"run.dir={parts}", "trainer.max_steps=40", f"trainer.steps_per_call={k_after}")
    assert periodic(whole) == list(range(every, 41, every))
    assert periodic(parts) == periodic(whole)
    # validation after steps 10, 20, 30, 40 (logged at step - 1, Lightning's axis), plus the one
    # that ends the first part at max_steps
    assert val_steps(whole) == [9, 19, 29, 39]
    assert val_steps(parts) == sorted([*val_steps(whole), stop - 1])
    a, b = (load_checkpoint(d / "checkpoints/last.ckpt")["state_dict"] for d in (whole, parts))
    assert all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("interval, per_epoch, want", [(30, "null", [29, 59]), (0.5, 1, [9, 19, 29, 39, 49, 59])],
                         ids=["steps-across-epochs", "fraction-of-an-epoch"])
def test_validation_every_n_steps_across_epochs(sprites_root, tmp_path, interval, per_epoch, want):
    # 20 steps an epoch and 16 steps per call asked for: K must divide the epoch's steps too, or
    # Lightning's count of calls drifts from the steps at every epoch's short last call.
    run_dir = tmp_path / "run"
    proc = vaepipe("fit", f"data.root={sprites_root}", *RUN, f"run.dir={run_dir}", "trainer.max_steps=60",
                   "trainer.steps_per_call=16", f"trainer.val_check_interval={interval}",
                   f"trainer.check_val_every_n_epoch={per_epoch}")
    assert "steps per call: 10" in proc.stdout + proc.stderr
    assert val_steps(run_dir) == want
