"""The fast path changes the cost, not the run: resident data on the device, K optimizer steps per
Lightning call and the compiled step give the same training as streaming and K = 1."""

import csv
import math

import pytest
import torch

from pipeline.checkpoints import load_checkpoint
from pipeline.config import load_config
from pipeline.data import resident as res
from pipeline.data.location import load_manifest
from pipeline.models.vae_module import VAEModule
from tests.conftest import FAST, vaepipe
from tests.test_integrity import member_offset

# 640 samples, batch 32: 20 steps an epoch; 45 steps cross two epoch boundaries. The cosine schedule,
# beta warm-up and dynamic binarisation make every step depend on its own step number.
RUN = ["model.arch=mlp", "model.hidden=[32]", "model.latent_dim=4", "model.eval_k=0", "data.batch_size=32",
       "trainer.max_steps=45", "trainer.max_epochs=-1", "optim.scheduler=cosine", "model.beta_warmup_steps=30",
       "data.binarize=dynamic", "trainer.log_every_n_steps=5", "logger.image_every_n_epochs=0", "run.test=false",
       *FAST]


def final(run_dir):
    ckpt = load_checkpoint(run_dir / "checkpoints/last.ckpt")
    return ckpt["global_step"], ckpt["state_dict"], ckpt["optimizer_states"][0]["state"]


def assert_same_weights(a, b):
    (sa, wa, oa), (sb, wb, ob) = final(a), final(b)
    assert sa == sb == 45
    for name in wa:
        assert torch.equal(wa[name], wb[name]), f"{name} differs"
    for i in oa:
        assert torch.equal(oa[i]["exp_avg_sq"], ob[i]["exp_avg_sq"])


def logged(run_dir, key):
    rows = [r for p in run_dir.glob("logs/*/metrics.csv") for r in csv.DictReader(open(p))]
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}


@pytest.mark.parametrize("path", ["true", "false"], ids=["resident", "streaming"])
def test_k8_is_bit_identical_to_k1(sprites_root, tmp_path, path):
    runs = {}
    for k in (1, 8):
        runs[k] = tmp_path / f"k{k}"
        proc = vaepipe("fit", f"data.root={sprites_root}", f"run.dir={runs[k]}", f"trainer.steps_per_call={k}",
                       f"data.resident={path}", *RUN)
        assert ("train split resident" in proc.stdout) == (path == "true")
    assert_same_weights(runs[1], runs[8])
    # logging stays per optimizer step, whatever K: every 5th step, the same values
    loss1, loss8 = logged(runs[1], "train/loss"), logged(runs[8], "train/loss")
    assert sorted(loss8) == list(range(4, 45, 5)) and loss1 == loss8
    lr = logged(runs[8], "train/lr")
    assert lr[4] > lr[24] > lr[44]  # the cosine schedule moved per step inside calls


def test_auto_says_which_path(sprites_root, tmp_path):
    fits = vaepipe("fit", f"data.root={sprites_root}", f"run.dir={tmp_path / 'a'}", *RUN, "trainer.max_steps=2")
    assert "data: train split resident on cpu" in fits.stdout
    small = vaepipe("fit", f"data.root={sprites_root}", f"run.dir={tmp_path / 'b'}", *RUN, "trainer.max_steps=2",
                    "data.resident_max_gb=0.001")
    assert "data: streaming from shards" in small.stdout and "data.resident_max_gb" in small.stdout


def test_resident_epochs_split_ranks_disjointly(sprites_root):
    manifest = load_manifest(str(sprites_root))
    data = res.load_split(str(sprites_root), "train", manifest, torch.device("cpu"))
    assert data.dtype == torch.uint8 and data.shape[0] == 640
    ranks = [res.ResidentSplit(data, batch_size=32, scale=manifest["scale"], binarize="dynamic", seed=3, rank=r,
                               world_size=2) for r in (0, 1)]
    assert ranks[0].steps_per_epoch == ranks[1].steps_per_epoch == 10
    for epoch in (0, 1):
        a, b = ranks[0].order(epoch), ranks[1].order(epoch)
        assert len(set(a.tolist()) | set(b.tolist())) == 640  # disjoint, the whole split
        # global batch g is one contiguous slice of the epoch's permutation, shared by the ranks
        one = res.ResidentSplit(data, batch_size=64, scale=1.0, binarize="none", seed=3).order(epoch)
        assert torch.equal(torch.cat([a[:32], b[:32]]), one[:64])
    assert not torch.equal(ranks[0].order(0), ranks[0].order(1))
    x = ranks[0].batch(1, 3)["x"]
    assert x.dtype == torch.float32 and set(x.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(x, ranks[0].batch(1, 3)["x"])  # binarisation: a function of (seed, epoch, batch, rank)
    assert not torch.equal(x, ranks[1].batch(1, 3)["x"])


def test_resident_load_names_a_corrupt_shard(sprites_root, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(sprites_root, root)
    shard = sorted(root.glob("train-*.tar"))[1]
    shard.write_bytes(shard.read_bytes()[:5000])
    proc = vaepipe("fit", f"data.root={root}", f"run.dir={tmp_path / 'run'}", *RUN, check=False)
    assert proc.returncode == 2 and str(shard) in proc.stderr and "Traceback" not in proc.stderr


def test_resident_skip_keeps_the_planned_steps(sprites_root, tmp_path):
    # data.on_error=skip with one of 5 training shards unreadable: 512 of 640 samples load, the
    # epochs keep the manifest's 20 steps (repeating samples, as streaming does) and the run trains
    # its 45 steps (the resident path used to hand out empty batches after step 16 and crash).
    import shutil

    root = tmp_path / "data"
    shutil.copytree(sprites_root, root)
    shard = sorted(root.glob("train-*.tar"))[2]
    data = bytearray(shard.read_bytes())
    at = member_offset(shard, 0) + 1000
    data[at:at + 4096] = bytes(4096)  # same size: found by the record's checksum, not the size check
    shard.write_bytes(bytes(data))
    run_dir = tmp_path / "run"
    proc = vaepipe("fit", f"data.root={root}", f"run.dir={run_dir}", *RUN, "data.on_error=skip",
                   "data.resident=true", "trainer.steps_per_call=8")
    assert "512 samples, 128 unreadable left out" in proc.stdout and "20 steps of 32 per epoch" in proc.stdout
    step, weights, _ = final(run_dir)
    assert step == 45 and all(torch.isfinite(w).all() for w in weights.values())
    split = res.ResidentSplit(torch.arange(512).view(512, 1), batch_size=32, scale=1.0, binarize="none", seed=0,
                              limit_steps=20)
    seen = torch.cat([split.batch(0, i)["x"] for i in range(20)]).flatten().tolist()
    assert len(seen) == 640 and set(seen) == set(range(512))  # every loaded sample, 128 of them twice


def test_compiled_step_matches_eager(sprites_root):
    cfg = load_config([], [f"data.root={sprites_root}", "model.arch=mlp", "model.hidden=[64]", "model.latent_dim=8",
                           "model.objective=iwae", "model.k=3"])
    from omegaconf import OmegaConf

    torch.manual_seed(0)
    module = VAEModule(OmegaConf.to_container(cfg), [64, 64])
    x = torch.bernoulli(torch.full((16, 64, 64), 0.3))
    eps = torch.randn(3, 16, 8)
    compiled = torch.compile(lambda x, eps: module.training_terms(x, 1.0, None, eps=eps), dynamic=False)
    eager = module.training_terms(x, 1.0, None, eps=eps)
    fast = compiled(x, eps)
    # Same mathematics, fused differently: float32 sums over 4096 pixels reassociate. 1e-4 relative
    # (~0.3 nats on losses of ~3000) is far below what distinguishes two models, far above rounding.
    for key in ("loss", "iwae", "elbo"):
        torch.testing.assert_close(fast[key], eager[key], rtol=1e-4, atol=1e-3)
    g_eager = torch.autograd.grad(eager["loss"], list(module.parameters()))
    g_fast = torch.autograd.grad(compiled(x, eps)["loss"], list(module.parameters()))
    # Gradients as whole tensors: elementwise, a near-zero entry can differ by 1e-2 relative from
    # reassociation alone; the tensor's relative error (norm) is what an optimizer step sees.
    for a, b in zip(g_eager, g_fast):
        assert (b - a).norm() <= 1e-4 * a.norm() + 1e-6, ((b - a).norm(), a.norm())


def test_compile_in_fit_trains_and_checkpoints(sprites_root, tmp_path):
    run_dir = tmp_path / "run"
    vaepipe("fit", f"data.root={sprites_root}", f"run.dir={run_dir}", *RUN, "model.compile=true",
            "trainer.max_steps=12")
    step, weights, _ = final(run_dir)
    assert step == 12 and all(torch.isfinite(w).all() for w in weights.values())
    assert not any("_orig_mod" in k for k in weights)  # the module is not wrapped: checkpoints stay portable


def test_schedules_count_optimizer_steps_not_calls(sprites_root, tmp_path):
    # Cosine over an epoch-limited run (2 epochs of 20 steps) with 8 steps per call: the schedule's
    # length is 40 optimizer steps, not Lightning's 6 calls.
    run_dir = tmp_path / "run"
    vaepipe("fit", f"data.root={sprites_root}", f"run.dir={run_dir}", *RUN, "trainer.max_steps=-1",
            "trainer.max_epochs=2", "trainer.steps_per_call=8")
    lr = logged(run_dir, "train/lr")
    for step in (19, 39):  # logged after step `step`: the scheduler has made step + 1 steps
        want = 1e-3 * 0.5 * (1 + math.cos(math.pi * (step + 1) / 40))
        assert lr[step] == pytest.approx(want, rel=1e-6, abs=1e-12), (step, lr[step], want)


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_a_skipped_update_changes_nothing_the_graph_warm_up_relies_on(name):
    # The CUDA graph's warm-up (step_engine._capture) makes three updates with `skip` before capturing,
    # to compile the step and create Adam's moments outside the graph; the non-finite guard skips
    # updates the same way. That is only sound if a skipped fused update leaves weights, moments and
    # the step count as they were, on a fresh optimizer and on one with state (a resumed run): the
    # next real update must equal that of an optimizer that never saw the skips. Checked here on the
    # CPU's fused kernels (same found_inf contract). SGD with momentum: fused SGD leaves its buffers
    # uninitialised when its first step is skipped, which the engine's zero buffers prevent.
    from pipeline.models.step_engine import StepEngine, make_optimizer

    cfg = load_config([], ["optim.lr=1e-2", f"optim.name={name}"]).optim
    torch.manual_seed(0)
    xs = [torch.randn(16, 8) for _ in range(4)]

    def engine():
        torch.manual_seed(1)
        net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        return net, StepEngine(None, make_optimizer(net.parameters(), cfg))

    def update(net, eng, x, skip=False):
        eng._update(net(x).square().mean(), skip=skip)
        eng.opt.zero_grad(set_to_none=True)

    for history in (0, 2):  # fresh, and after two real steps
        (a, ea), (b, eb) = engine(), engine()
        for x in xs[:history]:
            update(a, ea, x), update(b, eb, x)
        for _ in range(3):
            update(a, ea, xs[3], skip=True)
        assert int(ea.skipped) == 3  # counted (the capture restores the counters afterwards)
        update(a, ea, xs[2]), update(b, eb, xs[2])
        for pa, pb in zip(a.parameters(), b.parameters()):
            assert torch.equal(pa, pb)
            sa, sb = ea.opt.state[pa], eb.opt.state[pb]
            assert sa.keys() == sb.keys() and sa and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_checkpoints_do_not_keep_the_graphs_device_learning_rate():
    # Under the CUDA graph the optimizer's lr is a device tensor and the group is capturable; the
    # checkpoint keeps plain floats, so it resumes anywhere (CPU, another GPU, without the graph).
    from pipeline.models.step_engine import StepEngine

    ckpt = {"optimizer_states": [{"state": {}, "param_groups": [{"lr": torch.tensor(3e-4), "capturable": True}]}],
            "lr_schedulers": [{"_last_lr": [torch.tensor(3e-4)], "base_lrs": [1e-3]}]}
    StepEngine.portable(ckpt)
    group = ckpt["optimizer_states"][0]["param_groups"][0]
    assert isinstance(group["lr"], float) and group["lr"] == pytest.approx(3e-4) and group["capturable"] is False
    assert isinstance(ckpt["lr_schedulers"][0]["_last_lr"][0], float)


def test_a_failed_graph_capture_falls_back_to_ordinary_steps(sprites_root, capsys):
    # Where capturing the step fails (here: a CPU has no CUDA streams; on a GPU, e.g. an operation
    # that cannot be captured), the run goes on with ordinary steps, says so once, and is the run it
    # would have been: the warm-up left weights, moments, counters and the learning rate as they were.
    from omegaconf import OmegaConf

    from pipeline.models.step_engine import StepEngine, make_optimizer

    cfg = OmegaConf.to_container(load_config([], [f"data.root={sprites_root}", "model.arch=mlp", "model.hidden=[32]",
                                                  "model.latent_dim=4", "model.beta_warmup_steps=3"]))
    x = torch.bernoulli(torch.full((16, 64, 64), 0.3), generator=torch.Generator().manual_seed(0))
    runs = []
    for graph in (False, True):
        torch.manual_seed(0)
        module = VAEModule(cfg, [64, 64])
        opt = make_optimizer(module.parameters(), module.cfg.optim)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.9**s)
        engine = StepEngine(module, opt, sched)
        engine.cuda_graph = graph  # as a GPU engine would be built
        for step in range(5):
            engine.step(x, step, module.beta(step))
        runs.append((module, engine))
    note = capsys.readouterr().err
    assert note.count("as one CUDA graph failed") == 1 and "trainer.cuda_graph=false" in note
    (plain, e0), (fallen, e1) = runs
    assert not e1.cuda_graph and isinstance(e1.opt.param_groups[0]["lr"], float)
    assert e1.opt.param_groups[0]["lr"] == e0.opt.param_groups[0]["lr"] and int(e1.skipped) == 0
    for a, b in zip(plain.parameters(), fallen.parameters()):
        assert torch.equal(a, b)
