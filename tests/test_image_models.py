"""Models for natural images: the conv and ResNet pairs at any power-of-two size (and 28), 1 or 3
channels; the discretised likelihoods through the whole run (fit, validation, summary, wandb, eval);
colour pictures; no coupling between importance samples or examples (the normalisation choice)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from pipeline.config import ConfigError, load_config
from pipeline.models.components.vae import VAE
from tests.conftest import FAST, vaepipe
from tests.test_image_source import shapes_folder
from tests.test_tracking import no_wandb_account, wandb_runs
from tests.wandb_records import read_run

SMALL = dict(latent_dim=4, conv_channels=[8, 16], conv_hidden=32, activation="elu")


@pytest.mark.parametrize("arch", ["conv", "resnet"])
@pytest.mark.parametrize("shape", [(3, 16, 16), (1, 28, 28), (28, 28), (3, 32, 32), (1, 64, 64), (3, 128, 128),
                                   (1, 256, 256)])
def test_networks_take_any_power_of_two_side_and_28(arch, shape):
    """Encoder to (mu, logvar) [B, d]; decoder to the likelihood's parameters at the image's size;
    one training step's gradients reach every parameter."""
    torch.manual_seed(0)
    for likelihood, mixtures, per_channel in (("bernoulli", 1, None), ("discretized_logistic", 3, None)):
        vae = VAE(shape, arch=arch, likelihood=likelihood, mixtures=mixtures, **SMALL)
        x = torch.randint(0, 256, (2, *shape)) / 255.0
        mu, logvar = vae.encode(x)
        assert mu.shape == logvar.shape == (2, 4)
        params = vae.decode(torch.randn(5, 2, 4))
        c = 1 if len(shape) == 2 else shape[0]
        want = shape if likelihood == "bernoulli" else (3 * (1 + 2 * c + c * (c - 1) // 2), *shape[-2:])
        assert params.shape == (5, 2, *want)
        terms, _, _ = vae.objective(x, k=2)
        terms["loss"].backward()
        assert all(p.grad is not None for p in vae.parameters())
        assert vae.mean(torch.randn(3, 4)).shape == (3, *shape)


def test_stage_count_follows_the_size():
    """side -> 4 in log2(side / 4) stride-2 stages: 2 at 16, 6 at 256; a short width list repeats its last."""
    for side, stages in ((16, 2), (32, 3), (64, 4), (256, 6)):
        vae = VAE((3, side, side), arch="conv", conv_channels=[8], latent_dim=2, conv_hidden=8)
        convs = [m for m in vae.encoder.conv if isinstance(m, torch.nn.Conv2d)]
        assert len(convs) == stages and all(m.out_channels == 8 for m in convs)


@pytest.mark.parametrize("shape, words", [((3, 48, 48), "16, 32, 64, 128 or 256"), ((3, 32, 16), "square"),
                                          ((3, 8, 8), "16, 32"), ((3, 512, 512), "prepare images --size")])
def test_unsupported_sizes_are_one_clear_error(shape, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(")):
        VAE(shape, arch="conv", **SMALL)


def test_too_many_widths_names_the_count():
    with pytest.raises(ValueError, match=r"4 widths, but 32x32 images take 3 stride-2 stages .*give 3"):
        VAE((3, 32, 32), arch="conv", conv_channels=[32, 32, 64, 64], latent_dim=2)
    with pytest.raises(ValueError, match=r"32x32 images \(28x28 padded to 32\) take 3"):
        VAE((28, 28), arch="conv", conv_channels=[32, 32, 64, 64], latent_dim=2)
    # the default widths (an empty list) follow the size: 32, 32 at 16 px ... 32, 32, 64, 64, 64, 64 at 256
    for side, widths in ((16, [32, 32]), (64, [32, 32, 64, 64]), (256, [32, 32, 64, 64, 64, 64])):
        convs = [m for m in VAE((1, side, side), arch="conv", latent_dim=2).encoder.conv if isinstance(m, torch.nn.Conv2d)]
        assert [m.out_channels for m in convs] == widths


def test_the_resnet_normalises_with_groupnorm_by_default():
    """model.norm=auto (the default): GroupNorm in the ResNet (without it the ResNet VAE collapsed
    on CIFAR-10, docs/images.md); none keeps the plain identity-start blocks; conv has no norm."""
    from pipeline.models.components.vae import build_vae

    def groupnorms(*overrides):
        cfg = load_config(overrides=["data.name=sprites", *overrides])
        return sum(isinstance(m, torch.nn.GroupNorm) for m in build_vae(cfg.model, (3, 16, 16)).modules())

    assert load_config().model.norm == "auto"
    assert groupnorms("model.arch=resnet") > 0
    assert groupnorms("model.arch=resnet", "model.norm=none") == 0
    assert groupnorms("model.arch=conv") == 0


def test_runs_from_before_the_norm_default_still_resume():
    """Checkpoints written before model.norm=auto store none: a conv run resumes with the new default,
    a ResNet trained without normalisation is not resumed as a GroupNorm one."""
    from pipeline.errors import ResumeError
    from pipeline.train import check_resume_settings

    for arch, refused in (("conv", False), ("resnet", True)):
        cfg = load_config(overrides=["data.name=sprites", f"model.arch={arch}"])
        saved = OmegaConf.to_container(cfg, resolve=True)
        saved["model"]["norm"] = "none"
        checkpoint = {"hyper_parameters": {"config": saved}}
        if refused:
            with pytest.raises(ResumeError, match="model.norm=none"):
                check_resume_settings(cfg, checkpoint, "old.ckpt")
        else:
            check_resume_settings(cfg, checkpoint, "old.ckpt")


def test_a_run_from_before_latent_grid_is_not_resumed_with_a_map():
    """A checkpoint written before model.latent_grid (no such key: a latent vector) resumes as a
    vector and is refused, naming the setting, under the CIFAR-10 config's 8 x 8 map (not a size
    mismatch deep in load_state_dict)."""
    from pipeline.errors import ResumeError
    from pipeline.train import check_resume_settings

    cfg = load_config(overrides=["data.name=sprites", "model.arch=conv"])
    saved = OmegaConf.to_container(cfg, resolve=True)
    del saved["model"]["latent_grid"]
    check_resume_settings(cfg, {"hyper_parameters": {"config": saved}}, "old.ckpt")
    grid = load_config(overrides=["data.name=sprites", "model.arch=conv", "model.latent_grid=2", "model.latent_dim=8"])
    with pytest.raises(ResumeError, match=r"model.latent_grid=0.*this command sets.*model.latent_grid=2"):
        check_resume_settings(grid, {"hyper_parameters": {"config": saved}}, "old.ckpt")


def test_group_norm_takes_any_width():
    """GroupNorm's groups divide the width (gcd with 32): 200 and 50 channels work."""
    vae = VAE((3, 16, 16), arch="resnet", norm="group", conv_channels=[200, 50], latent_dim=2, conv_hidden=8)
    norms = [m for m in vae.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_channels % m.num_groups == 0 for m in norms)
    assert torch.isfinite(vae.objective(torch.rand(2, 3, 16, 16))[0]["loss"])


@pytest.mark.parametrize("arch", ["conv", "resnet"])
def test_a_latent_grid_is_a_map_of_codes(arch):
    """model.latent_grid=G: the stages stop at G x G and the codes are a G x G map of latent_dim / G^2
    channels, flattened channel-major to the same [B, latent_dim] the prior, the bounds and the
    pictures use; the decoder starts from that map. Gradients reach every parameter."""
    torch.manual_seed(0)
    vae = VAE((3, 32, 32), arch=arch, latent_dim=128, latent_grid=8, conv_channels=[8, 16],
              likelihood="discretized_logistic", mixtures=2)
    convs = [m for m in vae.encoder.conv if isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2)]
    assert len(convs) == 2  # 32 -> 16 -> 8
    head = vae.encoder.head[0]
    assert isinstance(head, torch.nn.Conv2d) and head.out_channels == 2 * 2  # mu and logvar: 2 channels each
    x = torch.randint(0, 256, (3, 3, 32, 32)) / 255.0
    mu, logvar = vae.encode(x)
    assert mu.shape == logvar.shape == (3, 128)
    assert vae.decode(torch.randn(5, 3, 128)).shape == (5, 3, 2 * (1 + 2 * 3 + 3), 32, 32)
    vae.objective(x, k=2)[0]["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in vae.parameters())


def test_a_latent_grid_code_describes_its_own_patch():
    """In the conv pair a code of the grid sees only its patch's neighbourhood (receptive field 18 px):
    repainting the top-left 8 x 8 pixels changes the top-left codes and leaves the bottom-right ones
    exactly as they were (a latent vector through a linear head would change them all), and a
    bottom-right code moves only the bottom-right of the decoder's output."""
    torch.manual_seed(0)
    vae = VAE((3, 32, 32), arch="conv", latent_dim=128, latent_grid=8, conv_channels=[8, 16],
              likelihood="discretized_logistic").eval()
    x = torch.rand(1, 3, 32, 32)
    y = x.clone()
    y[..., :8, :8] = torch.rand(1, 3, 8, 8)
    for part in (0, 1):  # mu, then logvar: each [1, 128] = 2 channels x 8 x 8, channel-major
        before, after = (vae.encode(t)[part].reshape(1, 2, 8, 8) for t in (x, y))
        assert torch.equal(before[..., 5:, 5:], after[..., 5:, 5:])
        assert all(not torch.allclose(before[0, c, :2, :2], after[0, c, :2, :2]) for c in (0, 1))
    z = torch.zeros(1, 128)
    for index in (63, 127):  # the bottom-right cell (7, 7) of channel 0, then of channel 1
        moved = z.clone()
        moved[0, index] = 3.0
        change = (vae.decode(moved) - vae.decode(z)).abs().sum(dim=(0, 1))  # [32, 32]
        assert change[20:, 20:].sum() > 0 and change[:16, :].sum() == 0 and change[:, :16].sum() == 0


def test_a_latent_grid_that_does_not_fit_is_one_clear_error():
    with pytest.raises(ValueError, match=r"model.latent_grid=8: .*divides model.latent_dim=100"):
        VAE((3, 32, 32), arch="conv", latent_dim=100, latent_grid=8)
    with pytest.raises(ValueError, match=r"model.latent_grid=32: a spatial latent needs a power of two from 1 to 16"):
        VAE((3, 32, 32), arch="conv", latent_dim=1024, latent_grid=32)
    with pytest.raises(ValueError, match=r"3 widths, but 32x32 images take 2 stride-2 stages \(32 -> 8\)"):
        VAE((3, 32, 32), arch="conv", latent_dim=64, latent_grid=8, conv_channels=[8, 16, 32])
    with pytest.raises(ConfigError, match="model.latent_grid=4 is a map of latents"):
        load_config(overrides=["model.arch=mlp", "model.latent_grid=4"])


@pytest.mark.parametrize("files", [["vae_cifar10.yaml"], ["vae_cifar10.yaml", "vae_cifar10_resnet.yaml"],
                                   ["vae_celeba64.yaml"]])
def test_the_shipped_image_configs_build_and_train_a_step(files):
    """The real composed configs' networks build at their data's size (the widths fit the stages and
    the latent grid) and give a finite loss and finite gradients (their training: docs/results.md)."""
    from pipeline.models.components.vae import build_vae
    from tests.conftest import ROOT

    cfg = load_config([ROOT / "configs" / f for f in files])
    side = 64 if "celeba" in files[0] else 32
    torch.manual_seed(0)
    vae = build_vae(cfg.model, (3, side, side))
    terms = vae.objective(torch.randint(0, 256, (2, 3, side, side)) / 255.0, k=1)[0]
    terms["loss"].backward()
    assert torch.isfinite(terms["loss"]) and all(torch.isfinite(p.grad).all() for p in vae.parameters())


def test_eval_chunk_sizes():
    """vaepipe eval's samples per pass: the same as before for the existing models (5000 decoder rows
    on CPU, 500 samples on a GPU), fewer for a large likelihood (CIFAR-10's 100 numbers per pixel)."""
    from pipeline.evaluate import default_chunk

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert default_chunk(100, cpu, 784) == 50 and default_chunk(100, cpu, 2) == 50  # MNIST, the 2-D GMM
    assert default_chunk(100, cpu, 4096) == 50 and default_chunk(2000, gpu, 784) == 500  # sprites; MNIST on a GPU
    assert default_chunk(100, cpu, 100 * 32 * 32) == 4 and default_chunk(100, gpu, 100 * 32 * 32) == 78


@pytest.mark.parametrize("arch, norm, grid", [("conv", "none", 0), ("resnet", "none", 0), ("resnet", "group", 0),
                                             ("conv", "none", 2), ("resnet", "group", 2)])
def test_log_weights_do_not_couple_samples_or_examples(arch, norm, grid):
    """Each importance log-weight is a function of its own (x, z) only: the same numbers for an example
    evaluated alone, in a batch, or among more samples (batch statistics would break this, and with it
    the IWAE bound of one fixed model). Tolerance 1e-3 nats of ~2000: float32 summation order."""
    torch.manual_seed(0)
    vae = VAE((3, 16, 16), arch=arch, norm=norm, likelihood="discretized_logistic", mixtures=2, latent_grid=grid,
              **SMALL).eval()
    for p in vae.parameters():  # zero-initialised residual branches would hide a coupling
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randint(0, 256, (4, 3, 16, 16)) / 255.0
    mu, logvar = vae.encode(x)
    z = mu + torch.randn(6, 4, 4)
    together = vae.log_px_given_z(x, z)
    alone = torch.stack([vae.log_px_given_z(x[i:i + 1], z[:2, i:i + 1])[:, 0] for i in range(4)], 1)
    assert torch.allclose(together[:2], alone, atol=1e-3, rtol=0)
    assert torch.allclose(vae.encode(x[1:2])[0], mu[1:2], atol=1e-5)


def test_config_refuses_mismatched_likelihood_settings():
    with pytest.raises(ConfigError, match="mixture of discretised logistics"):
        load_config(overrides=["model.likelihood=discretized_gaussian", "model.mixtures=5"])
    with pytest.raises(ConfigError, match="model.init=torch"):
        load_config(overrides=["model.likelihood=discretized_logistic", "model.init=iwae"])
    with pytest.raises(ConfigError, match="choose one of"):
        load_config(overrides=["model.likelihood=logistic"])
    with pytest.raises(ConfigError, match="'model.mixtures'"):
        load_config(overrides=["model.mixtures=0"])
    with pytest.raises(ConfigError, match="mixture of discretised logistics"):
        load_config(overrides=["model.likelihood=bernoulli", "model.mixtures=10"])
    with pytest.raises(ConfigError, match="model.arch=conv has no residual blocks"):
        load_config(overrides=["model.arch=conv", "model.res_blocks=3"])
    with pytest.raises(ConfigError, match="model.arch=mlp has no residual blocks"):
        load_config(overrides=["model.arch=mlp", "model.norm=group"])
    with pytest.raises(ConfigError, match="zero-initialised residual branches"):
        load_config(overrides=["model.arch=resnet", "model.init=iwae"])
    with pytest.raises(ConfigError, match="use model.likelihood=bernoulli"):
        load_config(overrides=["model.likelihood=discretized_logistic", "data.binarize=dynamic"])


@pytest.fixture(scope="module")
def rgb16(tmp_path_factory):
    root = tmp_path_factory.mktemp("rgb16")
    folder = shapes_folder(root / "src", n_per_class=40)
    vaepipe("prepare", "images", "--source", folder, "--out", root / "data", "--size", "16", "--val", "16",
            "--test", "16")
    return root / "data"


RUN = ["data.name=images", "model.latent_dim=4", "model.conv_channels=[8,16]", "model.conv_hidden=32",
       "data.batch_size=16", "data.eval_batch_size=16", "trainer.max_steps=12", "trainer.max_epochs=-1",
       "trainer.val_check_interval=6", "trainer.check_val_every_n_epoch=null", "trainer.log_every_n_steps=2",
       "model.eval_k=3", "trainer.enable_progress_bar=false", "data.num_workers=0"]


def test_discrete_likelihood_reports_bits_per_dim_everywhere(rgb16, tmp_path):
    """fit (validation, summary.json, wandb offline) and eval: bits/dim next to nats, equal to
    -nats / (D ln 2) with D = 3 * 16 * 16; RGB pictures."""
    run = tmp_path / "run"
    vaepipe("fit", f"data.root={rgb16}", f"run.dir={run}", "model.arch=resnet",
            "model.likelihood=discretized_logistic", "model.mixtures=3", "logger.mode=offline", *RUN,
            env=no_wandb_account(tmp_path))
    d_ln2 = 3 * 16 * 16 * np.log(2)
    metrics = json.loads((run / "summary.json").read_text())["metrics"]
    for stage in ("val", "test"):
        assert metrics[f"{stage}/bpd_elbo"] == pytest.approx(-metrics[f"{stage}/elbo"] / d_ln2, rel=1e-5)
        assert metrics[f"{stage}/bpd_iwae3"] == pytest.approx(-metrics[f"{stage}/iwae3"] / d_ln2, rel=1e-5)
        assert 0 < metrics[f"{stage}/bpd_iwae3"] <= metrics[f"{stage}/bpd_elbo"] + 1e-6
    rec = read_run(wandb_runs(run)[0])
    keys = set().union(*rec["history"])
    assert {"train/bpd_elbo", "val/bpd_elbo", "val/bpd_iwae3", "test/bpd_iwae3"} <= keys, sorted(keys)
    for kind in ("samples", "recon", "traversal"):
        picture = Image.open(run / "images" / f"{kind}_final.png")
        arr = np.asarray(picture).astype(int)
        assert picture.mode == "RGB" and np.abs(arr[..., 0] - arr[..., 1]).max() > 0, kind  # colour, not grey x3
    result = json.loads(vaepipe("eval", run, "--k", "8", "--json").stdout)
    assert result["bpd"] == pytest.approx(result["nll"] / d_ln2, rel=1e-6)
    assert result["bpd_elbo"] == pytest.approx(-result["elbo"] / d_ln2, rel=1e-6) and result["dims"] == 768
    text = vaepipe("eval", run, "--k", "8").stdout
    assert f"bits/dim (-log p(x) / (D ln 2), D = 768): {result['bpd']:.4f}" in text
    out = vaepipe("sample", run, "--out", tmp_path / "draw.png", "--pixels", "draw", "--n", "8").stdout
    vaepipe("sample", run, "--out", tmp_path / "mean.png", "--n", "8")
    drawn, mean = (np.asarray(Image.open(tmp_path / f"{n}.png")).astype(int) for n in ("draw", "mean"))
    assert "draw.png" in out and drawn.shape == mean.shape and drawn.shape[2] == 3
    assert np.abs(drawn - mean).mean() > 1  # the pixels' own noise, not the mean again
    # The same checkpoint on float data of the same shape: refused, naming the data (not rounded into bins).
    np.savez(tmp_path / "float.npz", x=np.random.default_rng(0).random((40, 3, 16, 16), dtype=np.float32))
    vaepipe("prepare", "npz", "--source", tmp_path / "float.npz", "--out", tmp_path / "float")
    proc = vaepipe("eval", run, "--k", "2", "--data-root", tmp_path / "float", check=False)
    assert proc.returncode != 0 and "is a probability of 8-bit pixel values" in proc.stderr, proc.stderr[-1500:]


def test_continuous_likelihood_gets_no_bits_per_dim(rgb16, tmp_path):
    run = tmp_path / "run"
    vaepipe("fit", f"data.root={rgb16}", f"run.dir={run}", "model.arch=conv", "model.likelihood=gaussian",
            "logger.backend=csv", *RUN)
    metrics = json.loads((run / "summary.json").read_text())["metrics"]
    assert "val/elbo" in metrics and not any("bpd" in k for k in metrics)
    result = json.loads(vaepipe("eval", run, "--k", "4", "--json").stdout)
    assert result["bpd"] is None and "not a probability of 8-bit" in result["bpd_note"]
    assert "bits/dim: not reported" in vaepipe("eval", run, "--k", "4").stdout


def test_discrete_likelihood_refuses_data_that_are_not_8_bit(tmp_path):
    """Float images (an npz of float32 in [0, 1]) under a likelihood of 8-bit pixels: one line naming
    the likelihood, the data and what to use instead, before any step."""
    np.savez(tmp_path / "float.npz", x=np.random.default_rng(0).random((40, 16, 16), dtype=np.float32))
    proc = vaepipe("fit", "data.name=npz", f"data.source={tmp_path / 'float.npz'}", f"data.root={tmp_path / 'data'}",
                   f"run.dir={tmp_path / 'run'}", "model.arch=conv", "model.likelihood=discretized_gaussian",
                   "model.conv_channels=[8]", "data.batch_size=8", "trainer.max_steps=2", *FAST, check=False)
    assert proc.returncode != 0
    assert "model.likelihood=discretized_gaussian is a probability of 8-bit pixel values" in proc.stderr, \
        proc.stderr[-2000:]
    assert "float32" in proc.stderr and "use model.likelihood=gaussian" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()
