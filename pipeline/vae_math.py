"""The mathematics of the VAE family, framework-free (pure torch functions).

Notation follows ../shared/spec/MATH.md (concept numbers are the lecture notes'):
x data, z latent, q(z|x) = N(mu, diag exp(logvar)) the encoder, p(z) = N(0, I) the prior,
p(x|z) the decoder. Shapes: a batch is [B, ...]; K latent samples per example are [K, B, d];
per-example quantities are [B] (summed over pixels and latent dimensions); the loss is their mean.

Every function here computes in float32 with autocast disabled: bf16/fp16 logsumexp and KL lose
whole nats at the magnitudes a 784-pixel likelihood reaches (MATH.md, "Numerics that matter").
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.nn.functional as F

LOG_2PI = math.log(2.0 * math.pi)
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # exp() stays finite and positive in float32


def float32(fn):
    """Run `fn` with autocast off and its floating tensor arguments cast to float32."""

    def cast(a):
        return a.float() if torch.is_tensor(a) and a.is_floating_point() else a

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = next((a.device.type for a in args if torch.is_tensor(a)), "cpu")
        with torch.autocast(device_type=device, enabled=False):
            return fn(*[cast(a) for a in args], **{k: cast(v) for k, v in kwargs.items()})

    return wrapper


def sum_event(t: torch.Tensor, event_dims: int) -> torch.Tensor:
    """Sum the trailing `event_dims` dimensions (pixels, latents): one number per example."""
    return t.flatten(start_dim=t.dim() - event_dims).sum(-1) if event_dims else t


# --- distributions -------------------------------------------------------------------------------


def bound_logvar(logvar: torch.Tensor) -> torch.Tensor:
    """Clamp a log-variance to [LOGVAR_MIN, LOGVAR_MAX] before anything exponentiates it."""
    return logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)


@float32
def kl_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag e^logvar) || N(0, I)) in closed form (Definition 11.17), summed over latents.

    1/2 (tr Sigma + ||mu||^2 - d - log det Sigma)."""
    return 0.5 * (logvar.exp() + mu.pow(2) - 1.0 - logvar).sum(-1)


@float32
def log_normal_diag(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag e^logvar), summed over the last dimension."""
    return -0.5 * (LOG_2PI + logvar + (z - mu).pow(2) * torch.exp(-logvar)).sum(-1)


@float32
def log_standard_normal(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I), summed over the last dimension: the prior p(z)."""
    return -0.5 * (LOG_2PI + z.pow(2)).sum(-1)


@float32
def bernoulli_log_likelihood(x: torch.Tensor, logits: torch.Tensor, event_dims: int,
                             batch_first: bool = False) -> torch.Tensor:
    """log Bernoulli(x; logits), from logits (stable for saturated pixels), summed over pixels.

    `x` broadcasts against `logits` (x [B, ...], logits [K, B, ...], or [B, K, ...] with
    batch_first=True, the layout in which the dot product below needs no copy of the logits).
    log p = x l - softplus(l) per pixel: summed as x . l (a batched dot product, no [K, B, D]
    temporary for x) minus the sum of softplus(l), about half the time of
    binary_cross_entropy_with_logits on an expanded x, which dominates K = 5000 evaluation."""
    lead = logits.shape[: logits.dim() - event_dims]
    flat = logits.reshape(*lead, -1)
    xf = x.reshape(*x.shape[: x.dim() - event_dims], -1).to(flat.dtype)
    if batch_first:  # logits [B, K, D], x [B, D]
        x_dot_l = torch.bmm(flat, xf.unsqueeze(-1)).squeeze(-1)  # [B, K]
    elif flat.dim() == 3 and xf.shape == flat.shape[1:]:  # logits [K, B, D], x [B, D]
        x_dot_l = torch.einsum("kbd,bd->kb", flat, xf)
    else:
        x_dot_l = (flat * xf).sum(-1)
    return x_dot_l - F.softplus(flat).sum(-1)


@float32
def gaussian_log_likelihood(
    x: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor, event_dims: int
) -> torch.Tensor:
    """log N(x; mean, e^logvar I) summed over pixels (Concept 11.20: -||x - f(z)||^2 / 2 sigma^2 + c)."""
    logvar = torch.as_tensor(logvar, dtype=mean.dtype, device=mean.device)
    ll = -0.5 * (LOG_2PI + logvar + (x - mean).pow(2) * torch.exp(-logvar))
    return sum_event(ll.expand_as(mean), event_dims)


# --- 8-bit pixels: discretised likelihoods (data in [-1, 1], 256 bins of width 2/255) -------------
# The bin of x is [x - 1/255, x + 1/255]; the lowest (x = -1) is open below and the highest (x = 1)
# open above, so the 256 probabilities of a pixel sum to 1 exactly (Kingma et al. 2016, IAF;
# Salimans et al. 2017, PixelCNN++). -log p(x) is then a code length: bits/dim is comparable.

PIXEL_HALF_BIN = 1.0 / 255.0
LOG_SCALE_MIN, LOG_SCALE_MAX = -7.0, 7.0  # PixelCNN++'s lower bound; above e^7 a pixel is uniform


def to_symmetric(x01: torch.Tensor) -> torch.Tensor:
    """Pixels k/255 in [0, 1] -> the bin centres 2k/255 - 1 in [-1, 1] the discretised likelihoods use."""
    return x01 * 2.0 - 1.0


def bin_edges(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(k, lower edge, upper edge) of the bins of x: k = 0..255 and the edges 2(k - 128)/255,
    2(k - 127)/255, each computed from the integer k, so that neighbouring bins share one edge to
    the bit (x +- 1/255 in float32 leaves gaps of ~6e-8, 6% of the narrowest scale's bin)."""
    k = torch.round((x + 1.0) * 127.5).clamp(0, 255)
    return k, (k - 128.0) * (2.0 / 255.0), (k - 127.0) * (2.0 / 255.0)


def _open_edges(k: torch.Tensor, lowest: torch.Tensor, highest: torch.Tensor, middle: torch.Tensor) -> torch.Tensor:
    return torch.where(k == 0, lowest, torch.where(k == 255, highest, middle))


@float32
def discretized_logistic_log_prob(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(bin of x) per element under Logistic(mean, e^log_scale) cut into the 256 bins.

    P = sigmoid(u) - sigmoid(l) with u, l the bin's edges in standard units, computed as
    log sigmoid(u) + log sigmoid(-l) + log(1 - e^(l - u)), an identity without cancellation: exact
    in float32 for a pixel far in either tail, where the difference of two sigmoids is 0 - 0."""
    log_scale = log_scale.clamp(LOG_SCALE_MIN, LOG_SCALE_MAX)
    inv_s = torch.exp(-log_scale)
    k, low, high = bin_edges(x)
    upper, lower = (high - mean) * inv_s, (low - mean) * inv_s
    log_cdf_upper, log_sf_lower = F.logsigmoid(upper), F.logsigmoid(-lower)
    middle = log_cdf_upper + log_sf_lower + torch.log(-torch.expm1(-2.0 * PIXEL_HALF_BIN * inv_s))
    return _open_edges(k, log_cdf_upper, log_sf_lower, middle)


@float32
def discretized_gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(bin of x) per element under N(mean, e^(2 log_scale)) cut into the 256 bins.

    Phi(u) - Phi(l) is taken on the side of the mean where both tails are small (Phi(-l) - Phi(-u)
    above it) through log Phi, so it keeps its digits far from the mean; a bin much narrower than
    the standard deviation (width < 1e-3 in standard units) is density x width (error O(width^2)).
    Computed in float64 and returned in float32: log Phi's gradient cancels two large terms, which
    float32 loses a few hundred standard deviations out (NaN gradients at the smallest scale)."""
    out_dtype = torch.promote_types(x.dtype, torch.float32)
    inner = torch.float32 if x.device.type == "mps" else torch.float64  # MPS has no float64
    x, mean, log_scale = x.to(inner), mean.to(inner), log_scale.to(inner).clamp(LOG_SCALE_MIN, LOG_SCALE_MAX)
    inv_s = torch.exp(-log_scale)
    k, low, high = bin_edges(x)
    upper, lower = (high - mean) * inv_s, (low - mean) * inv_s
    log_cdf_upper, log_sf_lower = torch.special.log_ndtr(upper), torch.special.log_ndtr(-lower)
    above = x > mean
    a, b = torch.where(above, -lower, upper), torch.where(above, -upper, lower)  # Phi(a) - Phi(b), a > b
    log_a, log_b = torch.special.log_ndtr(a), torch.special.log_ndtr(b)
    width = 2.0 * PIXEL_HALF_BIN * inv_s
    narrow = width < 1e-3
    by_cdf = log_a + torch.log(-torch.expm1((log_b - log_a).clamp(max=-torch.finfo(inner).tiny)))
    by_density = -0.5 * (LOG_2PI + ((x - mean) * inv_s).pow(2)) + torch.log(width)
    return _open_edges(k, log_cdf_upper, log_sf_lower, torch.where(narrow, by_density, by_cdf)).to(out_dtype)


def mixture_param_count(mixtures: int, channels: int) -> int:
    """Numbers per pixel of a mixture of `mixtures` discretised logistics over `channels` colours:
    weights, means, log-scales and the coupling coefficients of each channel on the earlier ones."""
    return mixtures * (1 + 2 * channels + channels * (channels - 1) // 2)


def split_mixture_params(params: torch.Tensor, mixtures: int, channels: int):
    """params [..., P, H, W] -> (logits [..., M, H, W], means, log_scales [..., M, C, H, W],
    coefficients [..., M, C(C-1)/2, H, W] in (-1, 1))."""
    m, c = mixtures, channels
    logits, means, log_scales, coeffs = params.split([m, m * c, m * c, m * c * (c - 1) // 2], dim=-3)
    return logits, means.unflatten(-3, (m, c)), log_scales.unflatten(-3, (m, c)), \
        torch.tanh(coeffs).unflatten(-3, (m, c * (c - 1) // 2))


def coupled_means(means: torch.Tensor, coeffs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """PixelCNN++'s channel coupling: channel i's mean is its own plus sum_{j<i} c_ij x_j, so one
    component models the colours of a pixel jointly (red, then green given red, then blue).
    means [..., M, C, H, W], coeffs [..., M, C(C-1)/2, H, W], x [..., 1, C, H, W]."""
    means = means.expand(torch.broadcast_shapes(means.shape, x.shape))  # one parameter set for a batch of x
    out, pair = [means[..., 0, :, :]], 0
    for i in range(1, means.shape[-3]):
        mean_i = means[..., i, :, :]
        for j in range(i):
            mean_i = mean_i + coeffs[..., pair, :, :] * x[..., j, :, :]
            pair += 1
        out.append(mean_i)
    return torch.stack(out, dim=-3)


@float32
def discretized_logistic_mixture_log_prob(x: torch.Tensor, params: torch.Tensor, mixtures: int) -> torch.Tensor:
    """log p of each pixel (all its channels at once) under PixelCNN++'s mixture of discretised
    logistics, [..., H, W]: log sum_m pi_m prod_c P(x_c | m, x_<c). x [..., C, H, W] in [-1, 1];
    params [..., mixture_param_count(M, C), H, W] (split_mixture_params' layout)."""
    logits, means, log_scales, coeffs = split_mixture_params(params, mixtures, x.shape[-3])
    xm = x.unsqueeze(-4)  # [..., 1, C, H, W]
    log_bins = discretized_logistic_log_prob(xm, coupled_means(means, coeffs, xm), log_scales).sum(-3)
    return torch.logsumexp(F.log_softmax(logits, dim=-3) + log_bins, dim=-3)


def bits_per_dim(log_px: torch.Tensor | float, dims: int) -> torch.Tensor | float:
    """-log p(x) / (D ln 2): the code length per pixel-channel of a discrete likelihood, in bits.
    (A uniform distribution over 256 values is 8.)"""
    return -log_px / (dims * math.log(2.0))


def reparameterize(
    mu: torch.Tensor, logvar: torch.Tensor, k: int = 1, generator: torch.Generator | None = None,
    eps: torch.Tensor | None = None,
) -> torch.Tensor:
    """z = mu + sigma * eps, eps ~ N(0, I) (Concepts 11.18, 11.21); returns [K, B, d]. `eps` [K, B, d]
    drawn by the caller replaces the draw (a compiled step takes its noise as an input)."""
    if eps is None:
        eps = torch.randn((k, *mu.shape), generator=generator, device=mu.device, dtype=torch.float32)
    return mu.float() + torch.exp(0.5 * logvar.float()) * eps


# --- objectives ----------------------------------------------------------------------------------


@float32
def elbo(log_px_z: torch.Tensor, kl: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """(beta-)ELBO per example from K samples: mean_k log p(x|z_k) - beta KL (Def. 11.13, Concept 11.25).

    log_px_z: [K, B]; kl: [B] (closed form). beta = 1 is the VAE's ELBO."""
    return log_px_z.mean(0) - beta * kl


@float32
def log_importance_weights(
    log_px_z: torch.Tensor, z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor
) -> torch.Tensor:
    """log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x), shape [K, B] (Concepts 11.7, 11.9)."""
    return log_px_z + log_standard_normal(z) - log_normal_diag(z, mu, logvar)


@float32
def iwae_bound(log_w: torch.Tensor) -> torch.Tensor:
    """L_K = log (1/K) sum_k w_k per example, via logsumexp over dim 0 (Concept 11.7).

    Autograd through logsumexp gives sum_k w~_k grad log w_k with w~ = softmax(log w): the
    normalised weights enter as constants, which is the IWAE gradient of Burda et al. (2016)."""
    return torch.logsumexp(log_w, dim=0) - math.log(log_w.shape[0])


@float32
def score_function_surrogate(
    f: torch.Tensor, log_q: torch.Tensor, baseline: torch.Tensor | float = 0.0
) -> torch.Tensor:
    """Surrogate whose gradient is the log-derivative estimator (Concept 11.22).

    f: the per-sample objective computed at z sampled *without* gradient; it may still depend on
    the parameters directly (through log q or the decoder). log_q: log q(z|x) of those z.
    grad[(f - b) log q + f] = (f - b) grad log q + grad f, unbiased for grad E_q[f] whenever the
    baseline b does not depend on z. Its value equals f (the first term is zero-valued)."""
    advantage = (f - baseline).detach()
    return advantage * (log_q - log_q.detach()) + f


def linear_warmup(step: int, warmup_steps: int, final: float) -> float:
    """Linear warm-up from 0 to `final` over `warmup_steps` (beta annealing); `final` once done."""
    if warmup_steps <= 0:
        return final
    return final * min(1.0, step / warmup_steps)


ESTIMATORS = ("reparam", "score", "stl", "dreg")


def vae_objective(
    mu: torch.Tensor, logvar: torch.Tensor, log_px_given_z: "LogLikelihood", *, objective: str = "elbo",
    k: int = 1, beta: float = 1.0, estimator: str = "reparam", generator: torch.Generator | None = None,
    score_baseline: bool = True, eps: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The training objective of the VAE family for one batch, and the terms worth logging.

    objective: "elbo" (mean of K ELBOs, beta-weighted KL) or "iwae" (L_K; beta weighs log p(z) - log q).
    estimator, i.e. how the encoder's gradient is estimated (the decoder's is the same for all):
      "reparam": through the sample z = mu + sigma eps (Concepts 11.18, 11.21); analytic KL for the ELBO.
      "score": log-derivative (Concept 11.22), with a baseline unless score_baseline=False:
        leave-one-out over the K samples for the ELBO with K >= 2, else the objective at z = mu
        (depends on x, not on the sample: the estimator stays unbiased).
      "stl": sticking the landing (Roeder et al. 2017): reparameterised, with q's parameters held
        constant inside log q(z|x), which drops the score term E_q[grad log q] = 0 (zero-mean noise).
        Unbiased for the ELBO; for the IWAE bound with K > 1 it is biased (Tucker et al. 2018).
      "dreg": doubly reparameterised (Tucker et al. 2018): for the IWAE bound the encoder gets
        sum_k w~_k^2 d log w_k / dz_k dz_k/dphi (q's parameters held in log q; with beta weighing
        log p(z) - log q: w~_k (1 - beta + beta w~_k) in place of w~_k^2), unbiased for grad L_K
        and of lower variance; the decoder gets the usual sum_k w~_k grad log w_k. With the ELBO
        objective each sample has weight 1 and DReG is STL.
    Returns per-example [B] tensors `recon` (mean_k log p(x|z_k)), `kl`, `elbo` (beta = 1),
    `iwae` (objective "iwae" only) and the scalar `loss` to minimise (mean over the batch).
    `eps` [K, B, d]: the standard normal noise of the K samples, when drawn by the caller."""
    if objective not in ("elbo", "iwae"):
        raise ValueError(f"model.objective must be 'elbo' or 'iwae', got {objective!r}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"model.estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    mu, logvar = mu.float(), bound_logvar(logvar.float())
    score = estimator == "score"
    path = estimator in ("stl", "dreg")  # path-derivative estimators: q's parameters held in log q
    # The score-function estimator must not differentiate through the sample itself.
    z = reparameterize(mu.detach() if score else mu, logvar.detach() if score else logvar, k, generator, eps)
    log_px_z = log_px_given_z(z).float()  # [K, B]
    kl = kl_standard_normal(mu, logvar)
    out = {"recon": log_px_z.mean(0), "kl": kl}
    out["elbo"] = out["recon"] - kl
    log_q = log_normal_diag(z, mu.detach(), logvar.detach()) if path else log_normal_diag(z, mu, logvar)
    if objective == "elbo":
        if score:
            if not score_baseline:
                baseline = 0.0
            elif k >= 2:  # leave-one-out mean of the other samples' signal
                baseline = (log_px_z.sum(0, keepdim=True) - log_px_z) / (k - 1)
            else:
                baseline = log_px_given_z(mu.unsqueeze(0)).float()
            objective_value = score_function_surrogate(log_px_z, log_q, baseline).mean(0) - beta * kl
        elif path:  # Monte Carlo KL through z only: same value in expectation as the closed form
            objective_value = (log_px_z + beta * (log_standard_normal(z) - log_q)).mean(0)
        else:
            objective_value = out["recon"] - beta * kl
    else:
        log_w = log_px_z + beta * (log_standard_normal(z) - log_q)
        bound = iwae_bound(log_w)
        # The logged bound is the true L_K (beta = 1) whatever beta or estimator the objective uses.
        # (beta may be a tensor in a compiled step: no data-dependent branch then)
        same = isinstance(beta, (int, float)) and beta == 1.0
        out["iwae"] = (bound if same else iwae_bound(log_px_z + log_standard_normal(z) - log_q)).detach()
        if score:
            z0 = mu.unsqueeze(0)
            baseline = (log_px_given_z(z0).float() + beta * (log_standard_normal(z0) - log_normal_diag(z0, mu, logvar))).squeeze(0)
            bound = score_function_surrogate(bound, log_q.sum(0), baseline if score_baseline else 0.0)
        elif estimator == "dreg" and z.requires_grad:
            weights = torch.softmax(log_w.detach(), dim=0)  # w~_k, [K, B]
            # The gradient reaching z_k is scaled once more, by 1 - beta + beta w~_k: the encoder gets
            # w~_k (1 - beta + beta w~_k) (w~_k^2 at beta = 1: Tucker et al.'s identity applied to the
            # beta-weighted log q), while the decoder (not behind z) keeps w~_k. The surrogate's value
            # is not the bound: use out["iwae"].
            scale = ((1 - beta) + beta * weights).unsqueeze(-1)
            z.register_hook(lambda g: g * scale)
            bound = (weights * log_w).sum(0) - (weights * log_w).sum(0).detach() + bound.detach()
        objective_value = bound
    out["loss"] = -objective_value.mean()
    return out


# --- two stochastic layers (Burda et al. 2016, section 5: x <- z1 <- z2) ----------------------------


@float32
def hierarchical_log_terms(
    log_px_z1: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor, q1: tuple, q2: tuple, p1: tuple,
    hold_q: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The parts of the log-weight of a two-layer model, each [K, B]:
        log w = log p(x|z1) + [log p(z1|z2) + log p(z2)] - [log q(z1|x) + log q(z2|z1)]
    with z1 ~ q(z1|x), z2 ~ q(z2|z1). q1, q2, p1: (mu, logvar) of q(z1|x), q(z2|z1), p(z1|z2) at
    the samples; p(z2) = N(0, I). hold_q: q's parameters held constant inside log q (STL).
    Returns (log p(x|z1), log p(z1, z2), log q(z1, z2|x))."""
    if hold_q:
        q1, q2 = tuple(t.detach() for t in q1), tuple(t.detach() for t in q2)
    log_prior = log_normal_diag(z1, *p1) + log_standard_normal(z2)
    log_q = log_normal_diag(z1, *q1) + log_normal_diag(z2, *q2)
    return log_px_z1, log_prior, log_q


@float32
def monte_carlo_objective(log_px_z: torch.Tensor, log_prior: torch.Tensor, log_q: torch.Tensor, *,
                          objective: str = "elbo", beta: float = 1.0) -> dict[str, torch.Tensor]:
    """The VAE family's objective from K samples' log-weight parts ([K, B] each), for models whose
    KL has no closed form (two stochastic layers). Same keys as `vae_objective`: `recon`, `kl`
    (its Monte Carlo estimate), `elbo`, `iwae` (objective "iwae"), `loss`; beta weighs
    log p(z) - log q as in `vae_objective`."""
    if objective not in ("elbo", "iwae"):
        raise ValueError(f"model.objective must be 'elbo' or 'iwae', got {objective!r}")
    log_w = log_px_z + beta * (log_prior - log_q)
    out = {"recon": log_px_z.mean(0), "kl": (log_q - log_prior).mean(0)}
    out["elbo"] = out["recon"] - out["kl"]
    if objective == "elbo":
        value = log_w.mean(0)
    else:
        value = iwae_bound(log_w)
        same = isinstance(beta, (int, float)) and beta == 1.0
        out["iwae"] = (value if same else iwae_bound(log_px_z + log_prior - log_q)).detach()
    out["loss"] = -value.mean()
    return out


# --- log p(x) estimators (Concepts 11.6-11.9) -----------------------------------------------------


@float32
def log_mean_exp_chunked(log_weight_fn: Callable[[int], torch.Tensor], k: int, chunk: int) -> torch.Tensor:
    """log (1/K) sum_k w_k with K log-weights drawn `chunk` at a time: memory O(chunk * B), not O(K * B).

    log_weight_fn(n) returns n fresh log-weights per example, [n, B]. A running logsumexp keeps the
    result exact (no K-sized buffer), so K = 5000 fits any batch that fits one chunk."""
    total = None
    done = 0
    while done < k:
        n = min(chunk, k - done)
        lse = torch.logsumexp(log_weight_fn(n).float(), dim=0)
        total = lse if total is None else torch.logaddexp(total, lse)
        done += n
    return total - math.log(k)


Encode = Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]
LogLikelihood = Callable[[torch.Tensor], torch.Tensor]  # z [n, B, d] -> log p(x|z) [n, B]


@torch.no_grad()
def importance_sampled_log_px(
    mu: torch.Tensor, logvar: torch.Tensor, log_px_given_z: LogLikelihood, k: int = 5000, chunk: int = 500,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Choice 2: log p(x) ~ log (1/K) sum_k p(x|z_k) p(z_k) / q(z_k|x), z_k ~ q (= the IWAE bound L_K).

    The standard 5000-sample test log-likelihood; biased low, the bias vanishing as K grows."""

    def log_w(n):
        z = reparameterize(mu, logvar, n, generator)
        return log_importance_weights(log_px_given_z(z), z, mu, logvar)

    return log_mean_exp_chunked(log_w, k, chunk)


@torch.no_grad()
def prior_sampled_log_px(
    batch_size: int, latent_dim: int, log_px_given_z: LogLikelihood, k: int = 5000, chunk: int = 500,
    device: torch.device | str = "cpu", generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Choice 1: log p(x) ~ log (1/K) sum_k p(x|z_k), z_k ~ p(z). Correct but high-variance (Concept 11.8)."""

    def log_w(n):
        z = torch.randn((n, batch_size, latent_dim), generator=generator, device=device)
        return log_px_given_z(z)

    return log_mean_exp_chunked(log_w, k, chunk)


@torch.no_grad()
def active_units(mu: torch.Tensor, threshold: float = 1e-2) -> int:
    """Number of latent dimensions whose posterior mean varies with x: Var_x(E_q[z_j]) > threshold.

    mu: [N, d] encoder means over a data set (Burda et al. 2016, section 5.2)."""
    return int((mu.float().var(0) > threshold).sum())


# --- vector quantisation (VQ-VAE, Concept 11.23) ---------------------------------------------------


@float32
def nearest_code(z_e: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook vector (Euclidean) for each row of z_e [N, D]; codebook [K, D].

    ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2, one matrix product instead of an [N, K, D] difference."""
    d = z_e.pow(2).sum(1, keepdim=True) - 2 * z_e @ codebook.t() + codebook.pow(2).sum(1)[None]
    return d.argmin(1)


def straight_through(z_e: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
    """Value z_q, gradient passed to z_e unchanged (van den Oord et al. 2017): z_e + sg(z_q - z_e)."""
    return z_e + (z_q - z_e).detach()


@float32
def vq_losses(z_e: torch.Tensor, z_q: torch.Tensor, event_dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codebook loss ||sg(z_e) - e||^2, commitment loss ||z_e - sg(e)||^2), per example [B], summed
    over latent positions and dimensions; the commitment weight beta_c multiplies the second."""
    codebook = sum_event((z_e.detach() - z_q).pow(2), event_dims)
    commitment = sum_event((z_e - z_q.detach()).pow(2), event_dims)
    return codebook, commitment


@torch.no_grad()
def ema_codebook_update(cluster_size: torch.Tensor, embed_sum: torch.Tensor, counts: torch.Tensor,
                        sums: torch.Tensor, decay: float, eps: float = 1e-5) -> tuple[torch.Tensor, ...]:
    """EMA codebook (van den Oord et al. 2017, appendix A.1), in place on the running statistics:
    N_k <- g N_k + (1 - g) n_k,  m_k <- g m_k + (1 - g) sum_{i: code i = k} z_e,i,  e_k = m_k / N~_k
    with Laplace-smoothed N~_k = (N_k + eps) / (sum N + K eps) * sum N (no division by zero for an
    unused code). counts [K] and sums [K, D] are this step's statistics, over all ranks.
    Returns (cluster_size, embed_sum, new codebook)."""
    cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
    embed_sum.mul_(decay).add_(sums, alpha=1 - decay)
    total = cluster_size.sum()
    smoothed = (cluster_size + eps) / (total + cluster_size.numel() * eps) * total
    return cluster_size, embed_sum, embed_sum / smoothed[:, None]


@float32
def codebook_perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the code-usage distribution: K when all codes are used equally, 1 for one code."""
    p = counts / counts.sum().clamp_min(1)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())
