"""A non-finite loss or gradient skips the step (counted, logged); too many in a row stop the run with
a clear message and the last good weights in last.ckpt."""

import csv

import torch

from tests.conftest import FAST, vaepipe
from pipeline.checkpoints import load_checkpoint


def fit(root, run_dir, fault, *extra):
    return vaepipe("fit", f"data.root={root}", f"run.dir={run_dir}", "trainer.max_steps=10", "trainer.max_epochs=-1",
                   "model.arch=mlp", "model.hidden=[16]", "model.latent_dim=2", "model.eval_k=0",
                   "trainer.log_every_n_steps=1", "logger.image_every_n_epochs=0", *FAST, *extra, check=False,
                   env={"VAEPIPE_FAULT": fault})


def logged(run_dir, key):
    rows = [r for p in run_dir.glob("logs/*/metrics.csv") for r in csv.DictReader(open(p))]
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}


def test_single_bad_steps_are_skipped_and_counted(sprites_root, tmp_path):
    for fault in ("3:NAN", "3:GRADNAN"):
        run_dir = tmp_path / fault.replace(":", "_")
        proc = fit(sprites_root, run_dir, fault)
        assert proc.returncode == 0, proc.stderr[-2000:]
        ckpt = load_checkpoint(run_dir / "checkpoints/last.ckpt")
        assert ckpt["global_step"] == 10  # the skipped step still counts as a step, with no update
        assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values())
        assert max(logged(run_dir, "train/nonfinite_steps").values()) == 1.0


def test_too_many_in_a_row_stop_with_last_good_weights(sprites_root, tmp_path):
    proc = fit(sprites_root, tmp_path / "run", "3:GRADNAN+", "optim.max_nonfinite_steps=4")
    assert proc.returncode == 2
    assert "4 steps in a row had a non-finite gradient" in proc.stderr and "Traceback" not in proc.stderr
    ckpt = load_checkpoint(tmp_path / "run/checkpoints/last.ckpt")
    assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values())
    assert ckpt["global_step"] == 7  # steps 3, 4, 5, 6 were skipped; it stopped after the fourth


def test_a_run_of_bad_steps_cut_by_a_resume_stops_where_it_would_have(sprites_root, tmp_path):
    # Steps 3, 4, ... all bad, limit 6: the uninterrupted run stops after step 8 (global step 9).
    # Stopped at step 5 and resumed, the two skipped steps before the checkpoint still count.
    whole = fit(sprites_root, tmp_path / "whole", "3:GRADNAN+", "optim.max_nonfinite_steps=6")
    assert whole.returncode == 2 and "6 steps in a row" in whole.stderr
    assert load_checkpoint(tmp_path / "whole/checkpoints/last.ckpt")["global_step"] == 9
    first = fit(sprites_root, tmp_path / "parts", "3:GRADNAN+", "optim.max_nonfinite_steps=6", "trainer.max_steps=5")
    assert first.returncode == 0, first.stderr[-2000:]
    rest = fit(sprites_root, tmp_path / "parts", "3:GRADNAN+", "optim.max_nonfinite_steps=6")
    assert rest.returncode == 2 and "6 steps in a row" in rest.stderr
    assert load_checkpoint(tmp_path / "parts/checkpoints/last.ckpt")["global_step"] == 9
