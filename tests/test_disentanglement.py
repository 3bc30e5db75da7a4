"""Disentanglement metrics on synthetic codes with known structure: a code that is the factors
themselves gets the top score, a code independent of the factors a score near chance, an
entangled (rotated) code something in between for MIG."""

import numpy as np
import pytest

from pipeline.disentanglement import beta_vae_score, mig, mutual_information

SIZES = [3, 6, 10, 8, 5]  # at most 20 values per factor: 20-bin MIG can reach 1


@pytest.fixture(scope="module")
def factors():
    rng = np.random.default_rng(0)
    return np.stack([rng.integers(0, s, 4000) for s in SIZES], axis=1)


def test_mutual_information_of_known_pairs():
    a = np.repeat(np.arange(4), 252)
    assert mutual_information(a, a) == pytest.approx(np.log(4))  # I(a; a) = H(a)
    b = np.tile(np.arange(4), 252)  # independent of a: each block of a holds every b equally often
    assert mutual_information(a, b) == pytest.approx(0.0, abs=1e-12)


def test_identity_code_gets_the_top_scores(factors):
    z = factors.astype(float) + 0.01 * np.random.default_rng(1).standard_normal(factors.shape)
    assert mig(z, factors) > 0.95
    assert beta_vae_score(z, factors) > 0.98


def test_random_code_gets_low_scores(factors):
    z = np.random.default_rng(2).standard_normal((len(factors), 5))
    assert mig(z, factors) < 0.05
    # chance is 1/5; 1000 test points: sd of the accuracy ~0.013
    assert beta_vae_score(z, factors) < 0.3


def test_entangled_code_scores_lower_mig(factors):
    # A rotation mixes every factor into every latent: still informative, no longer one-to-one.
    q, _ = np.linalg.qr(np.random.default_rng(3).standard_normal((5, 5)))
    z = ((factors - factors.mean(0)) / factors.std(0)) @ q
    assert mig(z, factors) < 0.5 * mig(factors.astype(float), factors)
