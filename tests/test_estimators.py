"""Reparameterisation (Concepts 11.18, 11.21) and score-function (Concept 11.22) gradients agree in
expectation; the score function's variance is far larger. R independent replicates of one example
each get their own copy of the encoder outputs (mu, logvar), so one backward pass yields R
independent gradient samples."""

import pytest
import torch

from pipeline import vae_math as vm

R = 20_000  # replicates: the standard error of a mean gradient is sd / sqrt(R)


def gradient_samples(estimator: str, objective: str, k: int, seed: int = 0, beta: float = 1.0):
    g = torch.Generator().manual_seed(123)
    d, m = 2, 8
    w, c = torch.randn(d, m, generator=g), torch.randn(m, generator=g)
    x = (torch.rand(m, generator=g) < 0.5).float().expand(R, m)
    mu = torch.tensor([0.3, -0.5]).repeat(R, 1).requires_grad_()
    logvar = torch.tensor([-0.4, 0.2]).repeat(R, 1).requires_grad_()

    def log_px_given_z(z):
        return vm.bernoulli_log_likelihood(x, z @ w + c, event_dims=1)

    torch.manual_seed(seed)
    out = vm.vae_objective(mu, logvar, log_px_given_z, objective=objective, k=k, estimator=estimator, beta=beta)
    out["loss"].backward()
    # loss = -mean over replicates, so each replicate's gradient of its objective is -R * grad
    return -R * torch.cat([mu.grad, logvar.grad], dim=1).double()


@pytest.mark.parametrize("objective,k", [("elbo", 1), ("elbo", 4), ("iwae", 4)])
def test_score_function_matches_reparameterisation_in_expectation(objective, k):
    rep = gradient_samples("reparam", objective, k, seed=1)
    sco = gradient_samples("score", objective, k, seed=2)
    se = (rep.var(0) / R + sco.var(0) / R).sqrt()
    z = (rep.mean(0) - sco.mean(0)) / se
    # Both are unbiased: the difference of means is N(0, 1) in units of its standard error.
    # 4.5 standard errors over 4 coordinates x 3 cases: a false alarm has probability ~1e-4.
    assert torch.all(z.abs() < 4.5), (rep.mean(0), sco.mean(0), se)
    ratio = (sco.var(0) / rep.var(0)).mean().item()
    print(f"\n{objective} K={k}: gradient variance score/reparam = {ratio:.1f}x "
          f"(mean grad reparam {rep.mean(0).numpy().round(3)}, score {sco.mean(0).numpy().round(3)})")
    assert ratio > 1.0  # the log-derivative estimator is the noisier one, even with a baseline


def test_baseline_reduces_score_function_variance():
    # The same estimator with the baseline removed (b = 0) is still unbiased but much noisier.
    g = torch.Generator().manual_seed(5)
    w = torch.randn(2, 8, generator=g)
    x = (torch.rand(8, generator=g) < 0.5).float().expand(R, 8)
    mu = torch.zeros(R, 2, requires_grad=True)
    logvar = torch.zeros(R, 2)
    z = vm.reparameterize(mu.detach(), logvar, 1, g)
    f = vm.bernoulli_log_likelihood(x, z @ w, event_dims=1)
    log_q = vm.log_normal_diag(z, mu, logvar)
    grads = {}
    for name, b in {"none": 0.0, "mean_z": vm.bernoulli_log_likelihood(x, mu.detach()[None] @ w, 1)}.items():
        (grad,) = torch.autograd.grad(vm.score_function_surrogate(f, log_q, b).sum(), mu, retain_graph=True)
        grads[name] = grad
    ratio = (grads["none"].var(0) / grads["mean_z"].var(0)).mean().item()
    print(f"\nscore-function variance without / with baseline: {ratio:.1f}x")
    assert ratio > 2.0


@pytest.mark.parametrize("estimator,objective,k,beta", [("stl", "elbo", 1, 1.0), ("stl", "elbo", 4, 1.0),
                                                        ("stl", "elbo", 4, 0.3), ("dreg", "iwae", 4, 1.0),
                                                        ("dreg", "iwae", 16, 1.0), ("dreg", "iwae", 4, 0.3)])
def test_path_derivative_estimators_are_unbiased_where_theory_says(estimator, objective, k, beta):
    # STL is unbiased for the ELBO (the dropped score term has mean zero); DReG for the IWAE bound L_K
    # at every K (Tucker et al. 2018, eq. 7), also with beta != 1 weighing log p(z) - log q (a beta
    # warm-up starts at 0). Same test as above: difference of means in standard errors.
    rep = gradient_samples("reparam", objective, k, seed=1, beta=beta)
    new = gradient_samples(estimator, objective, k, seed=2, beta=beta)
    se = (rep.var(0) / R + new.var(0) / R).sqrt()
    z = (rep.mean(0) - new.mean(0)) / se
    assert torch.all(z.abs() < 4.5), (rep.mean(0), new.mean(0), se)
    ratio = (new.var(0) / rep.var(0)).mean().item()
    print(f"\n{estimator} {objective} K={k}: encoder gradient variance {estimator}/reparam = {ratio:.2f}")
    if estimator == "dreg":
        assert ratio < 1.0  # the reason to use it: lower variance than the standard IWAE gradient


def test_dreg_keeps_the_decoder_gradient_and_the_bound_value():
    # DReG changes only the encoder's gradient: decoder gradients and the loss value are the standard ones.
    g = torch.Generator().manual_seed(7)
    x = (torch.rand(6, 8, generator=g) < 0.5).float()
    w = torch.randn(2, 8, generator=g, requires_grad=True)
    mu, logvar = torch.randn(6, 2, generator=g), torch.randn(6, 2, generator=g) * 0.3
    results = {}
    for est in ("reparam", "dreg"):
        w.grad = None
        out = vm.vae_objective(mu, logvar, lambda z: vm.bernoulli_log_likelihood(x, z @ w, 1), objective="iwae", k=5,
                               estimator=est, generator=torch.Generator().manual_seed(1))
        out["loss"].backward()
        results[est] = (out["loss"].item(), w.grad.clone(), out["iwae"])
    assert results["dreg"][0] == pytest.approx(results["reparam"][0], rel=1e-6)
    torch.testing.assert_close(results["dreg"][1], results["reparam"][1])
    torch.testing.assert_close(results["dreg"][2], results["reparam"][2])
