"""run.init_from: a new run starts from another run's model weights (fresh optimizer and step count);
weights that do not fit the model, a missing file or an unsafe one are refused with one clear line."""

import torch

from pipeline.checkpoints import load_checkpoint
from tests.conftest import FAST, vaepipe

SMALL = ["model.arch=mlp", "model.hidden=[32]", "model.latent_dim=4", "model.eval_k=2", "data.batch_size=32",
         "logger.image_every_n_epochs=0", "run.test=false", "trainer.check_val_every_n_epoch=100", *FAST]


def test_init_from_takes_the_weights_and_nothing_else(sprites_root, tmp_path):
    src = tmp_path / "src"
    vaepipe("fit", f"data.root={sprites_root}", f"run.dir={src}", "trainer.max_steps=8", *SMALL)
    trained = load_checkpoint(src / "checkpoints/last.ckpt")
    # learning rate 0: the new run's weights stay whatever it started from, so its last.ckpt shows them
    new = [f"data.root={sprites_root}", f"run.dir={tmp_path / 'new'}", f"run.init_from={src / 'checkpoints/last.ckpt'}",
           "optim.name=sgd", "optim.lr=0", "data.batch_size=16",  # another batch size
           *[a for a in SMALL if not a.startswith("data.batch_size")]]
    out = vaepipe("fit", *new, "trainer.max_steps=4").stdout
    assert "initial weights from" in out and "(its step 8)" in out
    started = load_checkpoint(tmp_path / "new/checkpoints/last.ckpt")
    assert started["global_step"] == 4  # a fresh step count, not the source's 8 + 4
    assert started["state_dict"].keys() == trained["state_dict"].keys()
    for name, w in trained["state_dict"].items():
        assert torch.equal(started["state_dict"][name], w), name
    # the same run without init_from starts from its own initialisation: other weights (the check can fail)
    vaepipe("fit", *[a for a in new if not a.startswith(("run.init_from", "run.dir"))], f"run.dir={tmp_path / 'fresh'}",
            "trainer.max_steps=4")
    fresh = load_checkpoint(tmp_path / "fresh/checkpoints/last.ckpt")["state_dict"]
    assert not all(torch.equal(fresh[n], w) for n, w in trained["state_dict"].items())
    # running the command again resumes the new run from its own checkpoint; init_from is not reapplied
    out = vaepipe("fit", *new, "trainer.max_steps=6").stdout
    assert "resuming from" in out and "initial weights from" not in out
    assert load_checkpoint(tmp_path / "new/checkpoints/last.ckpt")["global_step"] == 6


def test_init_from_refuses_what_does_not_fit(sprites_root, tmp_path):
    src = tmp_path / "src"
    vaepipe("fit", f"data.root={sprites_root}", f"run.dir={src}", "trainer.max_steps=2", *SMALL)
    ckpt = src / "checkpoints/last.ckpt"
    wider = vaepipe("fit", f"data.root={sprites_root}", f"run.dir={tmp_path / 'wider'}", f"run.init_from={ckpt}",
                    "trainer.max_steps=2", *SMALL, "model.latent_dim=6", check=False)
    assert wider.returncode == 2 and "Traceback" not in wider.stderr, wider.stderr[-2000:]
    assert f"run.init_from={ckpt}" in wider.stderr and "do not fit this model" in wider.stderr
    assert "(4, 32)" in wider.stderr or "(8, 32)" in wider.stderr  # the offending shapes are named
    missing = vaepipe("fit", f"data.root={sprites_root}", f"run.dir={tmp_path / 'missing'}",
                      f"run.init_from={tmp_path / 'nope.ckpt'}", "trainer.max_steps=2", *SMALL, check=False)
    assert missing.returncode == 2 and "nope.ckpt: no such checkpoint" in missing.stderr, missing.stderr[-2000:]
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(ckpt.read_bytes()[:5000])  # a copy that stopped short
    damaged = vaepipe("fit", f"data.root={sprites_root}", f"run.dir={tmp_path / 'damaged'}", f"run.init_from={cut}",
                      "trainer.max_steps=2", *SMALL, check=False)
    assert damaged.returncode == 2 and "Traceback" not in damaged.stderr, damaged.stderr[-2000:]
    assert f"run.init_from={cut}: not a readable checkpoint" in damaged.stderr
    assert not (tmp_path / "wider/checkpoints/last.ckpt").exists() and not (tmp_path / "missing/checkpoints").exists()
