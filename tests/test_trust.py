"""Shared files are data, never instructions (docs/trust.md), tried as an attacker would: a
checkpoint whose config names a `pipe:` data root, a manifest with shell text or `..` in a shard
name, a folder of someone's own WebDataset shards, crafted ModelCheckpoint state, two fits on one
run folder, a planted symlink, secrets in the config, an oversized member in a gzip shard."""

import gzip
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import tracemalloc
from pathlib import Path

import pytest
import torch

from pipeline.checkpoints import load_checkpoint
from pipeline.data.stream import make_loader
from pipeline.errors import ManifestError, ShardError
from tests.conftest import FAST, ROOT, vaepipe

SMALL = ["model.arch=mlp", "model.hidden=[16]", "model.latent_dim=2", "model.eval_k=2", "data.batch_size=32",
         "logger.image_every_n_epochs=0", "run.test=false", *FAST]


@pytest.fixture(scope="module")
def trained(sprites_root, tmp_path_factory):
    """A 4-step run on the sprites shards: its folder."""
    run_dir = tmp_path_factory.mktemp("trust") / "run"
    vaepipe("fit", f"data.root={sprites_root}", f"run.dir={run_dir}", "trainer.max_steps=4", *SMALL)
    return run_dir


def one_line_error(proc, *words):
    """A refusal as the CLI gives it: exit 2, no traceback, the words in its message."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for word in words:
        assert word in proc.stderr, (word, proc.stderr[-2000:])


def copy_root(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_manifest(root: Path, change) -> Path:
    manifest = json.loads((root / "manifest.json").read_text())
    manifest = change(manifest) or manifest
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


# --- 1. a checkpoint's stored data root is never a command ------------------------------------------

def test_a_checkpoint_config_cannot_size_networks_beyond_its_weights(trained, tmp_path):
    """The stored config sizes the networks before the weights are loaded: widths of 10^8 (tens of
    GB of parameters) are refused from the config's own description, before any allocation."""
    ckpt = load_checkpoint(trained / "checkpoints/last.ckpt")
    ckpt["hyper_parameters"]["config"]["model"]["hidden"] = [100_000_000]
    crafted = tmp_path / "wide.ckpt"
    torch.save(ckpt, crafted)
    for args in (["eval", crafted, "--k", "2", "--limit", "4"], ["sample", crafted, "--out", tmp_path / "s.png"]):
        proc = vaepipe(*args, check=False, timeout=120)
        one_line_error(proc, "does not describe its weights")


def test_a_checkpoint_with_a_pipe_data_root_runs_nothing(trained, sprites_root, tmp_path):
    marker = tmp_path / "pwned"
    ckpt = load_checkpoint(trained / "checkpoints/last.ckpt")
    ckpt["hyper_parameters"]["config"]["data"]["root"] = f"pipe:touch {marker}; cat {sprites_root}/{{name}}"
    crafted = tmp_path / "crafted.ckpt"
    torch.save(ckpt, crafted)  # tensors and plain data only: the safe loader accepts it
    for args in (["eval", crafted, "--k", "2", "--limit", "4"],
                 ["diagnose", "gradients", crafted, "--samples", "2", "--batch-size", "4"]):
        proc = vaepipe(*args, check=False)
        one_line_error(proc, "shell command", "--data-root")
        assert not marker.exists(), args
    proc = vaepipe("sample", crafted, "--out", tmp_path / "s.png", check=False)
    assert proc.returncode == 0 and "no reconstructions" in proc.stderr and "--data-root" in proc.stderr
    assert (tmp_path / "s.png").is_file() and not (tmp_path / "s_recon.png").exists() and not marker.exists()
    # the data root the user gives is used
    out = vaepipe("eval", crafted, "--k", "2", "--limit", "4", "--json", "--data-root", sprites_root).stdout
    assert json.loads(out)["examples"] == 4 and not marker.exists()


# --- 2. shard names are plain file names -----------------------------------------------------------

@pytest.mark.parametrize("bad", ["test-000000.tar; touch {marker} #", "../outside.tar", "sub/test-000000.tar",
                                 "pipe:touch {marker}", "-rf.tar", ".hidden.tar", "$(touch {marker}).tar"])
def test_shard_names_with_shell_text_or_paths_are_refused(sprites_root, tmp_path, bad):
    marker = tmp_path / "pwned"
    root = copy_root(sprites_root, tmp_path / "root")

    def rename(m):
        m["splits"]["test"]["shards"][0]["name"] = bad.format(marker=marker)
    edit_manifest(root, rename)
    with pytest.raises(ManifestError, match="not a plain file name"):
        make_loader(str(root), "test", 8)
    # the same manifest behind a pipe: root the user gave: the name never reaches the shell
    with pytest.raises(ShardError, match="not a plain file name"):
        make_loader(f"pipe:cat {root}/{{name}}", "test", 8)
    assert not marker.exists()


def test_pipe_name_is_shell_quoted(sprites_root):
    from pipeline.data.location import shard_url

    assert shard_url("pipe:cat /data/{name}", "train-000000.tar") == "pipe:cat /data/train-000000.tar"
    # a local folder named like a URL scheme is still a local path, not a command or a download
    assert shard_url("gs:bucket", "train-000000.tar") == os.path.join(os.getcwd(), "gs:bucket", "train-000000.tar")
    batches = list(make_loader(f"pipe:cat {sprites_root}/{{name}}", "test", 64))
    assert sum(len(b["x"]) for b in batches) == 128


@pytest.mark.parametrize("change, words", [
    (lambda m: [m], "JSON object"),
    (lambda m: m.pop("scale") and None, "scale"),
    (lambda m: m["splits"]["test"].update(dtype="float64"), "float64"),
    (lambda m: m["splits"]["test"].update(num_samples=10**15), "num_samples"),
    (lambda m: m["splits"]["test"]["shards"][0].update(num_samples=10**12), "cannot fit"),
    (lambda m: m["splits"]["test"]["shards"].append(dict(m["splits"]["test"]["shards"][0])), "listed twice"),
    (lambda m: m["splits"].update(test="oops"), "splits.test"),
])
def test_a_malformed_manifest_is_one_line(trained, sprites_root, tmp_path, change, words):
    root = edit_manifest(copy_root(sprites_root, tmp_path / "root"), change)
    proc = vaepipe("eval", trained, "--k", "2", "--limit", "5", "--data-root", root, check=False)
    one_line_error(proc, "manifest.json", words)


# --- 3. someone's own shards are never overwritten -------------------------------------------------

def foreign_shards(folder: Path) -> dict:
    """webdataset's usual names, written by webdataset's own TarWriter: no vaepipe manifest."""
    import webdataset as wds

    folder.mkdir(parents=True)
    for name in ("train-000000.tar", "train-000001.tar", "val-000000.tar"):
        with wds.TarWriter(str(folder / name)) as sink:
            for i in range(3):
                sink.write({"__key__": f"{name[:-4]}-{i}", "jpg": os.urandom(64), "cls": b"1"})
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_fit_and_prepare_leave_foreign_shards_alone(tmp_path):
    folder = tmp_path / "theirs"
    before = foreign_shards(folder)
    proc = vaepipe("fit", f"data.root={folder}", "data.name=gmm", f"run.dir={tmp_path / 'run'}", "trainer.max_steps=2",
                   *SMALL, check=False)
    one_line_error(proc, "did not write", "train-000000.tar", "--force")
    assert not (tmp_path / "run").exists()
    one_line_error(vaepipe("prepare", "gmm", "--out", folder, check=False), "did not write", "--force")
    # --force writes beside others' files, but never over one: here its own shard names are taken
    one_line_error(vaepipe("prepare", "gmm", "--out", folder, "--force", check=False), "would overwrite")
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.name != ".prepare.lock"} == before
    # files of other names: --force prepares beside them, and a later --force removes only its own
    other = tmp_path / "mixed"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    (other / "shard-a.tar").write_bytes(b"x" * 100)
    vaepipe("prepare", "gmm", "--out", other, "--force", "--sizes", "train=64,val=8,test=8")
    vaepipe("prepare", "gmm", "--out", other, "--force", "--sizes", "train=32,val=8,test=8")
    assert (other / "notes.txt").read_text() == "mine" and (other / "shard-a.tar").read_bytes() == b"x" * 100
    assert json.loads((other / "manifest.json").read_text())["splits"]["train"]["num_samples"] == 32


def test_an_interrupted_prepare_is_simply_rerun(tmp_path):
    from pipeline.data.shards import STAGING, prepare

    root = tmp_path / "d"
    (root / f"{STAGING}dead").mkdir(parents=True)
    (root / f"{STAGING}dead" / "train-000000.tar").write_bytes(b"partial")
    (root / ".prepare.lock").touch()
    vaepipe("fit", f"data.root={root}", "data.name=gmm", f"run.dir={tmp_path / 'run'}", "trainer.max_steps=1",
            "data.batch_size=8", *SMALL[:4], *SMALL[5:])
    assert not list(root.glob(STAGING + "*")) and (root / "manifest.json").is_file()
    with pytest.raises(FileExistsError, match="already prepared"):
        prepare("gmm", root, log=lambda *_: None)


# --- 4. restored ModelCheckpoint state never deletes outside the checkpoint folder ------------------

def test_crafted_checkpoint_state_deletes_nothing_outside(sprites_root, tmp_path):
    run_dir = tmp_path / "run"
    args = [f"data.root={sprites_root}", f"run.dir={run_dir}", "run.save_top_k=1", "trainer.val_check_interval=2",
            *SMALL]
    vaepipe("fit", *args, "trainer.max_steps=2")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    last = run_dir / "checkpoints/last.ckpt"
    ckpt = load_checkpoint(last)
    key = next(k for k in ckpt["callbacks"] if k.startswith("ModelCheckpoint") and "'val/loss'" in k)
    evil = str(run_dir / "checkpoints" / ".." / ".." / "victim")
    state = ckpt["callbacks"][key]
    # the worst kept "checkpoint" is the victim folder: the next better one replaces it (save_top_k=1)
    state.update(best_k_models={evil: torch.tensor(1e9)},
                 kth_best_model_path=evil, best_model_path=evil, best_model_score=torch.tensor(1e9),
                 kth_value=torch.tensor(1e9))
    torch.save(ckpt, last)
    vaepipe("fit", *args, "trainer.max_steps=6")
    assert (victim / "precious.txt").read_text() == "keep me"
    best = json.loads((run_dir / "summary.json").read_text())["best_checkpoint"]
    assert Path(best).parent == run_dir / "checkpoints" and Path(best).is_file()


# --- 5. one writer per run folder ------------------------------------------------------------------

def test_two_fits_on_one_run_folder(sprites_root, tmp_path):
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "pipeline", "fit", f"data.root={sprites_root}", f"run.dir={run_dir}",
            "trainer.max_steps=1000000", "trainer.max_epochs=-1", *SMALL]  # runs until terminated below
    first = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not (run_dir / ".vaepipe-run.lock").exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert (run_dir / ".vaepipe-run.lock").exists(), first.communicate()[0][-2000:]
        second = vaepipe("fit", f"data.root={sprites_root}", f"run.dir={run_dir}", "trainer.max_steps=2", *SMALL,
                         check=False)
        one_line_error(second, "in use by", f"pid {first.pid}")
        submit = vaepipe("submit", f"data.root={sprites_root}", f"run.dir={run_dir}", "--dry-run", check=False)
        assert submit.returncode == 0  # a dry run writes nothing
    finally:
        first.terminate()
        out = first.communicate(timeout=120)[0]
    assert first.returncode == 75, out[-2000:]  # stopped by the signal, with its checkpoint
    assert not (run_dir / ".vaepipe-run.lock").exists()  # released on the way out


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    from pipeline.errors import RunFolderBusy
    from pipeline.run_lock import LOCK_NAME, RunFolderLock, me

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_NAME).write_text(json.dumps({**me("fit"), "pid": dead.pid, "pid_start": "1"}))
    lines = []
    with RunFolderLock(tmp_path, log=lines.append):
        assert "has exited" in lines[0] and f"pid {dead.pid}" in lines[0]
        with pytest.raises(RunFolderBusy, match=f"pid {os.getpid()}"):
            RunFolderLock(tmp_path).acquire()  # a live holder (this process) is never taken over
    assert not (tmp_path / LOCK_NAME).exists()
    # another host's lock: nothing here can prove that process gone
    (tmp_path / LOCK_NAME).write_text(json.dumps({**me("fit"), "host": "node17", "pid": 1}))
    with pytest.raises(RunFolderBusy, match="node17.*remove"):
        RunFolderLock(tmp_path).acquire()
    # ... unless it is this Slurm job's earlier run (a requeue after a time-limit kill)
    os.environ.update(SLURM_JOB_ID="4242", SLURM_RESTART_COUNT="1")
    try:
        (tmp_path / LOCK_NAME).write_text(json.dumps({**me("fit"), "host": "node17", "pid": 1, "slurm_restart": 0}))
        with RunFolderLock(tmp_path, log=lines.append):
            assert "requeued" in lines[-1]
    finally:
        del os.environ["SLURM_JOB_ID"], os.environ["SLURM_RESTART_COUNT"]


def test_temporaries_are_created_exclusively(tmp_path, monkeypatch):
    from pipeline import outputs

    target = tmp_path / "elsewhere.txt"
    target.write_text("original")
    if hasattr(outputs, "secrets"):  # the random part made predictable, as an attacker would wish
        monkeypatch.setattr(outputs.secrets, "token_hex", lambda n: "feedbeef")
    planted = [tmp_path / f".summary.json.tmp-{getattr(outputs, 'HOST', '')}-{os.getpid()}-feedbeef",
               tmp_path / f".summary.json.tmp-{os.getpid()}"]  # and the name earlier versions used
    for link in planted:
        link.symlink_to(target)
    with pytest.raises(FileExistsError):
        outputs.write_text(tmp_path / "summary.json", "new")
    assert target.read_text() == "original" and not (tmp_path / "summary.json").exists()
    assert all(link.is_symlink() for link in planted)  # not followed, and not removed either
    # a planted link at prepare's lock is refused, not followed
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / ".prepare.lock").symlink_to(target)
    one_line_error(vaepipe("prepare", "gmm", "--out", tmp_path / "data", check=False), ".prepare.lock")
    assert target.read_text() == "original"


# --- 6. no secrets in checkpoints or tracking ------------------------------------------------------

def test_secrets_are_masked_in_checkpoints_and_wandb(sprites_root, tmp_path):
    run_dir = tmp_path / "run"
    # a pipe: root holding a credential URL (as `curl https://user:pw@host/{name}` would)
    root = f"pipe:cat {sprites_root}/{{name}}; true https://bob:pa@ss@example.org/x"
    vaepipe("fit", f"data.root={root}", f"run.dir={run_dir}", "trainer.max_steps=2", *SMALL,
            "logger.backend=wandb", "logger.mode=offline", "slurm.env.HF_TOKEN=hf_s3cr3tT0ken",
            "data.source=https://alice:hunter2@example.org/sprites.npz?X-Amz-Signature=abcdef0123",
            env={"WANDB_MODE": None, "WANDB_DIR": None})
    config = (run_dir / "config.yaml").read_text()  # the folder's own resume file keeps them, owner-only
    assert "hf_s3cr3tT0ken" in config and "hunter2" in config
    assert (run_dir / "config.yaml").stat().st_mode & 0o077 == 0
    stored = load_checkpoint(run_dir / "checkpoints/last.ckpt")["hyper_parameters"]["config"]
    assert stored["slurm"]["env"] == {"HF_TOKEN": "<redacted>"}
    assert stored["data"]["source"] == "https://<redacted>@example.org/sprites.npz?X-Amz-Signature=<redacted>"
    files = [p for p in run_dir.rglob("*") if p.is_file() and p.name != "config.yaml"]
    assert any(p.suffix == ".wandb" for p in files) and any(p.suffix == ".ckpt" for p in files)
    for path in files:
        data = path.read_bytes()
        for secret in (b"hf_s3cr3tT0ken", b"hunter2", b"abcdef0123", b"pa@ss"):
            assert secret not in data, (path, secret)


# --- 7. a shard member larger than the manifest allows is never read into memory -------------------

def test_an_oversized_member_is_refused_before_it_is_read(sprites_root, tmp_path):
    root = copy_root(sprites_root, tmp_path / "root")
    big = 300 * 2**20  # 300 MB of zeros: 0.3 MB of gzip
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1) as gz, tarfile.open(fileobj=gz, mode="w|") as tar:
        info = tarfile.TarInfo("test-00000000.x.bin")
        info.size = big
        tar.addfile(info, io.BytesIO(bytes(big)))
    shard = root / "test-000000.tar"
    shard.write_bytes(raw.getvalue())

    def point(m):
        m["splits"]["test"]["shards"][0].update(bytes=shard.stat().st_size, records=[])
        m["splits"]["test"]["shards"][0].pop("sha256")
    edit_manifest(root, point)
    assert shard.stat().st_size < 2 * 2**20
    peak = refused_peak(root, "more than the .* a record of this manifest can hold")
    assert peak < 50 * 2**20, peak  # a record of 128 sprites is 0.5 MB; reading the member would be 300 MB


def refused_peak(root: Path, why: str) -> int:
    """Peak traced memory while reading the test split of `root` is refused (ShardError naming its shard)."""
    tracemalloc.start()
    try:
        with pytest.raises(ShardError, match=f"test-000000.tar.*{why}"):
            list(make_loader(str(root), "test", 64, verify=False))
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# --- 8. what a newcomer meets ----------------------------------------------------------------------

def test_fit_output_is_honest(trained, sprites_root, tmp_path):
    proc = vaepipe("fit", f"data.root={sprites_root}", f"run.dir={tmp_path / 'run'}", "trainer.max_steps=3",
                   "trainer.log_every_n_steps=50", *SMALL)
    text = proc.stdout + proc.stderr
    assert "litlogger" not in text and "smaller than the logging interval" not in text
    next_line = next(line for line in proc.stdout.splitlines() if "next:" in line)
    assert "vaepipe eval" in next_line and ("min" in next_line or " s " in next_line or "s)" in next_line), next_line


# --- found by review: the same guarantees on the paths around them ----------------------------------

def test_a_planted_staging_link_deletes_nothing(tmp_path):
    from pipeline.data.shards import STAGING, prepare

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "train-000000.tar").write_bytes(b"theirs")
    root = tmp_path / "d"
    root.mkdir()
    (root / f"{STAGING}zz").symlink_to(victim)  # looks like an interrupted prepare's staging folder
    with pytest.raises(FileExistsError, match="did not write"):  # a link is not vaepipe's: a foreign entry
        prepare("gmm", root, log=lambda *_: None)
    prepare("gmm", root, force=True, sizes={"train": 32, "val": 8, "test": 8}, log=lambda *_: None)
    assert (victim / "train-000000.tar").read_bytes() == b"theirs" and (root / f"{STAGING}zz").is_symlink()


def test_force_removes_only_its_own_shards_and_replaces_a_damaged_manifest(tmp_path):
    from pipeline.data.shards import JOURNAL, prepare

    root = tmp_path / "d"
    small = {"train": 32, "val": 8, "test": 8}
    prepare("gmm", root, sizes=small, log=lambda *_: None)
    (root / "notes.txt").write_text("mine")
    edit_manifest(root, lambda m: m["splits"]["test"]["shards"].append(  # a crafted list naming someone's file
        {"name": "notes.txt", "num_samples": 0, "bytes": 4}))
    prepare("gmm", root, sizes=small, force=True, log=lambda *_: None)
    assert (root / "notes.txt").read_text() == "mine"
    # a rebuild cut short after its journal: the shards it moved in are still its own
    (root / "manifest.json").unlink()
    with pytest.raises(FileExistsError, match="would overwrite"):  # without its journal: not provably its own
        prepare("gmm", root, sizes=small, force=True, log=lambda *_: None)
    (root / JOURNAL).write_text(json.dumps({"names": sorted(p.name for p in root.glob("*-000000.tar"))}))
    prepare("gmm", root, sizes=small, force=True, log=lambda *_: None)
    assert not (root / JOURNAL).exists() and (root / "notes.txt").read_text() == "mine"
    # a damaged manifest: named; --force replaces it
    (root / "manifest.json").write_text('{"splits": ')
    for shard in root.glob("*.tar"):  # what it no longer lists is the user's to remove
        shard.unlink()
    with pytest.raises(ManifestError, match="not valid JSON.*--force` replaces it"):
        prepare("gmm", root, sizes=small, log=lambda *_: None)
    prepare("gmm", root, sizes=small, force=True, log=lambda *_: None)
    assert json.loads((root / "manifest.json").read_text())["splits"]["train"]["num_samples"] == 32


def test_a_huge_tar_extended_header_is_refused_before_it_is_read(sprites_root, tmp_path):
    root = copy_root(sprites_root, tmp_path / "root")
    big = 100 * 2**20  # a GNU long-name header of 100 MB: tarfile reads it whole before the member
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1) as gz:
        header = tarfile.TarInfo("././@LongLink")
        header.type, header.size = tarfile.GNUTYPE_LONGNAME, big
        gz.write(header.tobuf(format=tarfile.GNU_FORMAT))
        for _ in range(big // 2**20):
            gz.write(b"a" * 2**20)
    shard = root / "test-000000.tar"
    shard.write_bytes(raw.getvalue())

    def point(m):  # a manifest that fits the crafted shard's size
        m["splits"]["test"]["shards"][0].update(bytes=shard.stat().st_size, records=[], num_samples=64)
        m["splits"]["test"]["num_samples"] = sum(s["num_samples"] for s in m["splits"]["test"]["shards"])
    edit_manifest(root, point)
    assert refused_peak(root, "extended header") < 50 * 2**20  # the header was 100 MB


def test_eval_limit_on_a_remote_root_does_not_size_by_the_manifest(trained, sprites_root, tmp_path):
    """A remote manifest's counts cannot be checked against files before streaming: --limit must not
    allocate by them (it drew a mask of 10^12 entries)."""
    root = copy_root(sprites_root, tmp_path / "root")

    def claim(m):
        shard = m["splits"]["test"]["shards"][0]
        shard.update(num_samples=10**11, bytes=10**11 * 64 * 64)  # a 100 GB mask before
        m["splits"]["test"]["num_samples"] = sum(s["num_samples"] for s in m["splits"]["test"]["shards"])
    edit_manifest(root, claim)
    proc = vaepipe("eval", trained, "--k", "2", "--limit", "5", "--data-root", f"pipe:cat {root}/{{name}}",
                   check=False, timeout=300)
    # the 5 drawn examples lie beyond the 128 the stream really holds: nothing to evaluate, said in one line
    one_line_error(proc, "no examples")
