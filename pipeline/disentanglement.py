"""Disentanglement metrics from codes and ground-truth factors (Concept 11.25), framework-free.

Both take the encoder means z [N, d] of a pool of examples and their factor indices v [N, F]
(the procedural sprites carry them; `vaepipe eval` computes both when the data has factors).

beta-VAE metric (Higgins et al. 2017): pick a factor k, draw L pairs of examples that share the
value of v_k (the other factors free), average |z1 - z2| over the pairs; a low-capacity linear
classifier must tell k from that average. Score = its accuracy on held-out points (chance 1/F).
Pairs are drawn from the pool, where the original draws them from the simulator: for data whose
factors are independent and uniform (sprites) the two agree.

MIG, mutual information gap (Chen et al. 2018): I(z_j; v_k) with each z_j discretised into
`bins` equal-width bins; for every factor the gap between the two most informative latents,
divided by H(v_k), averaged over factors. 1: each factor captured by exactly one latent.
A factor with more values than bins loses information in the binning (so its gap is < 1 even for
a perfect code): the common choice, 20 bins, is the default.
"""

from __future__ import annotations

import numpy as np
import torch


def _discretize(z: np.ndarray, bins: int) -> np.ndarray:
    out = np.zeros(z.shape, dtype=np.int64)
    for j in range(z.shape[1]):
        edges = np.histogram_bin_edges(z[:, j], bins=bins)
        out[:, j] = np.digitize(z[:, j], edges[1:-1])
    return out


def _entropy(v: np.ndarray) -> float:
    p = np.bincount(v) / len(v)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def mutual_information(a: np.ndarray, b: np.ndarray) -> float:
    """I(a; b) in nats for two integer arrays, from their joint histogram."""
    joint = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(joint, (a, b), 1)
    joint /= joint.sum()
    pa, pb = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    nz = joint > 0
    return float((joint[nz] * np.log(joint[nz] / (pa @ pb)[nz])).sum())


def mig(z, factors, bins: int = 20) -> float:
    z, factors = np.asarray(z, dtype=np.float64), np.asarray(factors, dtype=np.int64)
    zd = _discretize(z, bins)
    gaps = []
    for k in range(factors.shape[1]):
        h = _entropy(factors[:, k])
        if h <= 0:  # a constant factor says nothing
            continue
        mi = sorted((mutual_information(zd[:, j], factors[:, k]) for j in range(z.shape[1])), reverse=True)
        gaps.append((mi[0] - (mi[1] if len(mi) > 1 else 0.0)) / h)
    return float(np.mean(gaps)) if gaps else float("nan")


def _beta_vae_points(z: np.ndarray, factors: np.ndarray, n: int, pairs: int, rng: np.random.Generator):
    """n training points: mean |z1 - z2| over `pairs` pairs sharing one factor's value, and that factor."""
    groups = {k: [m for m in (np.flatnonzero(factors[:, k] == v) for v in np.unique(factors[:, k])) if len(m) >= 2]
              for k in range(factors.shape[1]) if len(np.unique(factors[:, k])) > 1}
    usable = [k for k, g in groups.items() if g]  # factors with a value shared by two examples
    if not usable:
        raise ValueError("no factor value is shared by two examples: too few examples for the beta-VAE metric")
    x, y = np.zeros((n, z.shape[1])), np.zeros(n, dtype=np.int64)
    for i in range(n):
        k = usable[rng.integers(len(usable))]
        members = groups[k]
        diffs = []
        for _ in range(pairs):
            m = members[rng.integers(len(members))]
            a, b = rng.choice(m, 2, replace=False)
            diffs.append(np.abs(z[a] - z[b]))
        x[i], y[i] = np.mean(diffs, axis=0), usable.index(k)
    return x, y, len(usable)


def beta_vae_score(z, factors, n_train: int = 2000, n_test: int = 1000, pairs: int = 64, seed: int = 0,
                   steps: int = 500) -> float:
    """Test accuracy of a linear (softmax) classifier of the fixed factor, trained with Adam on
    standardised inputs."""
    z, factors = np.asarray(z, dtype=np.float64), np.asarray(factors, dtype=np.int64)
    rng = np.random.default_rng(seed)
    x_tr, y_tr, classes = _beta_vae_points(z, factors, n_train, pairs, rng)
    x_te, y_te, _ = _beta_vae_points(z, factors, n_test, pairs, rng)
    mean, std = x_tr.mean(0), x_tr.std(0) + 1e-8
    xt, xe = (torch.tensor((a - mean) / std, dtype=torch.float32) for a in (x_tr, x_te))
    yt = torch.tensor(y_tr)
    gen = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(z.shape[1], classes)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=gen) * 0.01)
        linear.bias.zero_()
    opt = torch.optim.Adam(linear.parameters(), lr=0.05)
    with torch.enable_grad():  # also when called under no_grad (vaepipe eval)
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(linear(xt), yt).backward()
            opt.step()
    with torch.no_grad():
        return float((linear(xe).argmax(1).numpy() == y_te).mean())
