"""Latent-variable models whose log-likelihood is exact: the yardsticks for the estimators and training.

- Example 11.5: a mixture of three Gaussians in R^2 with a uniform discrete latent.
- Probabilistic PCA (Tipping & Bishop 1999): z ~ N(0, I_d), x|z ~ N(Wz + b, s^2 I_m), so
  p(x) = N(b, WW^T + s^2 I) and the maximum-likelihood (W, b, s^2) is known in closed form.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pipeline.data.sources import GMM_COVS, GMM_MEANS


def gaussian_log_density(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, cov) for x [..., m], float64 via a Cholesky factor."""
    x, mean, cov = x.double(), mean.double(), cov.double()
    chol = torch.linalg.cholesky(cov)
    diff = (x - mean).unsqueeze(-1)
    sol = torch.linalg.solve_triangular(chol, diff, upper=False).squeeze(-1)
    m = x.shape[-1]
    return -0.5 * (sol.pow(2).sum(-1) + m * math.log(2 * math.pi)) - torch.log(torch.diagonal(chol)).sum()


# --- Example 11.5: mixture of three Gaussians -----------------------------------------------------


def gmm_params() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log prior [3], means [3, 2], covariances [3, 2, 2]) of the `gmm` data source."""
    means, covs = torch.as_tensor(np.asarray(GMM_MEANS)), torch.as_tensor(np.asarray(GMM_COVS))
    return torch.full((len(means),), -math.log(len(means)), dtype=torch.float64), means, covs


def gmm_log_px_given_z(x: torch.Tensor) -> torch.Tensor:
    """log p(x | Z = k) for every component: [B, 3]."""
    _, means, covs = gmm_params()
    return torch.stack([gaussian_log_density(x, means[k], covs[k]) for k in range(len(means))], dim=-1)


def gmm_log_px(x: torch.Tensor) -> torch.Tensor:
    """Exact log p(x) = log sum_k p(Z=k) p(x|Z=k): [B]."""
    log_prior, _, _ = gmm_params()
    return torch.logsumexp(gmm_log_px_given_z(x) + log_prior, dim=-1)


def gmm_log_posterior(x: torch.Tensor) -> torch.Tensor:
    """log p(Z=k | x) (Bayes, Concept 11.2): [B, 3]; the optimal proposal of Concept 11.9."""
    log_prior, _, _ = gmm_params()
    joint = gmm_log_px_given_z(x) + log_prior
    return joint - torch.logsumexp(joint, dim=-1, keepdim=True)


# --- probabilistic PCA ------------------------------------------------------------------------------


def ppca_log_px(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, s2: float | torch.Tensor) -> torch.Tensor:
    """Exact log p(x) = log N(x; b, W W^T + s^2 I): [B]."""
    w = w.double()
    cov = w @ w.T + torch.as_tensor(s2, dtype=torch.float64) * torch.eye(w.shape[0], dtype=torch.float64)
    return gaussian_log_density(x, b, cov)


def ppca_mle(x: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Closed-form maximum-likelihood (W, b, s^2) for latent size d (Tipping & Bishop 1999):
    b = sample mean, s^2 = mean of the m - d smallest eigenvalues of the sample covariance,
    W = U_d (Lambda_d - s^2 I)^{1/2} (up to a rotation of the latent space)."""
    x = x.double()
    b = x.mean(0)
    cov = (x - b).T @ (x - b) / x.shape[0]
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    evals, evecs = evals.flip(0), evecs.flip(1)
    s2 = float(evals[d:].mean())
    w = evecs[:, :d] * torch.sqrt(torch.clamp(evals[:d] - s2, min=0.0))
    return w, b, s2
