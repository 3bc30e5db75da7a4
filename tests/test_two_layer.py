"""The IWAE paper's two-stochastic-layer model: its log-weight against linear-Gaussian models whose
log p(x) is closed-form, the network's hierarchy, and the whole pipeline (fit, eval, sample,
diagnose) on it; also the paper's initialisation (model.init=iwae)."""

import json
import math

import pytest
import torch
from torch import nn

from pipeline import vae_math
from pipeline.config import ConfigError, load_config
from pipeline.models.components.vae import VAE, TwoLayerVAE, build_vae, output_layer
from tests.conftest import FAST, vaepipe


def diagonal_linear_gaussian(d: int, seed: int = 0) -> dict:
    """Per coordinate: z2 ~ N(0, 1), z1 | z2 ~ N(a z2 + c, s1^2), x | z1 ~ N(b z1 + e, s0^2)."""
    g = torch.Generator().manual_seed(seed)
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(d, generator=g, dtype=torch.float64)  # noqa: E731
    return {"a": u(0.5, 2.0), "c": u(-1.0, 1.0), "s1": u(0.3, 1.0), "b": u(0.5, 2.0), "e": u(-1.0, 1.0),
            "s0": torch.full((d,), 0.4, dtype=torch.float64)}


def exact_posterior(m: dict) -> dict:
    """q(z1|x) = p(z1|x) and q(z2|z1) = p(z2|z1): linear maps with constant variances."""
    v1 = m["a"] ** 2 + m["s1"] ** 2  # marginal variance of z1
    prec1 = 1 / v1 + m["b"] ** 2 / m["s0"] ** 2
    prec2 = 1 + m["a"] ** 2 / m["s1"] ** 2
    return {"q1_w": m["b"] / m["s0"] ** 2 / prec1, "q1_b": (m["c"] / v1 - m["b"] * m["e"] / m["s0"] ** 2) / prec1,
            "q1_logvar": -torch.log(prec1), "q2_w": m["a"] / m["s1"] ** 2 / prec2,
            "q2_b": -m["a"] * m["c"] / m["s1"] ** 2 / prec2, "q2_logvar": -torch.log(prec2)}


def closed_form_log_px(x: torch.Tensor, m: dict) -> torch.Tensor:
    var = m["b"] ** 2 * (m["a"] ** 2 + m["s1"] ** 2) + m["s0"] ** 2
    return torch.distributions.Normal(m["b"] * m["c"] + m["e"], var.sqrt()).log_prob(x.double()).sum(-1)


def test_log_weight_with_the_exact_posterior_is_log_px_for_every_sample():
    # With q = the true posterior p(z1, z2|x) every importance weight equals p(x): the hierarchy's
    # log-weight log p(x|z1) + log p(z1|z2) + log p(z2) - log q(z1|x) - log q(z2|z1) must then be
    # the closed-form log p(x) whatever z was drawn. float32 arithmetic over 6 dims: 1e-4 nats.
    d, n, k = 6, 5, 64
    m = diagonal_linear_gaussian(d)
    q = exact_posterior(m)
    x = torch.randn(n, d, dtype=torch.float64) * 2
    g = torch.Generator().manual_seed(1)
    mu1, lv1 = (q["q1_w"] * x + q["q1_b"]).float(), q["q1_logvar"].expand(n, d).float()
    z1 = vae_math.reparameterize(mu1, lv1, k, g)
    mu2, lv2 = (q["q2_w"] * z1 + q["q2_b"]).float(), q["q2_logvar"].expand(k, n, d).float()
    z2 = mu2 + lv2.mul(0.5).exp() * torch.randn(z1.shape, generator=g)
    p1 = ((m["a"] * z2 + m["c"]).float(), (2 * m["s1"].log()).expand(k, n, d).float())
    log_px_z1 = torch.distributions.Normal(m["b"] * z1 + m["e"], m["s0"]).log_prob(x).sum(-1).float()
    parts = vae_math.hierarchical_log_terms(log_px_z1, z1, z2, (mu1, lv1), (mu2, lv2), p1)
    log_w = parts[0] + parts[1] - parts[2]
    expected = closed_form_log_px(x, m).float().expand(k, n)
    torch.testing.assert_close(log_w, expected, atol=1e-4, rtol=0)
    assert log_w.std(0).max() < 1e-4  # no variance at all: the proposal is exact


def test_importance_sampled_log_px_of_a_dense_two_layer_model_converges_to_the_closed_form():
    # Dense matrices (correlated posteriors) and a diagonal q that is only close: the ELBO is below
    # log p(x), L_K rises with K, and L_20000 is within 0.05 nats of the closed form (this model's
    # IS estimate at K = 20000 has a spread ~0.01 nats, measured over seeds).
    torch.manual_seed(0)
    dx, d1, d2, n = 3, 2, 2, 4
    A, c, S1 = torch.randn(d1, d2, dtype=torch.float64), torch.randn(d1, dtype=torch.float64), 0.5
    B, e, S0 = torch.randn(dx, d1, dtype=torch.float64), torch.randn(dx, dtype=torch.float64), 0.6
    cov_z1 = A @ A.T + S1**2 * torch.eye(d1, dtype=torch.float64)
    cov_x = B @ cov_z1 @ B.T + S0**2 * torch.eye(dx, dtype=torch.float64)
    px = torch.distributions.MultivariateNormal(B @ c + e, cov_x)
    x = px.sample((n,))
    # q(z1|x): the exact posterior's mean with a diagonal of its covariance; q(z2|z1) likewise.
    post1_cov = torch.linalg.inv(torch.linalg.inv(cov_z1) + B.T @ B / S0**2)
    post1_mu = (post1_cov @ (torch.linalg.inv(cov_z1) @ c[:, None] + B.T @ (x - e).T / S0**2)).T
    post2_cov = torch.linalg.inv(torch.eye(d2, dtype=torch.float64) + A.T @ A / S1**2)

    def log_w(k: int, g: torch.Generator) -> torch.Tensor:
        mu1, lv1 = post1_mu.float(), post1_cov.diagonal().log().expand(n, d1).float() + 0.2
        z1 = vae_math.reparameterize(mu1, lv1, k, g)
        mu2 = ((z1.double() - c) @ A / S1**2 @ post2_cov.T).float()
        lv2 = post2_cov.diagonal().log().expand(k, n, d2).float() + 0.2
        z2 = mu2 + lv2.mul(0.5).exp() * torch.randn(z1.shape[:-1] + (d2,), generator=g)
        p1 = ((z2.double() @ A.T + c).float(), torch.full((k, n, d1), 2 * math.log(S1)))
        lik = torch.distributions.MultivariateNormal(z1.double() @ B.T + e, S0**2 * torch.eye(dx, dtype=torch.float64))
        parts = vae_math.hierarchical_log_terms(lik.log_prob(x).float(), z1, z2, (mu1, lv1), (mu2, lv2), p1)
        return parts[0] + parts[1] - parts[2]

    g = torch.Generator().manual_seed(0)
    exact = px.log_prob(x).float()
    lw = log_w(20000, g)
    # E[L_5] from 4000 disjoint groups of 5 draws: ELBO < E[L_5] < L_20000 (Burda et al., Theorem 1).
    elbo, l5, l20000 = lw.mean(0), vae_math.iwae_bound(lw.view(5, 4000, n)).mean(0), vae_math.iwae_bound(lw)
    assert (elbo < exact).all()
    assert (l5 > elbo).all() and (l20000 > l5).all()
    torch.testing.assert_close(l20000, exact, atol=0.05, rtol=0)


def linear_two_layer_network(m: dict, q: dict, d: int) -> TwoLayerVAE:
    """A TwoLayerVAE with no hidden layers and a Gaussian decoder, given the weights of the
    diagonal linear-Gaussian model `m` and its exact posterior `q`."""
    vae = TwoLayerVAE((d,), latent_dim=d, latent1_dim=d, hidden=[], hidden2=[], likelihood="gaussian",
                      sigma=float(m["s0"][0]))
    diag = lambda v: torch.diag(v.float())  # noqa: E731
    zero = torch.zeros(d, d)
    with torch.no_grad():
        for layer, w, b, logvar in [(vae.encoder.net[0], q["q1_w"], q["q1_b"], q["q1_logvar"]),
                                    (vae.q2.net[0], q["q2_w"], q["q2_b"], q["q2_logvar"]),
                                    (vae.p1.net[0], m["a"], m["c"], 2 * m["s1"].log())]:
            layer.weight.copy_(torch.cat([diag(w), zero]))  # mean rows, then log-variance rows (constant)
            layer.bias.copy_(torch.cat([b.float(), logvar.float()]))
        vae.decoder.net[0].weight.copy_(diag(m["b"]))
        vae.decoder.net[0].bias.copy_(m["e"].float())
    return vae


def test_two_layer_network_samples_and_weighs_its_hierarchy_exactly():
    # The network's own ancestral sampling, layers and likelihood on an exactly solvable case: every
    # log-weight is log p(x), so the objective's ELBO, L_K and `vaepipe eval`'s estimator all are.
    d, n = 5, 7
    m = diagonal_linear_gaussian(d, seed=3)
    vae = linear_two_layer_network(m, exact_posterior(m), d)
    x = torch.randn(n, d) * 2
    expected = closed_form_log_px(x, m).float()
    g = torch.Generator().manual_seed(0)
    lw = vae.log_weights(x, 100, g)
    assert lw.shape == (100, n)
    torch.testing.assert_close(lw, expected.expand(100, n), atol=2e-4, rtol=0)
    for objective, key in (("elbo", "elbo"), ("iwae", "iwae")):
        terms, mu1, _ = vae.objective(x, objective=objective, k=5, generator=g)
        torch.testing.assert_close(terms[key], expected, atol=2e-4, rtol=0)
        torch.testing.assert_close(terms["loss"], -expected.mean(), atol=2e-4, rtol=0)
        assert mu1.shape == (n, d)
    # A wrong posterior is strictly worse: the ELBO falls below log p(x).
    with torch.no_grad():
        vae.q2.net[0].bias[:d] += 0.5
    terms, _, _ = vae.objective(x, k=200, generator=g)
    assert (terms["elbo"] < expected - 1e-3).all()


def test_two_layer_paper_architecture_shapes_and_gradients():
    vae = build_vae(load_config([], ["model.arch=mlp", "model.stochastic_layers=2", "model.latent_dim=50",
                                     "model.activation=tanh", "model.init=iwae"]).model, (28, 28))
    linear = lambda mod: [(l.in_features, l.out_features) for l in mod.modules() if isinstance(l, nn.Linear)]  # noqa: E731
    assert linear(vae.encoder) == [(784, 200), (200, 200), (200, 200)]  # q(z1|x): mean and log-variance of 100
    assert linear(vae.q2) == [(100, 100), (100, 100), (100, 100)]  # q(z2|z1): 50 + 50
    assert linear(vae.p1) == [(50, 100), (100, 100), (100, 200)]  # p(z1|z2)
    assert linear(vae.decoder) == [(100, 200), (200, 200), (200, 784)]  # p(x|z1)
    assert vae.latent_dim == 50 and vae.noise_dim == 150
    x = torch.bernoulli(torch.full((4, 28, 28), 0.3))
    terms, _, _ = vae.objective(x, objective="iwae", k=3, generator=torch.Generator().manual_seed(0))
    terms["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vae.parameters())
    assert vae.encode(x)[0].shape == (4, 50) and vae.mean(torch.randn(6, 50)).shape == (6, 28, 28)
    # The same noise, passed in (the compiled step's way), gives the same terms.
    eps = torch.randn(3, 4, 150, generator=torch.Generator().manual_seed(1))
    a, _, _ = vae.objective(x, objective="iwae", k=3, eps=eps)
    b, _, _ = vae.objective(x, objective="iwae", k=3, eps=eps.clone())
    torch.testing.assert_close(a["loss"], b["loss"])


@pytest.mark.parametrize("overrides, match", [
    (["model.stochastic_layers=2", "model.arch=conv"], "model.arch=mlp"),
    (["model.stochastic_layers=2", "model.arch=mlp", "model.estimator=dreg"], "reparam or stl"),
    (["model.stochastic_layers=3"], "choose 1 or 2"),
    (["model.init=glorot"], "model.init"),
])
def test_bad_two_layer_configs_are_refused(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config([], overrides)


def test_iwae_initialisation_glorot_and_zero_biases():
    torch.manual_seed(0)
    vae = VAE((28, 28), arch="mlp", hidden=[200, 200], latent_dim=50, activation="tanh", init="iwae")
    for layer in vae.modules():
        if isinstance(layer, nn.Linear):
            bound = math.sqrt(6 / (layer.in_features + layer.out_features))
            assert layer.weight.abs().max() <= bound
            assert layer.weight.abs().max() > 0.95 * bound  # uniform over the whole range, not PyTorch's
            assert torch.all(layer.bias == 0)
    mean = torch.rand(28, 28)
    mean[0, 0] = 0.0
    vae.set_output_bias(mean)
    bias = output_layer(vae.decoder).bias
    torch.testing.assert_close(bias, torch.logit(mean.reshape(-1).clamp(0.001, 0.999)))


def test_two_layer_through_fit_eval_sample_and_diagnose(sprites_root, tmp_path):
    # The whole pipeline on the two-layer model (real shards, real subprocesses), with the paper's
    # initialisation: a compiled-off CPU fit, then eval / sample / diagnose on its checkpoint.
    run = tmp_path / "run"
    vaepipe("fit", *FAST, "data.name=sprites", f"data.root={sprites_root}", "model.arch=mlp",
            "model.stochastic_layers=2", "model.hidden=[32]", "model.latent1_dim=8", "model.hidden2=[16]",
            "model.latent_dim=4", "model.objective=iwae", "model.k=3", "model.eval_k=5", "model.init=iwae",
            "trainer.max_epochs=2", "data.batch_size=64", f"run.dir={run}", "run.test=false")
    ckpt = run / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert state["vae.p1.net.2.weight"].shape == (16, 16) and state["vae.q2.net.2.weight"].shape == (8, 16)
    # The output bias started at the logit of the training mean and moved by Adam steps of <= lr each
    # (20 steps at 1e-3: at most 0.02).
    from pipeline.data.location import load_manifest
    from pipeline.data.resident import pixel_mean

    start = torch.logit(pixel_mean(str(sprites_root), load_manifest(sprites_root)).reshape(-1).clamp(0.001, 0.999))
    assert (state["vae.decoder.net.2.bias"] - start).abs().max() <= 0.02 + 1e-6
    out = vaepipe("eval", ckpt, "--k", "50", "--limit", "64", "--json", "--compile")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["examples"] == 64 and math.isfinite(result["nll"])
    assert result["compiled"] is False  # ancestral sampling through two layers runs eagerly, and says so
    assert result["elbo"] <= result["iwae_bound_k50"] + 1e-3  # L_50 >= its own draws' mean log-weight
    vaepipe("sample", ckpt, "--out", tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 0 and (tmp_path / "s_recon.png").stat().st_size > 0
    diag = vaepipe("diagnose", "gradients", ckpt, "--samples", "3", "--batch-size", "16")
    assert "reparam" in diag.stdout and "stl" in diag.stdout and "dreg" not in diag.stdout
    amort = vaepipe("diagnose", "amortization", ckpt, "--limit", "16", check=False)
    assert amort.returncode != 0 and "2 stochastic layers" in amort.stderr
