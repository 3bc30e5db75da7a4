"""The framework-free mathematics (pipeline/vae_math.py) against independent computations."""

import math

import pytest
import torch
from torch import distributions as D

from pipeline import vae_math as vm


def test_kl_closed_form_matches_monte_carlo():
    # Definition 11.17's closed form vs E_q[log q - log p] from 400k samples: 5 standard errors.
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(4, 3, generator=g)
    logvar = torch.randn(4, 3, generator=g) * 0.7
    kl = vm.kl_standard_normal(mu, logvar)
    z = vm.reparameterize(mu, logvar, 400_000, g)
    samples = vm.log_normal_diag(z, mu, logvar) - vm.log_standard_normal(z)
    mc, se = samples.double().mean(0), samples.double().std(0) / math.sqrt(z.shape[0])
    assert torch.all((kl.double() - mc).abs() < 5 * se + 1e-6), (kl, mc, se)
    # and the exact value from torch.distributions
    ref = D.kl_divergence(D.Normal(mu, (0.5 * logvar).exp()), D.Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(kl, ref, rtol=1e-5, atol=1e-5)


def test_log_densities_match_torch_distributions():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 2, (5, 4, 3), generator=g).float()
    logits = torch.randn(7, 5, 4, 3, generator=g) * 5
    ours = vm.bernoulli_log_likelihood(x, logits, event_dims=2)
    ref = D.Bernoulli(logits=logits).log_prob(x.expand_as(logits)).sum((-1, -2))
    assert ours.shape == (7, 5)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-4)

    mean = torch.randn(7, 5, 4, 3, generator=g)
    ours = vm.gaussian_log_likelihood(x, mean, torch.tensor(math.log(0.3)), event_dims=2)
    ref = D.Normal(mean, math.sqrt(0.3)).log_prob(x.expand_as(mean)).sum((-1, -2))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-4)

    z, mu, logvar = torch.randn(3, 6, 2, generator=g), torch.randn(6, 2, generator=g), torch.randn(6, 2, generator=g)
    ref = D.Normal(mu, (0.5 * logvar).exp()).log_prob(z).sum(-1)
    torch.testing.assert_close(vm.log_normal_diag(z, mu, logvar), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vm.log_standard_normal(z), D.Normal(0.0, 1.0).log_prob(z).sum(-1))


def test_bernoulli_from_logits_is_finite_when_saturated():
    # A probability-space BCE would give log(0) = -inf for a confident wrong pixel.
    x = torch.tensor([[1.0, 0.0]])
    ll = vm.bernoulli_log_likelihood(x, torch.tensor([[[-200.0, 200.0]]]), event_dims=1)
    assert torch.isfinite(ll).all() and ll.item() == pytest.approx(-400.0)


def test_logvar_is_bounded():
    out = vm.bound_logvar(torch.tensor([-1e4, 0.0, 1e4]))
    assert out.tolist() == [vm.LOGVAR_MIN, 0.0, vm.LOGVAR_MAX]
    assert torch.isfinite(vm.kl_standard_normal(torch.zeros(1, 3), out[None])).all()


def test_float32_under_autocast():
    # bf16 inputs under CPU autocast: results are float32 and equal the float32 computation of the
    # same (bf16-rounded) inputs to float32 round-off, not bf16's 3 significant digits.
    g = torch.Generator().manual_seed(2)
    mu, logvar = torch.randn(8, 50, generator=g).bfloat16(), torch.randn(8, 50, generator=g).bfloat16()
    log_w = (torch.randn(5000, 8, generator=g) * 30 - 100).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kl = vm.kl_standard_normal(mu, logvar)
        bound = vm.iwae_bound(log_w)
    assert kl.dtype == torch.float32 and bound.dtype == torch.float32
    torch.testing.assert_close(kl, vm.kl_standard_normal(mu.float(), logvar.float()))
    torch.testing.assert_close(bound, torch.logsumexp(log_w.double(), 0).float() - math.log(5000))


def test_elbo_and_iwae_relations():
    g = torch.Generator().manual_seed(3)
    log_w = torch.randn(50, 4, generator=g) * 3
    # L_1 is the single-sample ELBO; L_K >= mean log w (Jensen); L_K of identical weights = that weight.
    torch.testing.assert_close(vm.iwae_bound(log_w[:1]), log_w[0])
    assert torch.all(vm.iwae_bound(log_w) >= log_w.mean(0))
    torch.testing.assert_close(vm.iwae_bound(torch.full((7, 2), -3.0)), torch.full((2,), -3.0))
    # beta-ELBO: mean over K samples of log p(x|z) minus beta KL
    log_px_z, kl = torch.randn(6, 4, generator=g), torch.rand(4, generator=g)
    torch.testing.assert_close(vm.elbo(log_px_z, kl, beta=4.0), log_px_z.mean(0) - 4.0 * kl)


def test_iwae_gradient_is_normalised_weight_average():
    # grad L_K = sum_k w~_k grad log w_k with w~ = softmax(log w) held constant (Burda et al. 2016).
    g = torch.Generator().manual_seed(4)
    theta = torch.randn(3, requires_grad=True)
    feats = torch.randn(10, 3, generator=g)
    log_w = feats @ theta - 0.5 * (feats**2).sum(-1)
    (grad,) = torch.autograd.grad(vm.iwae_bound(log_w[:, None]).sum(), theta, retain_graph=True)
    w_tilde = torch.softmax(log_w.detach(), 0)
    manual = sum(w_tilde[k] * torch.autograd.grad(log_w[k], theta, retain_graph=True)[0] for k in range(10))
    torch.testing.assert_close(grad, manual)


def test_chunked_log_mean_exp_is_exact():
    g = torch.Generator().manual_seed(5)
    log_w = torch.randn(5000, 3, generator=g) * 20
    it = iter(torch.split(log_w, 1))
    chunked = vm.log_mean_exp_chunked(lambda n: torch.cat([next(it) for _ in range(n)]), k=5000, chunk=333)
    torch.testing.assert_close(chunked, torch.logsumexp(log_w, 0) - math.log(5000))


def test_score_function_surrogate_value_and_gradient():
    f = torch.tensor([2.0, 5.0], requires_grad=True)
    log_q = torch.tensor([0.5, -1.0], requires_grad=True)
    out = vm.score_function_surrogate(f, log_q, baseline=1.0)
    torch.testing.assert_close(out, f.detach())  # value is f
    out.sum().backward()
    torch.testing.assert_close(log_q.grad, torch.tensor([1.0, 4.0]))  # (f - b)
    torch.testing.assert_close(f.grad, torch.ones(2))


def test_linear_warmup():
    assert [vm.linear_warmup(s, 10, 4.0) for s in (0, 5, 10, 50)] == [0.0, 2.0, 4.0, 4.0]
    assert vm.linear_warmup(0, 0, 4.0) == 4.0


def test_active_units():
    g = torch.Generator().manual_seed(6)
    mu = torch.cat([torch.randn(1000, 3, generator=g), 1e-3 * torch.randn(1000, 2, generator=g)], dim=1)
    assert vm.active_units(mu) == 3


def test_vae_objective_terms_and_errors():
    g = torch.Generator().manual_seed(7)
    x = torch.randint(0, 2, (4, 6), generator=g).float()
    w = torch.randn(2, 6, generator=g)
    mu, logvar = torch.randn(4, 2, generator=g), torch.zeros(4, 2)

    def log_px_given_z(z):
        return vm.bernoulli_log_likelihood(x, z @ w, event_dims=1)

    torch.manual_seed(0)
    out = vm.vae_objective(mu, logvar, log_px_given_z, objective="iwae", k=5)
    assert set(out) == {"recon", "kl", "elbo", "iwae", "loss"}
    torch.testing.assert_close(out["loss"], -out["iwae"].mean())
    torch.testing.assert_close(out["elbo"], out["recon"] - out["kl"])
    torch.manual_seed(0)
    beta = vm.vae_objective(mu, logvar, log_px_given_z, objective="elbo", k=5, beta=3.0)
    torch.testing.assert_close(beta["loss"], -(beta["recon"] - 3.0 * beta["kl"]).mean())
    with pytest.raises(ValueError, match="model.objective"):
        vm.vae_objective(mu, logvar, log_px_given_z, objective="elbow")
    with pytest.raises(ValueError, match="model.estimator"):
        vm.vae_objective(mu, logvar, log_px_given_z, estimator="magic")
