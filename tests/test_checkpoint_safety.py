"""Loading a checkpoint never runs code inside it: a crafted .ckpt (a real checkpoint plus one
object whose unpickling would create a file) is refused by eval, sample, a resuming fit and run.init_from, with one
clear line and the file never created; every kind of checkpoint vaepipe writes still loads safely."""

import os
import shutil

import pytest
import torch

from pipeline.checkpoints import load_checkpoint
from pipeline.errors import UnsafeCheckpointError
from tests.conftest import FAST, vaepipe

SMALL = ["model.arch=mlp", "model.hidden=[32]", "model.latent_dim=4", "model.eval_k=2", "data.batch_size=32",
         "trainer.val_check_interval=4", "logger.image_every_n_epochs=0", "run.test=false", *FAST]


class _CreatesFile:
    """Unpickling this calls open(path, 'w'): the file's existence proves the code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def craft(real_ckpt, out, marker):
    ckpt = load_checkpoint(real_ckpt)
    ckpt["callbacks"]["extra"] = _CreatesFile(marker)  # deep inside, where a reader would not look
    torch.save(ckpt, out)
    return out


@pytest.fixture(scope="module")
def runs(sprites_root, tmp_path_factory):
    """VAE (with periodic checkpoints), IWAE and beta-VAE runs of 8 steps each."""
    base = tmp_path_factory.mktemp("kinds")
    kinds = {"vae": ["run.every_n_train_steps=3"], "iwae": ["model.objective=iwae", "model.k=3"],
             "beta": ["model.beta=4", "model.beta_warmup_steps=4"]}
    for name, extra in kinds.items():
        vaepipe("fit", f"data.root={sprites_root}", f"run.dir={base / name}", "trainer.max_steps=8", *SMALL, *extra)
    return base


def test_every_checkpoint_vaepipe_writes_loads_safely(runs):
    # last, best and periodic step-* of each kind (VQ-VAE, DDP and signal-saved checkpoints are
    # loaded with the same safe loader in test_vqvae, test_distributed and test_resume)
    paths = sorted(runs.glob("*/checkpoints/*.ckpt"))
    names = {p.name.split("-")[0].split(".")[0] for p in paths}
    assert {"last", "best", "step"} <= names, names
    for path in paths:
        ckpt = load_checkpoint(path)
        assert ckpt["global_step"] > 0 and ckpt["state_dict"] and ckpt["optimizer_states"], path
    for name in ("iwae", "beta"):
        out = vaepipe("eval", runs / name, "--k", "4", "--limit", "8", "--json").stdout
        assert '"nll"' in out


def test_crafted_checkpoint_is_refused_everywhere(runs, sprites_root, tmp_path):
    marker = tmp_path / "code-ran"
    evil = craft(runs / "vae/checkpoints/last.ckpt", tmp_path / "evil.ckpt", marker)
    # the object really would run: torch's unrestricted loader creates the file
    torch.load(evil, weights_only=False)
    assert marker.exists()
    marker.unlink()

    with pytest.raises(UnsafeCheckpointError, match="evil.ckpt"):
        load_checkpoint(evil)
    refusals = [
        vaepipe("eval", evil, "--k", "4", "--limit", "4", check=False),
        vaepipe("sample", evil, "--out", tmp_path / "s.png", check=False),
        vaepipe("diagnose", "amortization", evil, "--limit", "2", check=False),
        vaepipe("fit", f"data.root={sprites_root}", f"run.dir={tmp_path / 'byPath'}", f"run.resume={evil}",
                "trainer.max_steps=12", *SMALL, check=False),
        vaepipe("fit", f"data.root={sprites_root}", f"run.dir={tmp_path / 'byInit'}", f"run.init_from={evil}",
                "trainer.max_steps=12", *SMALL, check=False),
    ]
    # resume=auto from a run folder whose last.ckpt was replaced
    folder = tmp_path / "folder"
    shutil.copytree(runs / "vae", folder)
    shutil.copy(evil, folder / "checkpoints/last.ckpt")
    refusals.append(vaepipe("fit", f"data.root={sprites_root}", f"run.dir={folder}", "trainer.max_steps=12", *SMALL,
                            check=False))
    for proc in refusals:
        assert proc.returncode == 2, proc.stdout[-1500:] + proc.stderr[-1500:]
        assert "refused to load" in proc.stderr and ("evil.ckpt" in proc.stderr or "last.ckpt" in proc.stderr)
        assert "it was not loaded" in proc.stderr and "Traceback" not in proc.stderr
        assert not marker.exists()
    assert not (tmp_path / "s.png").exists()
    # nothing trained from the refused file: the copied run folder kept its 8-step checkpoints
    assert load_checkpoint(folder / "checkpoints/step-00000006.ckpt")["global_step"] == 6
    assert not os.path.exists(tmp_path / "byPath" / "checkpoints" / "last.ckpt")
    assert not os.path.exists(tmp_path / "byInit" / "checkpoints" / "last.ckpt")


def test_a_text_file_is_unreadable_not_unsafe(tmp_path):
    # torch's safe unpickler reports any byte that is no pickle opcode ("Unsupported operand 109",
    # the 'm' of "model:") in its refusal message: that is a foreign file, not a dangerous one
    from pipeline.errors import UnreadableCheckpointError

    for text in ("model:\n  k: 1\n", "hello\n"):
        path = tmp_path / "config.yaml"
        path.write_text(text)
        with pytest.raises(UnreadableCheckpointError, match="not a readable vaepipe checkpoint"):
            load_checkpoint(path)
