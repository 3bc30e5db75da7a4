"""VQ-VAE (Concept 11.23): nearest-code quantisation, the straight-through gradient, the losses'
gradients, the EMA codebook formula, perplexity, EMA statistics all-reduced across 2 real gloo
processes, and training through the real pipeline (2-process DDP, eval, resume)."""

import csv
import subprocess
import sys

import pytest
import torch

from pipeline import vae_math as vm
from pipeline.models.components.vq import VectorQuantizer
from tests.conftest import ROOT, vaepipe
from tests.test_distributed import free_port
from pipeline.checkpoints import load_checkpoint


def test_quantisation_picks_the_nearest_code():
    g = torch.Generator().manual_seed(0)
    z, book = torch.randn(500, 8, generator=g), torch.randn(64, 8, generator=g)
    assert torch.equal(vm.nearest_code(z, book), torch.cdist(z, book).argmin(1))
    vq = VectorQuantizer(64, 8).eval()
    with torch.no_grad():
        vq.codebook.copy_(book)
    z_grid = z[:50].reshape(2, 5, 5, 8).permute(0, 3, 1, 2)
    _, z_q, codes = vq(z_grid)
    assert torch.equal(codes.flatten(), torch.cdist(z[:50], book).argmin(1))
    torch.testing.assert_close(z_q.permute(0, 2, 3, 1).reshape(50, 8), book[codes.flatten()])


def test_straight_through_passes_the_gradient_unchanged():
    z_e = torch.randn(3, 4, requires_grad=True)
    z_q = torch.randn(3, 4)
    out = vm.straight_through(z_e, z_q)
    torch.testing.assert_close(out, z_q)  # the value is the code ...
    upstream = torch.randn(3, 4)
    (out * upstream).sum().backward()
    torch.testing.assert_close(z_e.grad, upstream)  # ... the gradient goes to z_e as if it were identity


def test_codebook_and_commitment_losses_move_only_their_side():
    z_e = torch.randn(2, 4, 3, 3, requires_grad=True)
    e = torch.randn(2, 4, 3, 3, requires_grad=True)
    codebook, commitment = vm.vq_losses(z_e, e, event_dims=3)
    torch.testing.assert_close(codebook, (z_e - e).pow(2).sum((1, 2, 3)))
    (g_e,) = torch.autograd.grad(codebook.sum(), [e], retain_graph=True)
    assert torch.autograd.grad(codebook.sum(), [z_e], allow_unused=True, retain_graph=True)[0] is None
    torch.testing.assert_close(g_e, 2 * (e - z_e).detach())
    assert torch.autograd.grad(commitment.sum(), [e], allow_unused=True, retain_graph=True)[0] is None
    torch.testing.assert_close(torch.autograd.grad(commitment.sum(), [z_e])[0], 2 * (z_e - e).detach())


def test_ema_update_matches_its_formula():
    g = torch.Generator().manual_seed(3)
    k, d, decay, eps = 5, 3, 0.9, 1e-5
    n0, m0 = torch.rand(k, generator=g) + 0.5, torch.randn(k, d, generator=g)
    z = torch.randn(40, d, generator=g)
    codes = torch.randint(0, k - 1, (40,), generator=g)  # the last code unused this step
    counts = torch.bincount(codes, minlength=k).float()
    sums = torch.stack([z[codes == j].sum(0) for j in range(k)])
    n, m, book = vm.ema_codebook_update(n0.clone(), m0.clone(), counts, sums, decay, eps)
    n_ref = decay * n0 + (1 - decay) * counts
    m_ref = decay * m0 + (1 - decay) * sums
    smoothed = (n_ref + eps) / (n_ref.sum() + k * eps) * n_ref.sum()
    torch.testing.assert_close(n, n_ref)
    torch.testing.assert_close(m, m_ref)
    torch.testing.assert_close(book, m_ref / smoothed[:, None])
    torch.testing.assert_close(book[-1], m_ref[-1] / n_ref[-1], rtol=1e-4, atol=1e-5)  # smoothing is tiny


def test_perplexity():
    assert vm.codebook_perplexity(torch.ones(8)).item() == pytest.approx(8.0)
    assert vm.codebook_perplexity(torch.tensor([5.0, 0, 0])).item() == pytest.approx(1.0)


def test_ema_statistics_are_all_reduced_across_processes(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "tests" / "vq_ddp_worker.py"), str(tmp_path), str(free_port())],
                   cwd=ROOT, check=True, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(r0["codebook"], r1["codebook"])  # identical on both ranks, bit for bit
    # ... and equal to one process applying the same update to both ranks' data at once.
    torch.manual_seed(0)
    single = VectorQuantizer(16, 4, ema=True, decay=0.9, dead_threshold=0.5).train()
    data = torch.randn(2, 3, 4, 5, 5, generator=torch.Generator().manual_seed(1))
    for step in range(3):
        # counts and sums of the two ranks' batches: a batch holding both (restarts draw from rank 0's)
        flat = torch.cat([data[r, step].permute(1, 2, 0).reshape(-1, 4) for r in (0, 1)])
        codes = vm.nearest_code(flat, single.codebook)
        counts = torch.bincount(codes, minlength=16).float()
        sums = torch.zeros(16, 4).index_add_(0, codes, flat)
        _, _, book = vm.ema_codebook_update(single.cluster_size, single.embed_sum, counts, sums, 0.9)
        single.codebook.copy_(book)
        dead = single.cluster_size < 0.5
        if dead.any():  # the worker restarts from rank 0's vectors: compare the live codes only
            single.codebook[dead] = r0["codebook"][dead]
            single.embed_sum[dead] = r0["codebook"][dead]
            single.cluster_size[dead] = 1.0
    torch.testing.assert_close(r0["cluster_size"], single.cluster_size)
    live = r0["cluster_size"] >= 0.5
    torch.testing.assert_close(r0["codebook"][live], single.codebook[live], rtol=1e-5, atol=1e-6)


TINY_VQ = ["-c", "configs/vqvae_sprites.yaml", "model.codebook_size=32", "model.code_dim=8", "model.vq_channels=16",
           "trainer.enable_progress_bar=false", "logger.backend=csv", "trainer.log_every_n_steps=1",
           "data.num_workers=0", "trainer.max_epochs=-1", "trainer.accelerator=cpu", "run.test=false"]


def test_vqvae_trains_under_ddp_with_identical_codebooks(sprites_root, tmp_path):
    run = tmp_path / "run"
    vaepipe("fit", f"data.root={sprites_root}", f"run.dir={run}", "trainer.devices=2", "trainer.max_steps=10",
            "data.batch_size=16", "trainer.limit_train_batches=5", "trainer.val_check_interval=5", *TINY_VQ, timeout=300)
    rows = [r for p in run.glob("logs/*/metrics.csv") for r in csv.DictReader(open(p))]
    spreads = [float(r["train/codebook_rank_spread"]) for r in rows if r.get("train/codebook_rank_spread")]
    assert spreads and all(s == 0.0 for s in spreads)  # both ranks hold the same codebook after every epoch
    assert any(r.get("train/perplexity") for r in rows) and any(r.get("val/loss") for r in rows)
    ckpt = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 10
    book = ckpt["state_dict"]["vae.quantizer.codebook"]
    assert book.abs().max() > 1 / 32  # moved away from its init (uniform in +-1/K) by the EMA updates
    r = vaepipe("eval", run, "--json").stdout
    assert '"perplexity"' in r and '"nll_recon"' in r
    # `sample --out` names the files as for the VAE: the samples, and <stem>_recon beside them
    printed = vaepipe("sample", run, "--out", tmp_path / "pics" / "vq.png").stdout.split()
    assert printed == [str(tmp_path / "pics" / "vq.png"), str(tmp_path / "pics" / "vq_recon.png")]
    assert all((tmp_path / "pics" / name).stat().st_size > 0 for name in ("vq.png", "vq_recon.png"))


def test_vqvae_resumes_like_the_vae(sprites_root, tmp_path):
    run = tmp_path / "run"
    # 4 steps per call: the stop at step 4 is halfway (with the default the call would end at step 8)
    args = ["fit", f"data.root={sprites_root}", f"run.dir={run}", "trainer.max_steps=8", "data.batch_size=16",
            "trainer.steps_per_call=4", *TINY_VQ]
    stopped = vaepipe(*args, env={"VAEPIPE_FAULT": "4:TERM"}, check=False)
    assert stopped.returncode == 75, stopped.stderr[-2000:]
    vaepipe(*args)
    resumed = load_checkpoint(run / "checkpoints" / "last.ckpt")
    vaepipe(*args[:2], f"run.dir={tmp_path / 'straight'}", *args[3:])
    straight = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    assert resumed["global_step"] == straight["global_step"] == 8
    for key, value in straight["state_dict"].items():  # codebook and EMA statistics included
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=0, atol=0, msg=key)
