"""Tracking with wandb, offline (the real wandb library and its files; no server): the fallback when
there is no API key, what a run logs, one wandb run across a stop and a resume, rank 0 only under
DDP, and the pictures (reconstructions, fixed-z samples, traversals, the 2-D scatter)."""

import os
import socket

import numpy as np
import torch
from PIL import Image

from pipeline.data.shards import prepare
from pipeline.tracking import flatten, resolve_wandb_mode, wandb_run_id
from tests.conftest import vaepipe
from tests.wandb_records import read_run
from pipeline.checkpoints import load_checkpoint

MLP = ["model.arch=mlp", "model.hidden=[32]", "model.latent_dim=4", "model.eval_k=3", "data.num_workers=0",
       "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", "trainer.accelerator=cpu"]


def no_wandb_account(tmp_path) -> dict:
    """An environment as on a fresh cluster node: no API key, no netrc, no WANDB_MODE."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return {**{k: None for k in os.environ if k.startswith("WANDB_")}, "HOME": str(home)}


def wandb_runs(run_dir):
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def test_flatten_uses_dotted_names():
    assert flatten({"model": {"beta": 4, "hidden": [1, 2]}, "run": {"name": "x"}, "empty": {}}) == \
        {"model.beta": 4, "model.hidden": [1, 2], "run.name": "x", "empty": {}}


def test_mode_resolution(tmp_path, monkeypatch):
    for k in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    mode, why = resolve_wandb_mode("auto")
    assert mode == "offline" and "no wandb API key" in why
    assert resolve_wandb_mode("online")[0] == "offline"  # never hangs in wandb.init without a key
    assert resolve_wandb_mode("disabled") == ("disabled", None)
    monkeypatch.setenv("WANDB_MODE", "dryrun")  # the environment wins over auto, old spelling too
    assert resolve_wandb_mode("auto") == ("offline", "WANDB_MODE=dryrun in the environment")  # said so
    monkeypatch.delenv("WANDB_MODE")
    # A key but a server that refuses connections: offline within seconds, saying why.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    mode, why = resolve_wandb_mode("auto")
    assert mode == "offline" and "unreachable" in why


def test_run_id_is_created_once_and_sweep_id_wins(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    first = wandb_run_id(tmp_path)
    assert (tmp_path / "wandb_run_id").read_text().strip() == first
    assert wandb_run_id(tmp_path, from_checkpoint="other") == first  # the folder's id wins
    assert wandb_run_id(tmp_path / "new", from_checkpoint="fromckpt") == "fromckpt"
    # run.resume=never: the run starts over in its folder as a new wandb run, remembered from then on
    fresh = wandb_run_id(tmp_path, new=True)
    assert fresh != first and wandb_run_id(tmp_path) == fresh
    monkeypatch.setenv("WANDB_RUN_ID", "agentid1")
    assert wandb_run_id(tmp_path / "trial") == "agentid1"


def test_default_logger_falls_back_offline_and_logs_everything(sprites_root, tmp_path):
    run = tmp_path / "run"
    proc = vaepipe("fit", f"data.root={sprites_root}", f"run.dir={run}", "trainer.max_epochs=2", *MLP,
                   env=no_wandb_account(tmp_path))
    out = proc.stdout + proc.stderr
    lines = [ln for ln in out.splitlines() if "no wandb API key" in ln]
    assert len(lines) == 1 and "wandb sync" in lines[0], out[-3000:]  # one clear line, with the way to sync
    (folder,) = wandb_runs(run)
    rec = read_run(folder)
    assert rec["id"] == (run / "wandb_run_id").read_text().strip()
    cfg = rec["config"]
    assert cfg["model.latent_dim"] == 4 and cfg["data.root"] == str(sprites_root)  # flattened, dotted
    assert cfg["system.world_size"] == 1 and cfg["system.precision"] == "32-true" and cfg["system.torch"]
    keys = set().union(*rec["history"])
    for name in ("train/loss", "train/kl", "val/loss", "val/elbo", "val/iwae3", "test/loss", "test/iwae3"):
        assert name in keys, f"{name} not logged; logged: {sorted(keys)}"
    steps = [h["trainer/global_step"] for h in rec["history"] if "train/loss" in h]
    assert steps == sorted(steps) and len(steps) >= 10
    assert rec["summary"]["checkpoint/last"] == str((run / "checkpoints" / "last.ckpt").resolve())
    # Pictures: PNG in the run folder every epoch and at the end, and the same to wandb.
    for kind in ("samples", "recon", "traversal"):
        for tag in ("epoch000", "epoch001", "final"):
            assert (run / "images" / f"{kind}_{tag}.png").is_file()
        assert any(f"pictures/{kind}._type" in h for h in rec["history"])
    media = folder / "files" / "media" / "images"
    assert len(list(media.rglob("*.png"))) == 9
    assert not (media / "images").exists()  # one folder level per key prefix: media/images/pictures/...


def test_fixed_prior_draws_give_the_same_samples_for_the_same_weights(sprites_root, tmp_path):
    # The sample grid is a function of the weights only (the fixed z): two runs with the same seed and
    # steps give identical PNGs; a different seed gives other weights and other draws.
    pngs = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        vaepipe("fit", f"data.root={sprites_root}", f"run.dir={tmp_path / name}", f"run.seed={seed}",
                "trainer.max_steps=3", "logger.backend=none", "run.test=false", *MLP)
        pngs.append(np.asarray(Image.open(tmp_path / name / "images" / "samples_final.png")))
    assert np.array_equal(pngs[0], pngs[1]) and not np.array_equal(pngs[0], pngs[2])


def test_same_wandb_run_after_stop_and_resume(sprites_root, tmp_path):
    run = tmp_path / "run"
    # 2 steps per call (10 steps an epoch): the signal after step 12 is acted on at the end of its call, step 12
    args = ["fit", f"data.root={sprites_root}", f"run.dir={run}", "trainer.max_steps=24", "trainer.max_epochs=-1",
            "logger.mode=offline", "logger.image_every_n_epochs=0", "trainer.steps_per_call=2", *MLP]
    env = no_wandb_account(tmp_path)
    stopped = vaepipe(*args, env={**env, "VAEPIPE_FAULT": "12:TERM"}, check=False)
    assert stopped.returncode == 75, stopped.stderr[-3000:]
    ckpt = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 12
    run_id = (run / "wandb_run_id").read_text().strip()
    assert ckpt["vaepipe"]["wandb_run_id"] == run_id
    vaepipe(*args, env=env)
    first, second = (read_run(f) for f in wandb_runs(run))  # one folder per process start, named by time
    assert first["id"] == second["id"] == run_id
    steps = lambda r: [h["trainer/global_step"] for h in r["history"] if "train/loss" in h]  # noqa: E731
    # Metrics of a step are logged at the step's index (0-based): the first start trained steps 0-11
    # (its last row may be cut by the signal), the resumed one 12-23, on the same axis.
    assert max(steps(first)) <= 11 and min(steps(second)) == 12 and max(steps(second)) == 23
    # The run folder's id survives a lost wandb_run_id file: the checkpoint has it too.
    (run / "wandb_run_id").unlink()
    vaepipe(*args[:-len(MLP) - 1], "trainer.max_steps=30", *MLP, env=env)
    assert (run / "wandb_run_id").read_text().strip() == run_id


def test_ddp_logs_one_wandb_run_from_rank_zero(sprites_root, tmp_path):
    run = tmp_path / "run"
    proc = vaepipe("fit", f"data.root={sprites_root}", f"run.dir={run}", "trainer.devices=2", "trainer.max_steps=6",
                   "trainer.max_epochs=-1", "data.batch_size=32", "logger.mode=offline", "run.test=false",
                   "logger.image_every_n_epochs=0", *MLP, env=no_wandb_account(tmp_path), timeout=300)
    assert "terminate called" not in proc.stderr
    (folder,) = wandb_runs(run)  # rank 1 started no run of its own
    rec = read_run(folder)
    assert rec["config"]["system.world_size"] == 2 and rec["config"]["system.strategy"] == "DDPStrategy"
    assert max(h["trainer/global_step"] for h in rec["history"] if "train/loss" in h) == 5  # steps 0-5


def test_scatter_of_data_and_samples_for_2d_data(tmp_path):
    root = tmp_path / "gmm"
    prepare("gmm", root, sizes={"train": 512, "val": 256, "test": 64}, log=lambda *_: None)
    run = tmp_path / "run"
    vaepipe("fit", "data.name=gmm", f"data.root={root}", f"run.dir={run}", "trainer.max_epochs=1",
            "logger.backend=none", "model.likelihood=gaussian", "model.latent_dim=2", *MLP)
    img = np.asarray(Image.open(run / "images" / "scatter_final.png").convert("RGB")).reshape(-1, 3)
    blue = (img == (31, 119, 180)).all(1).sum()
    orange = (img == (255, 127, 14)).all(1).sum()
    assert blue > 500 and orange > 500  # both the data and the model's samples are drawn
    assert not (run / "images" / "samples_final.png").exists()  # 2-D points are not pictures


def test_traversal_sweeps_one_dimension_per_row():
    from pipeline.images import traversal
    from pipeline.models.components.vae import VAE

    torch.manual_seed(0)
    vae = VAE((8, 8), arch="mlp", latent_dim=3, hidden=[16]).eval()
    kl = torch.tensor([0.1, 2.0, 0.5])
    x = torch.rand(8, 8)
    with torch.no_grad():
        grid = traversal(vae, x, kl, steps=5, span=2.0)
        mu, _ = vae.encode(x[None])
        for row, dim in enumerate((1, 2, 0)):  # the most informative dimension (largest KL) first
            z = mu.repeat(5, 1)
            z[:, dim] = torch.linspace(-2, 2, 5)
            torch.testing.assert_close(grid[row * 5:(row + 1) * 5], vae.mean(z))
    assert grid.shape == (15, 8, 8)
