"""Estimators and training against models whose log-likelihood is exact (MATH.md, reference models)."""

import math

import numpy as np
import torch

from pipeline import vae_math as vm
from pipeline.config import load_config
from pipeline.data.shards import prepare
from pipeline.data.sources import load_source
from pipeline.evaluate import evaluate, load_module
from pipeline.reference_models import gmm_log_posterior, gmm_log_px, gmm_log_px_given_z, ppca_log_px, ppca_mle
from pipeline.train import fit


# --- Example 11.5: three Gaussians, discrete latent --------------------------------------------------


def gmm_points(n=200):
    data = load_source("gmm", seed=0, sizes={"train": n, "val": 1, "test": 1})
    return torch.from_numpy(data.splits["train"].x).double()


def sampled_bound(x, log_q, k, replicates, gen):
    """L_K per (replicate, example) with z_k ~ q(.|x) categorical; log w = log p(x, z) - log q(z|x)."""
    log_joint = gmm_log_px_given_z(x) - math.log(3)  # [B, 3]
    out = []
    for _ in range(replicates):
        def log_w(n):
            z = torch.multinomial(log_q.exp(), n, replacement=True, generator=gen).T  # [n, B]
            return (log_joint.gather(1, z.T) - log_q.gather(1, z.T)).T
        out.append(vm.log_mean_exp_chunked(log_w, k, chunk=64))
    return torch.stack(out).double()  # [replicates, B]


def test_gmm_bounds_order_and_iwae_increases_with_k():
    gen = torch.Generator().manual_seed(0)
    x = gmm_points()
    exact = gmm_log_px(x)
    # An imperfect encoder: the true posterior tempered towards uniform (T = 4).
    log_q = torch.log_softmax(gmm_log_posterior(x) / 4.0, dim=-1)
    log_joint = gmm_log_px_given_z(x) - math.log(3)
    elbo = (log_q.exp() * (log_joint - log_q)).sum(-1)  # exact expectation over the 3 states
    means = {}
    for k in (1, 5, 50, 500):
        bound = sampled_bound(x, log_q, k, replicates=200, gen=gen)
        means[k] = (bound.mean().item(), (bound.mean(1).std() / math.sqrt(bound.shape[0])).item())
    print("\nELBO %.4f | " % elbo.mean() + " | ".join(f"L_{k} {m:.4f}+-{s:.4f}" for k, (m, s) in means.items())
          + " | log p(x) %.4f" % exact.mean())
    # L_1 is an unbiased estimate of the ELBO: within 4 standard errors.
    assert abs(means[1][0] - elbo.mean().item()) < 4 * means[1][1]
    # ELBO <= L_5 <= L_50 <= L_500 <= log p(x): successive gaps must exceed 4 standard errors ...
    ks = [1, 5, 50, 500]
    for a, b in zip(ks, ks[1:]):
        assert means[b][0] - means[a][0] > -4 * (means[a][1] + means[b][1]), (a, b, means)
    assert means[50][0] > elbo.mean().item() and means[500][0] <= exact.mean().item() + 4 * means[500][1]
    # ... and L_K approaches log p(x): the gap at K = 500 is below 2% of the ELBO's gap.
    assert exact.mean().item() - means[500][0] < 0.02 * (exact.mean() - elbo.mean()).item()


def test_prior_sampling_has_far_larger_variance_than_posterior_sampling():
    # Concept 11.8: z ~ p(z) (Choice 1) wastes 2/3 of the draws here; z ~ p(z|x) (Concept 11.9's
    # optimal proposal) makes every weight equal p(x): zero variance up to round-off.
    gen = torch.Generator().manual_seed(1)
    x = gmm_points(100)
    prior = sampled_bound(x, torch.full((100, 3), -math.log(3), dtype=torch.float64), 5, 300, gen)
    post = sampled_bound(x, gmm_log_posterior(x), 5, 300, gen)
    var_prior, var_post = prior.var(0).mean().item(), post.var(0).mean().item()
    print(f"\nvariance of the K=5 log p(x) estimate: prior sampling {var_prior:.3g}, posterior {var_post:.3g}")
    assert var_prior > 1.0 and var_post < 1e-12
    torch.testing.assert_close(post.mean(0), gmm_log_px(x))


# --- probabilistic PCA: the VAE reaches the closed-form global optimum -------------------------------


def test_linear_vae_reaches_ppca_maximum_likelihood(tmp_path):
    rng = np.random.default_rng(0)
    m, d, n = 5, 2, 4000
    w_true = rng.normal(size=(m, d)) * np.array([2.0, 1.0])
    x = rng.normal(size=(n + 400, d)) @ w_true.T + rng.normal(size=m) + 0.3 * rng.normal(size=(n + 400, m))
    x = x.astype(np.float32)
    np.savez(tmp_path / "ppca.npz", train=x[:n], val=x[n:n + 200], test=x[n + 200:])
    prepare("npz", tmp_path / "shards", source=str(tmp_path / "ppca.npz"), log=lambda *_: None)
    cfg = load_config([], [
        f"data.root={tmp_path / 'shards'}", "data.name=npz", "data.batch_size=200", "data.num_workers=0",
        "model.arch=mlp", "model.hidden=[]", f"model.latent_dim={d}", "model.likelihood=gaussian",
        "model.learn_sigma=true", "model.eval_k=0", "optim.lr=0.02", "optim.scheduler=cosine",
        "trainer.max_epochs=100", "trainer.enable_progress_bar=false", "trainer.check_val_every_n_epoch=100",
        "logger.backend=none", "logger.image_every_n_epochs=0", f"run.dir={tmp_path / 'run'}",
    ])
    fit(cfg)
    vae = load_module(tmp_path / "run").vae
    linear = vae.decoder.net[0]
    data = torch.from_numpy(x[:n]).double()
    trained = ppca_log_px(data, linear.weight.detach(), linear.bias.detach(), vae.log_sigma2.exp().item()).mean()
    w_ml, b_ml, s2_ml = ppca_mle(data, d)
    optimum = ppca_log_px(data, w_ml, b_ml, s2_ml).mean()
    print(f"\nmean log p(x): trained linear VAE {trained:.4f}, closed-form ML {optimum:.4f}")
    # The ML solution is the global maximum: the trained model must not exceed it (beyond float
    # round-off) and must come within 0.01 nats per example (a 5-dim Gaussian: ~ -8 nats).
    assert trained <= optimum + 1e-6
    assert optimum - trained < 0.01
    # The encoder can represent the exact posterior, so the ELBO meets log p(x) there too.
    r = evaluate(tmp_path / "run", k=1000, split="train", limit=1000, progress=False)
    assert r["elbo"] <= r["iwae_bound_k1000"] + 1e-3
    assert r["iwae_bound_k1000"] - r["elbo"] < 0.01


def test_log_px_estimators_on_a_linear_gaussian_model():
    # PPCA with orthogonal columns: the exact posterior is a diagonal Gaussian, so q = posterior is
    # expressible and Choice 2 returns log p(x) with zero variance; Choice 1 (prior sampling) is
    # unbiased in p(x) but noisy in log p(x).
    g = torch.Generator().manual_seed(0)
    m, d, s2 = 10, 3, 0.05
    q, _ = torch.linalg.qr(torch.randn(m, d, generator=g, dtype=torch.float64))
    w, b = q * torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64), torch.randn(m, generator=g, dtype=torch.float64)
    x = (torch.randn(6, d, generator=g, dtype=torch.float64) @ w.T + b + s2**0.5 * torch.randn(6, m, generator=g,
                                                                                             dtype=torch.float64))
    exact = ppca_log_px(x, w, b, s2)
    wf, bf, xf = w.float(), b.float(), x.float()

    def log_px_given_z(z):  # log N(x; Wz + b, s2 I), summed over the m dimensions
        return vm.gaussian_log_likelihood(xf, z @ wf.T + bf, torch.tensor(math.log(s2)), event_dims=1)

    mdiag = (wf**2).sum(0) + s2  # M = W^T W + s2 I is diagonal
    mu, logvar = ((xf - bf) @ wf) / mdiag, torch.log(s2 / mdiag).expand(6, d)
    runs = torch.stack([vm.importance_sampled_log_px(mu, logvar, log_px_given_z, k=50, chunk=20, generator=g)
                        for _ in range(20)]).double()
    assert runs.std(0).max() < 1e-3  # float32 round-off only
    torch.testing.assert_close(runs.mean(0), exact, atol=2e-3, rtol=0)
    prior = torch.stack([vm.prior_sampled_log_px(6, d, log_px_given_z, k=5000, chunk=1000, generator=g)
                         for _ in range(20)]).double()
    print(f"\nstd of log p(x) estimates: posterior IS (K=50) {runs.std(0).max():.2g}, "
          f"prior sampling (K=5000) {prior.std(0).mean():.2g}; bias of prior sampling "
          f"{(prior.mean(0) - exact).mean():.3g} nats")
    assert prior.std(0).mean() > 100 * runs.std(0).max()
    # the log of an unbiased estimate of p(x) is biased low (Jensen): no significant positive bias
    bias = prior - exact
    assert bias.mean() < 3 * bias.std() / math.sqrt(bias.numel())
