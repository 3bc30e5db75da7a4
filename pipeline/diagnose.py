"""`vaepipe diagnose`: gradient-estimator variance and the amortisation gap of a trained model.

gradient_variance: the same batch, S independent noise draws per estimator (reparameterisation,
score function with and without baseline, STL, DReG), per-parameter variance of the gradient
(docs/estimators.md). amortization_gap: Cremer et al. (2018), Concept 11.10: per-example Gaussians
q_i optimised from the encoder's output separate the two parts of the inference gap,
  log p(x) - ELBO(q_phi) = [log p(x) - ELBO(q*)] + [ELBO(q*) - ELBO(q_phi)]
                            approximation gap      amortisation gap.
"""

from __future__ import annotations

import sys
import time

import torch
from tqdm import tqdm

from pipeline import vae_math
from pipeline.data.location import data_root_for
from pipeline.data.stream import make_subset_loader
from pipeline.evaluate import check_data_fits, load_module

ESTIMATOR_SETTINGS = {  # name -> (vae_objective estimator, score_baseline)
    "reparam": ("reparam", True), "score": ("score", True), "score_no_baseline": ("score", False),
    "stl": ("stl", True), "dreg": ("dreg", True),
}


def _first_batch(cfg, split: str, batch_size: int, data_root: str | None, seed: int) -> torch.Tensor:
    """One batch of `batch_size` examples drawn at random from the split (not its first: a split
    stored in label order would give one digit)."""
    loader = make_subset_loader(data_root or cfg.data.root, split, batch_size, binarize=cfg.data.binarize,
                                limit=batch_size, seed=seed)
    return next(iter(loader))["x"]


def gradient_variance(ckpt, samples: int = 50, batch_size: int = 100, split: str = "train",
                      objective: str | None = None, k: int | None = None, data_root: str | None = None,
                      seed: int = 0, estimators=tuple(ESTIMATOR_SETTINGS)) -> dict:
    """For each estimator: per parameter tensor, the variance over `samples` gradient draws
    (averaged over its elements) and the norm of their mean; encoder/decoder totals."""
    module = load_module(ckpt)
    cfg, vae = module.cfg, module.vae
    if cfg.model.family != "vae":
        raise ValueError(f"{ckpt}: gradient estimators apply to the VAE family, not model.family={cfg.model.family}")
    data_root = data_root_for(cfg.data.root, data_root)  # never a command/URL from the checkpoint
    check_data_fits(module, data_root, split)
    objective, k = objective or cfg.model.objective, k or int(cfg.model.k)
    x = _first_batch(cfg, split, batch_size, data_root, seed)
    if vae.stochastic_layers == 2:  # the score-function and DReG estimators are one-layer only
        estimators = [e for e in estimators if ESTIMATOR_SETTINGS[e][0] in ("reparam", "stl")]
    params = [(n, p) for n, p in vae.named_parameters() if p.requires_grad]
    report = {"objective": objective, "k": k, "samples": samples, "batch": x.shape[0], "estimators": {}}
    for name in estimators:
        estimator, baseline = ESTIMATOR_SETTINGS[name]
        gen = torch.Generator().manual_seed(seed)  # the same noise sequence for every estimator
        draws = {n: [] for n, _ in params}
        for _ in range(samples):
            vae.zero_grad(set_to_none=True)
            out, _, _ = vae.objective(x, objective=objective, k=k, beta=float(cfg.model.beta), estimator=estimator,
                                      generator=gen, score_baseline=baseline)
            out["loss"].backward()
            for n, p in params:
                draws[n].append(p.grad.detach().flatten().clone() if p.grad is not None else torch.zeros(p.numel()))
        per_param = {}
        totals = {"encoder": [0.0, 0.0, 0], "decoder": [0.0, 0.0, 0]}  # sum var, sum mean^2, elements
        for n, g in draws.items():
            g = torch.stack(g).double()
            var, mean = g.var(0), g.mean(0)
            per_param[n] = {"variance": float(var.mean()), "mean_norm": float(mean.norm())}
            part = "encoder" if n.startswith(("encoder", "q2")) else "decoder"
            totals[part][0] += float(var.sum())
            totals[part][1] += float(mean.pow(2).sum())
            totals[part][2] += g.shape[1]
        summary = {}
        for part, (v, m2, count) in totals.items():
            if count:  # variance per element, and signal-to-noise ||E g||^2 / E||g - E g||^2
                # |mean of S draws|^2 overstates ||E g||^2 by tr(Sigma) / S (a floor that only reflects
                # --samples): unbiased, m2 - v / S, at least 0 (no signal detectable)
                summary[f"{part}_variance"] = v / count
                summary[f"{part}_snr"] = max(m2 - v / samples, 0.0) / v if v > 0 else float("inf")
        report["estimators"][name] = {**summary, "per_parameter": per_param}
    return report


def format_gradient_report(r: dict) -> str:
    lines = [f"gradient variance over {r['samples']} draws, one batch of {r['batch']}, objective {r['objective']} "
             f"K={r['k']} (per element; SNR = |E g|^2 / E|g - E g|^2 over the group)",
             f"{'estimator':<18} {'encoder var':>12} {'encoder SNR':>12} {'decoder var':>12} {'decoder SNR':>12}"]
    for name, e in r["estimators"].items():
        lines.append(f"{name:<18} {e['encoder_variance']:>12.4g} {e['encoder_snr']:>12.4g} "
                     f"{e['decoder_variance']:>12.4g} {e['decoder_snr']:>12.4g}")
    return "\n".join(lines)


def _elbo(x, mu, logvar, vae, samples: int, gen) -> torch.Tensor:
    """Per-example ELBO estimate: closed-form KL, Monte Carlo reconstruction with `samples` draws."""
    z = vae_math.reparameterize(mu, logvar, samples, gen)
    return vae_math.elbo(vae.log_px_given_z(x, z), vae_math.kl_standard_normal(mu, logvar))


def amortization_gap(ckpt, limit: int = 1000, split: str = "test", steps: int = 200, lr: float = 1e-2,
                     train_samples: int = 8, eval_samples: int = 100, k: int = 1000, batch_size: int = 100,
                     data_root: str | None = None, seed: int = 0, progress: bool = True) -> dict:
    """Per-example means in nats: ELBO of the encoder's q (amortised), ELBO of per-example q_i
    optimised by Adam from the encoder's output (`steps`, `train_samples` reparameterised draws per
    step), and log p(x) by importance sampling with K draws from the better of the two proposals."""
    module = load_module(ckpt)
    cfg, vae = module.cfg, module.vae
    if cfg.model.family != "vae":
        raise ValueError(f"{ckpt}: the amortisation gap needs an amortised Gaussian encoder (model.family=vae)")
    data_root = data_root_for(cfg.data.root, data_root)  # never a command/URL from the checkpoint
    check_data_fits(module, data_root, split)
    if vae.stochastic_layers != 1:
        raise ValueError(f"{ckpt}: the amortisation gap optimises one Gaussian q_i per example; this model has "
                         f"{vae.stochastic_layers} stochastic layers (use `vaepipe eval` for its log p(x) and ELBO)")
    vae.requires_grad_(False)  # only the local variational parameters move
    loader = make_subset_loader(data_root or cfg.data.root, split, batch_size, binarize=cfg.data.binarize,
                                limit=limit, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    sums = {"elbo_amortized": 0.0, "elbo_optimized": 0.0, "log_px": 0.0}
    n, t0 = 0, time.time()
    for batch in tqdm(loader, desc=f"amortisation gap ({split})", disable=not progress, file=sys.stderr):
        x = batch["x"]
        with torch.no_grad():
            mu0, logvar0 = vae.encode(x)
            elbo_amortized = _elbo(x, mu0, logvar0, vae, eval_samples, gen)
        mu, logvar = mu0.clone().requires_grad_(), logvar0.clone().requires_grad_()
        opt = torch.optim.Adam([mu, logvar], lr=lr)
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = -_elbo(x, mu, vae_math.bound_logvar(logvar), vae, train_samples, gen).sum()
            loss.backward()
            opt.step()
        with torch.no_grad():
            logvar = vae_math.bound_logvar(logvar)
            # Adam on a noisy objective can end a little below its start: keep q_phi where it is better.
            better = _elbo(x, mu, logvar, vae, eval_samples, gen) > elbo_amortized
            mu_p = torch.where(better[:, None], mu, mu0)
            lv_p = torch.where(better[:, None], logvar, logvar0)
            # Both ELBOs reported from fresh draws: the larger of two noisy estimates (the ones
            # that chose) would overstate the amortisation gap by about half their noise.
            elbo_amortized = _elbo(x, mu0, logvar0, vae, eval_samples, gen)
            elbo_opt = torch.where(better, _elbo(x, mu_p, lv_p, vae, eval_samples, gen), elbo_amortized)
            log_px = vae_math.importance_sampled_log_px(mu_p, lv_p, lambda z: vae.log_px_given_z(x, z), k=k,
                                                        chunk=min(k, 500), generator=gen)
        sums["elbo_amortized"] += float(elbo_amortized.sum())
        sums["elbo_optimized"] += float(elbo_opt.sum())
        sums["log_px"] += float(log_px.sum())
        n += x.shape[0]
    if n == 0:
        raise ValueError(f"split '{split}' of {data_root or cfg.data.root} has no examples")
    r = {k_: v / n for k_, v in sums.items()}
    r.update(examples=n, split=split, k=k, steps=steps, seconds=time.time() - t0,
             approximation_gap=r["log_px"] - r["elbo_optimized"], amortization_gap=r["elbo_optimized"] - r["elbo_amortized"],
             inference_gap=r["log_px"] - r["elbo_amortized"])
    return r


def format_amortization_report(r: dict) -> str:
    return "\n".join([
        f"{r['split']}: {r['examples']} examples, {r['steps']} optimisation steps per example, "
        f"log p(x) with K={r['k']} ({r['seconds']:.0f} s); nats per example",
        f"  log p(x) (IS estimate)     {r['log_px']:10.3f}",
        f"  ELBO, optimised q_i (q*)   {r['elbo_optimized']:10.3f}",
        f"  ELBO, amortised q_phi      {r['elbo_amortized']:10.3f}",
        f"  approximation gap          {r['approximation_gap']:10.3f}   log p(x) - ELBO(q*)",
        f"  amortisation gap           {r['amortization_gap']:10.3f}   ELBO(q*) - ELBO(q_phi)",
        f"  inference gap (total)      {r['inference_gap']:10.3f}",
    ])
