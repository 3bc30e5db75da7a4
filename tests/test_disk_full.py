"""A full disk (a real, small tmpfs) or another refused write while `vaepipe fit` saves a
checkpoint, images or its summary: one clear line naming the file, the errno, the space needed and
the newest good checkpoint; no partial file in the run folder; exit 75 (retryable); and the same
command resumes once there is space."""

import errno
import subprocess

import pytest

from pipeline.checkpoints import load_checkpoint
from pipeline.errors import WriteFailure
from pipeline.outputs import atomic_write, write_text
from tests.conftest import FAST, vaepipe


@pytest.fixture()
def small_fs(tmp_path):
    """A 5 MB tmpfs (root mounts one): room for the config, one epoch's two checkpoints (1.6 MB
    each) and images, not for the next best checkpoint beside the old one."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def partial_files(folder):
    return [p for p in folder.rglob("*") if ".tmp-" in p.name]


def test_disk_full_during_fit_is_one_clear_line_and_the_run_resumes(small_fs, sprites_root):
    run = small_fs / "run"
    args = ["fit", *FAST, "data.name=sprites", f"data.root={sprites_root}", "model.arch=mlp", "model.hidden=[16]",
            "model.latent_dim=2", "model.eval_k=0", "data.batch_size=64", "trainer.max_epochs=6",
            "trainer.limit_train_batches=5", f"run.dir={run}", "run.test=false"]
    proc = vaepipe(*args, check=False)
    assert proc.returncode == 75, proc.stderr[-2000:]
    err = proc.stderr
    assert "Traceback" not in err and "inline_container" not in err
    line = next(l for l in err.splitlines() if l.startswith("vaepipe fit: error: could not write"))
    assert "[Errno 28] No space left on device" in line and "MB free on that file system" in line
    assert str(run) in line
    good = line.split("The newest good checkpoint is ")[1].split(": free space")[0]
    assert load_checkpoint(good)["global_step"] >= 5  # complete and loadable
    assert partial_files(run) == []
    # Space freed: the same command continues from that checkpoint and finishes.
    subprocess.run(["mount", "-o", "remount,size=60m", str(small_fs)], check=True)
    done = vaepipe(*args)
    assert "resuming from" in done.stdout
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == 30
    assert (run / "summary.json").is_file() and partial_files(run) == []


def test_refused_writes_leave_the_old_file_and_no_partial_one(tmp_path, small_fs):
    target = tmp_path / "summary.json"
    write_text(target, "old\n")

    def refuse(f):
        f.write(b"half")
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    with pytest.raises(WriteFailure, match=r"could not write summary .*summary\.json: \[Errno 122\] Disk quota exceeded"):
        atomic_write(target, refuse, "summary")
    assert target.read_text() == "old\n" and partial_files(tmp_path) == []
    # A real full file system: a 6 MB image on the 5 MB tmpfs.
    with pytest.raises(WriteFailure, match=r"could not write image .*big\.png: \[Errno 28\].*it needs about 6\.0 MB"):
        atomic_write(small_fs / "big.png", lambda f: f.write(bytes(6 * 2**20)), "image", need=6 * 2**20)
    assert partial_files(small_fs) == []
    with pytest.raises(ValueError):  # anything else is not a storage failure: unchanged
        atomic_write(tmp_path / "x", lambda f: (_ for _ in ()).throw(ValueError("bug")))
