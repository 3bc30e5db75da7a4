"""Exact resume: interrupted + resumed training ends with bit-identical weights to an uninterrupted
run (CPU), after SIGTERM/SIGUSR1 (checkpoint at the agreed step) or kill -9 (newest periodic
checkpoint), mid-epoch and at an epoch boundary, with 2 loader workers and with 2 DDP processes."""

import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import ROOT, vaepipe
from pipeline.checkpoints import load_checkpoint
from pipeline.outputs import HOST

# 640 samples, batch 32, 2 workers: 20 steps per epoch, so 30 steps cross an epoch boundary.
STEPS = 30
# Steps per call: trainer.steps_per_call lowered to divide run.every_n_train_steps=5 (and 20 steps
# an epoch). A signal is acted on at the end of the call in progress.
K = 5


def args(root, run_dir, *extra):
    return ["fit", f"data.root={root}", f"run.dir={run_dir}", f"trainer.max_steps={STEPS}", "trainer.max_epochs=-1",
            "data.batch_size=32", "data.num_workers=2", "data.shuffle_buffer=100", "model.arch=mlp",
            "model.hidden=[32]", "model.latent_dim=4", "model.eval_k=3", "trainer.val_check_interval=0.5",
            "trainer.log_every_n_steps=5", "run.every_n_train_steps=5", "trainer.enable_progress_bar=false",
            "logger.backend=csv", "logger.image_every_n_epochs=0", *extra]


def weights(run_dir):
    ckpt = load_checkpoint(run_dir / "checkpoints/last.ckpt")
    assert ckpt["global_step"] == STEPS
    return ckpt["state_dict"], ckpt["optimizer_states"][0]["state"]


def assert_identical(a, b):
    (wa, oa), (wb, ob) = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), f"weight {name} differs after resume"
    for i in oa:  # Adam moments too: the optimiser state resumed exactly
        assert torch.equal(oa[i]["exp_avg_sq"], ob[i]["exp_avg_sq"])


def run(argv, env=None, check=True):
    return vaepipe(*argv, env=env, check=check)  # its own session: a KILL fault takes down its DDP ranks only


@pytest.fixture(scope="module")
def reference(sprites_root, tmp_path_factory):
    out = {}
    for name, extra in {"single": [], "ddp": ["trainer.devices=2", "trainer.accelerator=cpu"]}.items():
        run_dir = tmp_path_factory.mktemp("ref") / name
        run(args(sprites_root, run_dir, *extra))
        out[name] = run_dir
        # periodic checkpoints every 5 steps, the newest run.keep_last=2 kept; last and best beside them
        names = sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt"))
        assert [n for n in names if n.startswith("step-")] == ["step-00000025.ckpt", "step-00000030.ckpt"]
        assert "last.ckpt" in names and any(n.startswith("best-") for n in names)
    return out


CASES = [  # (topology, fault step, signal)
    ("single", 7, "TERM"),   # mid-epoch
    ("single", 20, "USR1"),  # the epoch boundary
    ("single", 13, "KILL"),  # kill -9: resumes from the step-10 periodic checkpoint
    ("ddp", 9, "TERM"),      # signal to rank 0 only; rank 1 learns it through the all-reduce
    ("ddp", 23, "KILL"),     # the whole process group dies; resumes from step 20
]


@pytest.mark.parametrize("topology,step,sig", CASES, ids=[f"{t}-{s}-{g}" for t, s, g in CASES])
def test_interrupted_run_resumes_bit_identical(reference, sprites_root, tmp_path, topology, step, sig):
    extra = ["trainer.devices=2", "trainer.accelerator=cpu"] if topology == "ddp" else []
    run_dir = tmp_path / "run"
    first = run(args(sprites_root, run_dir, *extra), env={"VAEPIPE_FAULT": f"{step}:{sig}"}, check=False)
    if sig == "KILL":
        assert first.returncode == -signal.SIGKILL
        saved = load_checkpoint(run_dir / "checkpoints/last.ckpt")["global_step"]
        assert saved < step  # killed before any end-of-run save: a periodic checkpoint is all there is
    else:
        assert first.returncode == 75, first.stderr[-2000:]  # EX_TEMPFAIL: stopped early, resume
        assert load_checkpoint(run_dir / "checkpoints/last.ckpt")["global_step"] == -(-step // K) * K
    second = run(args(sprites_root, run_dir, *extra))
    assert "resuming from" in second.stdout
    assert_identical(run_dir, reference[topology])


def test_external_signal_at_any_step(reference, sprites_root, tmp_path):
    # A real signal from outside, at whatever step it lands: the property must hold for every k.
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args(sprites_root, run_dir)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while not list((run_dir / "checkpoints").glob("step-*.ckpt")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=300)
    if proc.returncode == 0:
        pytest.skip("training finished before the signal arrived")  # too fast a machine; nothing to test
    assert proc.returncode == 75, err[-2000:]
    k = load_checkpoint(run_dir / "checkpoints/last.ckpt")["global_step"]
    assert 5 <= k < STEPS
    run(args(sprites_root, run_dir))
    assert_identical(run_dir, reference["single"])


def test_a_changed_sample_order_is_refused_clearly(sprites_root, tmp_path):
    # The processes and workers may change on resume (tests/test_elastic.py); what defines the global
    # order may not: the global batch on the same number of processes, the shuffle window, the seed.
    run_dir = tmp_path / "run"
    run(args(sprites_root, run_dir, "data.resident=false"), env={"VAEPIPE_FAULT": "7:TERM"}, check=False)
    config = (run_dir / "config.yaml").read_text()
    for change, said in (("data.batch_size=16", "its global batch is 32"),
                         ("data.shuffle_buffer=50", "data.shuffle_buffer=100"), ("run.seed=1", "run.seed=0"),
                         ("optim.lr=0.5", "optim.lr=0.001"), ("model.hidden=[8]", "model.hidden=[32]")):
        proc = run(args(sprites_root, run_dir, change), check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert f"cannot resume from {run_dir / 'checkpoints/last.ckpt'}" in proc.stderr, proc.stderr[-2000:]
        assert said in proc.stderr and "run.init_from=" in proc.stderr, proc.stderr[-2000:]
        # refused before anything is written: the folder's config still resumes the run (Slurm requeue)
        assert (run_dir / "config.yaml").read_text() == config
    done = run(["fit", "-c", str(run_dir / "config.yaml")])
    assert "resuming from" in done.stdout


def test_truncated_newest_checkpoint_is_skipped(reference, sprites_root, tmp_path):
    run_dir = tmp_path / "run"
    run(args(sprites_root, run_dir), env={"VAEPIPE_FAULT": "17:TERM"}, check=False)
    last = run_dir / "checkpoints/last.ckpt"
    # the stop at step 20 wrote last.ckpt and the periodic step-20 file; a file system that lost the
    # tail of both leaves step 15 as the newest good one
    for path in (last, run_dir / "checkpoints/step-00000020.ckpt"):
        path.write_bytes(path.read_bytes()[:4096])
    proc = run(args(sprites_root, run_dir))
    assert f"skipping unreadable checkpoint {last}" in proc.stderr
    assert "resuming from" in proc.stdout and "step-00000015.ckpt" in proc.stdout
    assert_identical(run_dir, reference["single"])  # replaying steps 15-17 gives the same weights


def test_a_new_start_or_an_explicit_resume_sets_superseded_checkpoints_aside(sprites_root, tmp_path):
    # A: 6 steps with periodic checkpoints. B: run.resume=never in the same folder, stopped at step 3.
    # The automatic resume after B must continue B (step 3), not A's step-6 file; A's files are kept.
    run_dir = tmp_path / "run"
    small = [f"data.root={sprites_root}", f"run.dir={run_dir}", "model.arch=mlp", "model.hidden=[8]",
             "model.latent_dim=2", "model.eval_k=0", "trainer.max_epochs=-1", "run.every_n_train_steps=2",
             "trainer.log_every_n_steps=1", "logger.backend=csv", "logger.image_every_n_epochs=0", "run.test=false",
             "trainer.enable_progress_bar=false", "data.num_workers=0"]
    run(["fit", *small, "trainer.max_steps=6"])
    b = run(["fit", *small, "trainer.max_steps=3", "run.resume=never"])
    aside = list(tmp_path.glob("run/checkpoints.replaced-*/step-00000006.ckpt"))
    assert len(aside) == 1 and "moved to" in b.stdout and "resuming" not in b.stdout
    assert "resume: auto" in (run_dir / "config.yaml").read_text()  # the folder's config resumes it
    stale = run_dir / f"checkpoints/.last.ckpt.tmp-{HOST}-4194303-0a1b2c3d"  # a writer killed -9 here (no such pid)
    stale.write_bytes(b"x" * 1000)
    # another node's writer on shared storage: its pid says nothing here, so its file is kept
    elsewhere = run_dir / "checkpoints/.last.ckpt.tmp-other_node-4194303-0a1b2c3d"
    elsewhere.write_bytes(b"x" * 1000)
    c = run(["fit", "-c", str(run_dir / "config.yaml"), "trainer.max_steps=4"])
    assert f"resuming from {run_dir / 'checkpoints/last.ckpt'}" in c.stdout
    assert not stale.exists() and f"removed {stale}" in c.stdout
    assert elsewhere.exists() and "other_node" not in c.stdout
    elsewhere.unlink()
    assert load_checkpoint(run_dir / "checkpoints/last.ckpt")["global_step"] == 4
    # an explicit older checkpoint that is refused (another learning rate) moves nothing
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    refused = run(["fit", *small, "trainer.max_steps=3", "optim.lr=0.01",
                   f"run.resume={run_dir / 'checkpoints/step-00000002.ckpt'}"], check=False)
    assert refused.returncode == 2 and "optim.lr" in refused.stderr, refused.stderr[-2000:]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before
    assert len(list(tmp_path.glob("run/checkpoints.replaced-*"))) == 1
    # an explicit older checkpoint: the later ones are set aside, so the next auto resume continues it
    run(["fit", *small, "trainer.max_steps=3", f"run.resume={run_dir / 'checkpoints/step-00000002.ckpt'}"])
    first, second = sorted(tmp_path.glob("run/checkpoints.replaced-*"))
    assert {"last.ckpt", "step-00000004.ckpt"} <= {p.name for p in second.iterdir()}  # and the later best-*
    d = run(["fit", *small, "trainer.max_steps=4"])
    assert f"resuming from {run_dir / 'checkpoints/last.ckpt'}" in d.stdout
    assert load_checkpoint(run_dir / "checkpoints/last.ckpt")["global_step"] == 4
    # every checkpoint unreadable: an error naming the folder, never a silent new start
    for path in (run_dir / "checkpoints").glob("*.ckpt"):
        path.write_bytes(path.read_bytes()[:3000])
    bad = run(["fit", *small, "trainer.max_steps=8"], check=False)
    assert bad.returncode == 2 and "can be read" in bad.stderr and "run.resume=never" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_last_checkpoint_holds_the_best_checkpoint_of_its_own_step(sprites_root, tmp_path):
    # last.ckpt is written after the ModelCheckpoints at the same hook: its record of the best file
    # is the file on disk, so a resumed run with save_top_k=1 replaces it (none left orphaned)
    run_dir = tmp_path / "run"
    small = [f"data.root={sprites_root}", f"run.dir={run_dir}", "model.arch=mlp", "model.hidden=[16]",
             "model.latent_dim=2", "model.eval_k=0", "trainer.max_steps=-1", "trainer.limit_train_batches=4",
             "trainer.steps_per_call=4", "logger.backend=csv", "logger.image_every_n_epochs=0", "run.test=false",
             "trainer.enable_progress_bar=false", "data.num_workers=0", "run.save_top_k=1"]
    run(["fit", *small, "trainer.max_epochs=3"])
    ckpts = run_dir / "checkpoints"

    def tracked():
        state = load_checkpoint(ckpts / "last.ckpt")["callbacks"]
        return next(v for k, v in state.items() if k.startswith("ModelCheckpoint") and "val/loss" in k)["best_model_path"]

    assert [str(p) for p in ckpts.glob("best-*.ckpt")] == [tracked()]
    run(["fit", *small, "trainer.max_epochs=6"])
    assert [str(p) for p in ckpts.glob("best-*.ckpt")] == [tracked()]


def test_a_cosine_schedule_keeps_its_length_on_resume(sprites_root, tmp_path):
    # The cosine decays over max_steps: resumed with another length, the learning rate would jump
    # back up the curve. Refused (naming both values); the same length resumes.
    run_dir = tmp_path / "run"
    small = [f"data.root={sprites_root}", f"run.dir={run_dir}", "model.arch=mlp", "model.hidden=[8]",
             "model.latent_dim=2", "model.eval_k=0", "trainer.max_epochs=-1", "trainer.steps_per_call=4",
             "logger.backend=none", "run.test=false", "trainer.enable_progress_bar=false", "optim.scheduler=cosine"]
    run(["fit", *small, "trainer.max_steps=8"], env={"VAEPIPE_FAULT": "4:TERM"}, check=False)
    longer = run(["fit", *small, "trainer.max_steps=16"], check=False)
    assert longer.returncode == 2 and "trainer.max_steps=8" in longer.stderr and "run.init_from=" in longer.stderr
    assert "resuming from" in run(["fit", *small, "trainer.max_steps=8"]).stdout
