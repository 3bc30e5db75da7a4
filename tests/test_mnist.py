"""The IWAE paper's MLP VAE trained through the whole pipeline on real binarized MNIST (skips without
../shared/data): prepare -> fit -> eval, and the figures must be those of a model that learned."""

import json

import pytest

from tests.conftest import FAST, ROOT, SHARED_DATA, needs_shared, vaepipe

NPZ = SHARED_DATA / "binarized_mnist" / "binarized_mnist_uint8.npz"


@needs_shared
@pytest.mark.parametrize("objective", ["vae", "iwae"])
def test_mnist_mlp_learns(tmp_path, objective):
    root = tmp_path / "bmnist"
    vaepipe("prepare", "binarized-mnist", "--source", NPZ, "--out", root, "--sizes", "train=20000,val=500,test=500")
    config = ["-c", ROOT / "configs/vae_mnist.yaml"] + (["-c", ROOT / "configs/iwae_mnist.yaml"] if objective == "iwae" else [])
    vaepipe("fit", *config, "data.name=binarized-mnist", "data.binarize=none", f"data.root={root}",
            f"run.dir={tmp_path / 'run'}", "trainer.max_epochs=6", "model.eval_k=10", *FAST)
    r = json.loads(vaepipe("eval", tmp_path / "run", "--k", "500", "--json").stdout)
    print(f"\n{objective}: test ELBO {r['elbo']:.2f}, L_500 {r['iwae_bound_k500']:.2f}, NLL {r['nll']:.2f} nats")
    # An untrained decoder scores ~543 nats (784 log 2); 1200 steps on 20k images reach ~130-140.
    # 150 leaves room for seeds and thread counts while failing any model that did not learn.
    assert r["examples"] == 500 and r["nll"] < 150
    assert r["elbo"] < r["iwae_bound_k500"]  # the importance-sampled bound is tighter than the ELBO


@needs_shared
def test_vqvae_mnist_config_learns(tmp_path):
    # The shipped configs/vqvae_mnist.yaml on real binarized MNIST, 150 steps at reduced width.
    root = tmp_path / "bmnist"
    vaepipe("prepare", "binarized-mnist", "--source", NPZ, "--out", root, "--sizes", "train=5000,val=500,test=500")
    vaepipe("fit", "-c", ROOT / "configs/vqvae_mnist.yaml", "data.name=binarized-mnist", "data.binarize=none",
            f"data.root={root}", f"run.dir={tmp_path / 'run'}", "trainer.max_steps=150", "trainer.max_epochs=-1",
            "model.vq_channels=32", "optim.lr=1e-3", *FAST)
    r = json.loads(vaepipe("eval", tmp_path / "run", "--json").stdout)
    print(f"\nvqvae: test -log p(x|z_q) {r['nll_recon']:.2f} nats, perplexity {r['perplexity']:.1f}, "
          f"dead codes {r['dead_codes']}")
    # Untrained: ~543 nats (784 log 2). A 7x7 code grid reconstructs far better than a 50-d VAE
    # code once trained; 150 steps reach well under 150 nats. Perplexity > 8: the EMA codebook with
    # restarts uses many codes, not a collapsed few.
    assert r["nll_recon"] < 150 and r["perplexity"] > 8
