"""End to end through the real command line: prepare -> fit -> eval -> sample, resume, bad input."""

import csv
import importlib.util
import json

import pytest
import torch
import yaml
from PIL import Image

from tests.conftest import FAST, vaepipe
from pipeline.checkpoints import load_checkpoint


@pytest.fixture(scope="module")
def trained_run(sprites_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "sprites_run"
    proc = vaepipe("fit", f"data.root={sprites_root}", f"run.dir={run_dir}", "trainer.max_steps=12",
                   "data.batch_size=32", "model.eval_k=4", "trainer.val_check_interval=6",
                   "trainer.log_every_n_steps=4", *FAST)
    return run_dir, proc


def test_fit_writes_run_folder_and_says_where(trained_run):
    run_dir, proc = trained_run
    for path in ("config.yaml", "checkpoints/last.ckpt", "logs/version_0/metrics.csv", "images/samples_final.png",
                 "images/recon_final.png"):
        assert (run_dir / path).is_file(), path
        assert str(run_dir / path) in proc.stdout or path.startswith("logs")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["run"]["dir"] == str(run_dir) and config["trainer"]["max_steps"] == 12
    img = Image.open(run_dir / "images/samples_final.png")
    assert img.size == (8 * 66 + 2, 8 * 66 + 2)  # 8x8 grid of 64px tiles, 2px padding
    rows = list(csv.DictReader(open(run_dir / "logs/version_0/metrics.csv")))
    columns = set(rows[0])
    assert {"train/loss", "train/elbo", "train/recon", "train/kl", "train/beta", "val/loss", "val/elbo",
            "val/kl", "val/iwae4", "val/active_units"} <= columns
    steps = [int(r["step"]) for r in rows if r.get("train/loss")]
    assert steps and max(steps) <= 12


def test_checkpoint_holds_config_and_state(trained_run):
    run_dir, _ = trained_run
    ckpt = load_checkpoint(run_dir / "checkpoints/last.ckpt")
    assert ckpt["global_step"] == 12
    assert ckpt["hyper_parameters"]["config"]["data"]["root"]
    assert ckpt["hyper_parameters"]["sample_shape"] == [64, 64]
    assert "optimizer_states" in ckpt and "loops" in ckpt


def test_eval_prints_bounds_in_nats(trained_run):
    run_dir, _ = trained_run
    r = json.loads(vaepipe("eval", run_dir / "checkpoints/last.ckpt", "--k", "64", "--limit", "40", "--json").stdout)
    assert r["examples"] == 40 and r["k"] == 64 and r["split"] == "test"
    assert r["compiled"] is False  # 40 x 64 samples: far below where compiling pays (COMPILE_SAMPLES)
    # Same importance samples: L_K >= their mean log-weight (the ELBO estimate), per example (Jensen).
    assert r["elbo"] <= r["iwae_bound_k64"] and r["nll"] == pytest.approx(-r["iwae_bound_k64"])
    assert 0 < r["nll"] < 4096 * 0.7  # bounded by a coin-flip model's 4096 log 2 = 2839 nats
    text = vaepipe("eval", run_dir, "--k", "16", "--limit", "10", "--split", "val").stdout
    assert "val: 10 examples, K=16" in text and "nll" in text


def test_sample_writes_grids(trained_run, tmp_path):
    run_dir, _ = trained_run
    out = vaepipe("sample", run_dir / "checkpoints/last.ckpt", "--out", tmp_path / "s.png", "--n", "16").stdout
    assert (tmp_path / "s.png").is_file() and (tmp_path / "s_recon.png").is_file()
    assert str(tmp_path / "s.png") in out
    assert Image.open(tmp_path / "s.png").size == (8 * 66 + 2, 2 * 66 + 2)


def test_fit_resumes_from_run_folder(trained_run, sprites_root, tmp_path):
    run_dir, _ = trained_run
    copy = tmp_path / "resumed"
    import shutil

    shutil.copytree(run_dir, copy)
    proc = vaepipe("fit", f"data.root={sprites_root}", f"run.dir={copy}", "trainer.max_steps=20",
                   "data.batch_size=32", "model.eval_k=4", *FAST)
    assert f"resuming from {copy / 'checkpoints/last.ckpt'}" in proc.stdout
    ckpt = load_checkpoint(copy / "checkpoints/last.ckpt")
    assert ckpt["global_step"] == 20


def test_bad_input_gets_one_clear_line(trained_run, tmp_path):
    run_dir, _ = trained_run
    missing = vaepipe("eval", tmp_path / "nope.ckpt", check=False)
    assert missing.returncode == 2 and f"checkpoint not found: {tmp_path / 'nope.ckpt'}" in missing.stderr
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes((run_dir / "checkpoints/last.ckpt").read_bytes()[:1000])
    bad = vaepipe("eval", broken, check=False)
    assert bad.returncode == 2 and "broken.ckpt is not a readable vaepipe checkpoint" in bad.stderr
    # cut elsewhere, torch's zip reader fails with OSError instead: the same one line, for eval and a resume
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes((run_dir / "checkpoints/last.ckpt").read_bytes()[:5000])
    for proc in (vaepipe("eval", cut, check=False),
                 vaepipe("fit", "-c", run_dir / "config.yaml", f"run.dir={tmp_path / 'r'}", f"run.resume={cut}", check=False)):
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert "cut.ckpt is not a readable vaepipe checkpoint" in proc.stderr
    nodata = vaepipe("fit", f"data.root={tmp_path / 'empty'}", "data.name=mnist", check=False)
    assert nodata.returncode == 2 and "data.source=PATH" in nodata.stderr
    # a folder prepared for another data set is not silently trained on (a copied data.root, say)
    other = vaepipe("fit", "-c", run_dir / "config.yaml", f"run.dir={tmp_path / 'o'}", "data.name=mnist", check=False)
    assert other.returncode == 2 and "holds the data set 'sprites', but data.name='mnist'" in other.stderr, other.stderr
    assert not (tmp_path / "o").exists()
    # all GPUs where there is none: one line, before the run folder (Lightning: a TypeError traceback)
    allgpus = vaepipe("fit", "-c", run_dir / "config.yaml", f"run.dir={tmp_path / 'a'}", "trainer.devices=-1",
                      check=False, env={"CUDA_VISIBLE_DEVICES": ""})
    assert allgpus.returncode == 2 and "trainer.devices=-1 means every GPU" in allgpus.stderr, allgpus.stderr[-2000:]
    assert not (tmp_path / "a").exists()
    # validation every N steps with N longer than an epoch: said in steps (Lightning says it in calls)
    longer = vaepipe("fit", "-c", run_dir / "config.yaml", f"run.dir={tmp_path / 'v'}", "trainer.val_check_interval=1000",
                     check=False)
    assert longer.returncode == 2 and "val_check_interval=1000 steps is longer than an epoch" in longer.stderr, \
        longer.stderr[-2000:]
    # another data set's folder for a trained model, and devices that are not here: one line each
    vaepipe("prepare", "gmm", "--out", tmp_path / "gmm", "--sizes", "train=50,val=10,test=10")
    for cmd in (["eval", run_dir, "--k", "2"], ["diagnose", "gradients", run_dir, "--samples", "2"],
                ["sample", run_dir, "--out", tmp_path / "s.png"]):
        wrong = vaepipe(*cmd, "--data-root", tmp_path / "gmm", check=False)
        assert wrong.returncode == 2 and "holds 'gmm' samples of shape [2]" in wrong.stderr, wrong.stderr[-2000:]
    for device, says in (("gpu", "not a device name"), ("cuda:3", "no such CUDA GPU")):
        bad_device = vaepipe("eval", run_dir, "--k", "2", "--device", device, check=False,
                             env={"CUDA_VISIBLE_DEVICES": ""})
        assert bad_device.returncode == 2 and says in bad_device.stderr, bad_device.stderr[-2000:]
    if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
        tb = vaepipe("fit", "-c", run_dir / "config.yaml", f"run.dir={tmp_path / 't'}", "logger.backend=tensorboard",
                     check=False)
        assert tb.returncode == 2 and "needs the tensorboard package" in tb.stderr, tb.stderr[-2000:]
    # a run folder that cannot be one, and a setting Lightning refuses: one line each
    (tmp_path / "afile").write_text("")
    notdir = vaepipe("fit", "-c", run_dir / "config.yaml", f"run.dir={tmp_path / 'afile' / 'run'}", check=False)
    assert notdir.returncode == 2 and f"Not a directory: {tmp_path / 'afile' / 'run'}" in notdir.stderr
    gpu = vaepipe("fit", "-c", run_dir / "config.yaml", f"run.dir={tmp_path / 'g'}", "trainer.accelerator=gpu",
                  check=False, env={"CUDA_VISIBLE_DEVICES": ""})
    assert gpu.returncode == 2 and "gpu" in gpu.stderr.splitlines()[-1].lower()
    assert "Traceback" not in notdir.stderr + gpu.stderr
    for cmd in ("prepare", "fit", "eval", "sample", "config"):
        assert "usage: vaepipe " + cmd in vaepipe(cmd, "--help").stdout
    assert "Traceback" not in missing.stderr + bad.stderr + nodata.stderr
