"""Networks and the LightningModule: shapes, likelihoods, objectives and estimators chosen by config."""

import pytest
import torch

from pipeline.config import load_config
from pipeline.models.components.vae import VAE, build_vae
from pipeline.models.vae_module import VAEModule, iwae_schedule_factor


def module(overrides, shape):
    cfg = load_config([], overrides)
    from omegaconf import OmegaConf

    return VAEModule(OmegaConf.to_container(cfg, resolve=True), list(shape))


def test_default_mlp_is_the_iwae_papers_784_200_200_50():
    vae = VAE((28, 28), arch="mlp", hidden=[200, 200], latent_dim=50, activation="tanh")
    linears = [m for m in vae.encoder.net if isinstance(m, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(784, 200), (200, 200), (200, 100)]
    linears = [m for m in vae.decoder.net if isinstance(m, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(50, 200), (200, 200), (200, 784)]
    assert any(isinstance(m, torch.nn.Tanh) for m in vae.encoder.net)
    x = torch.rand(3, 28, 28)
    mu, logvar = vae.encode(x)
    assert mu.shape == logvar.shape == (3, 50)
    z = torch.randn(5, 3, 50)
    assert vae.decode(z).shape == (5, 3, 28, 28)
    assert vae.log_px_given_z(x, z).shape == (5, 3)


def test_conv_pair_for_64x64_and_its_errors():
    vae = VAE((64, 64), arch="conv", latent_dim=7, activation="relu")
    x = torch.rand(2, 64, 64)
    mu, _ = vae.encode(x)
    assert mu.shape == (2, 7) and vae.decode(torch.randn(4, 2, 7)).shape == (4, 2, 64, 64)
    rgb = VAE((3, 64, 64), arch="conv", latent_dim=4, conv_channels=[8, 8, 16, 16])
    assert rgb.decode(torch.randn(2, 4)).shape == (2, 3, 64, 64)
    with pytest.raises(ValueError, match="16, 32, 64, 128 or 256 pixels"):
        VAE((30, 30), arch="conv")
    with pytest.raises(ValueError, match="4 widths, but 16x16 images take 2"):
        VAE((16, 16), arch="conv", conv_channels=[32, 32, 64, 64])
    assert VAE((16, 16), arch="conv", latent_dim=5).decode(torch.randn(2, 5)).shape == (2, 16, 16)  # default widths cut to 2
    with pytest.raises(ValueError, match="model.activation"):
        VAE((4,), activation="sigmoidish")


def test_gaussian_decoder_sigma_fixed_or_learned():
    fixed = VAE((6,), likelihood="gaussian", sigma=0.5, hidden=[8], latent_dim=2)
    learned = VAE((6,), likelihood="gaussian", sigma=0.5, learn_sigma=True, hidden=[8], latent_dim=2)
    assert "log_sigma2" not in dict(fixed.named_parameters())
    assert "log_sigma2" in dict(learned.named_parameters())
    x, z = torch.randn(3, 6), torch.randn(1, 3, 2)
    mean = fixed.decode(z)
    expected = torch.distributions.Normal(mean, 0.5).log_prob(x).sum(-1)
    torch.testing.assert_close(fixed.log_px_given_z(x, z), expected)
    learned.log_px_given_z(x, z).sum().backward()
    assert learned.log_sigma2.grad is not None and learned.log_sigma2.grad != 0


@pytest.mark.parametrize("overrides", [
    ["model.objective=iwae", "model.k=5"],
    ["model.estimator=score", "model.k=1"],
    ["model.estimator=score", "model.k=3"],
    ["model.estimator=score", "model.objective=iwae", "model.k=3"],
    ["model.beta=4", "model.beta_warmup_steps=10"],
])
def test_training_step_descends_for_each_objective_and_estimator(overrides):
    torch.manual_seed(0)
    m = module(["model.arch=mlp", "model.hidden=[32]", "model.latent_dim=4", "model.eval_k=0", *overrides], (16,))
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    x = (torch.rand(64, 16) < torch.linspace(0.05, 0.95, 16)).float()
    losses = []
    for i in range(150):  # no trainer: global_step stays 0, so draw fresh noise per iteration here
        loss = m.objective(x, m.beta(), generator=torch.Generator().manual_seed(i))[0]["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # 16 pixels of a fixed batch: from ~11 nats at initialisation, every objective/estimator must
    # descend by more than 1.5 nats (the factorised optimum alone sits ~2.5 nats lower; seed fixed).
    start, end = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert end < start - 1.5, (start, end)


def test_beta_warmup_in_the_module():
    m = module(["model.beta=4", "model.beta_warmup_steps=100"], (64, 64))
    assert m.beta() == 0.0  # global_step 0 without a trainer


def test_iwae_learning_rate_schedule():
    # stage i lasts 3^i epochs: epochs 0 | 1-3 | 4-12 | 13-39 ...
    factors = [iwae_schedule_factor(e) for e in (0, 1, 3, 4, 12, 13)]
    expected = [1, 10 ** (-1 / 7), 10 ** (-1 / 7), 10 ** (-2 / 7), 10 ** (-2 / 7), 10 ** (-3 / 7)]
    assert factors == pytest.approx(expected)


def test_build_vae_from_config():
    cfg = load_config([], ["model.arch=mlp", "model.hidden=[]", "model.latent_dim=3"])
    vae = build_vae(cfg.model, (5,))
    assert isinstance(vae.encoder.net[0], torch.nn.Linear) and len(vae.encoder.net) == 1  # linear encoder


def test_objective_stays_float32_under_bf16_autocast():
    m = module(["model.arch=mlp", "model.hidden=[32]", "model.latent_dim=4", "model.objective=iwae", "model.k=5"],
               (16,))
    x = (torch.rand(8, 16) < 0.5).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms, mu, _ = m.objective(x, beta=1.0)
        assert m.vae.decode(mu).dtype == torch.bfloat16  # the networks do run in bf16 ...
    assert all(t.dtype == torch.float32 for t in terms.values())  # ... the mathematics does not


def test_compiled_log_weights_match_eager():
    # vaepipe eval compiles the log-weight kernel (k >= 1000) for speed; it must compute the same
    # numbers. Tolerance: float32 sums over 784 pixels in a different order differ by ~1e-4 nats
    # on log-weights of a few hundred nats; 1e-3 absolute + 1e-5 relative leaves room for that.
    from pipeline import vae_math
    from pipeline.evaluate import log_weight_kernel

    torch.manual_seed(0)
    vae = VAE((28, 28), arch="mlp", hidden=[200, 200], latent_dim=50, activation="tanh").eval()
    x = (torch.rand(20, 28, 28) < 0.2).float()
    with torch.no_grad():
        mu, logvar = vae.encode(x)
        z = vae_math.reparameterize(mu, logvar, 64, torch.Generator().manual_seed(1))
        eager = log_weight_kernel(vae, compile=False)(x, z, mu, logvar)
        compiled = log_weight_kernel(vae, compile=True)(x, z, mu, logvar)
    assert eager.shape == (64, 20) and eager.dtype == torch.float32
    torch.testing.assert_close(compiled, eager, atol=1e-3, rtol=1e-5)
