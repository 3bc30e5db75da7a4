"""Typed config: composition, validation, clear errors (the CLI contract later issues rely on)."""

import re

import pytest
import yaml
from omegaconf import OmegaConf

from pipeline.config import ConfigError, load_config
from tests.conftest import ROOT, vaepipe

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_composes(path):
    cfg = load_config([path])
    assert cfg.run.name.startswith(path.stem)
    assert cfg.run.dir == f"runs/{cfg.run.name}"


def test_shipped_experiments_exist():
    assert {p.stem for p in CONFIGS} >= {"vae_sprites", "vae_mnist", "iwae_mnist", "beta_vae_sprites", "vae_frey"}


def test_defaults_are_the_vae_sprites_experiment():
    # `vaepipe fit` with no arguments must train exactly configs/vae_sprites.yaml.
    assert load_config([]) == load_config([ROOT / "configs" / "vae_sprites.yaml"])


def test_files_merge_in_order_then_overrides():
    cfg = load_config([ROOT / "configs/vae_mnist.yaml", ROOT / "configs/iwae_mnist.yaml"], ["model.k=50", "model.beta=2"])
    assert cfg.model.objective == "iwae" and cfg.model.k == 50 and cfg.model.beta == 2.0
    assert cfg.run.name == "iwae_mnist_k50"  # interpolation resolved after the overrides
    assert cfg.model.hidden == [200, 200] and cfg.model.activation == "tanh"


def test_unknown_key_names_key_and_valid_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'model\.latnt_dim'.*latent_dim"):
        load_config([], ["model.latnt_dim=3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  batch_sise: 3\n")
    with pytest.raises(ConfigError, match=rf"{bad.name}.*'data\.batch_sise'.*batch_size"):
        load_config([bad])
    with pytest.raises(ConfigError, match="unknown config key 'optimizer'.*optim"):
        load_config([], ["optimizer.lr=1"])


def test_wrong_type_and_bad_values():
    with pytest.raises(ConfigError, match="'model.k'"):
        load_config([], ["model.k=many"])
    with pytest.raises(ConfigError, match="'model.objective'.*elbo, iwae"):
        load_config([], ["model.objective=vlb"])
    with pytest.raises(ConfigError, match="'data.batch_size'.*>= 1"):
        load_config([], ["data.batch_size=0"])
    with pytest.raises(ConfigError, match="'data.shuffle_buffer'.*>= 0"):
        load_config([], ["data.shuffle_buffer=-1"])
    assert load_config([], ["data.shuffle_buffer=0"]).data.shuffle_buffer == 0  # 0 is the fixed order
    # values Lightning or the loop would only trip over later (a ZeroDivisionError mid-training, a
    # traceback from Lightning's checks): refused at once, naming the key
    for item, says in [("trainer.num_nodes=0", ">= 1"), ("trainer.log_every_n_steps=0", ">= 1"),
                       ("run.keep_last=-5", ">= 1"), ("run.save_top_k=-3", ">= -1"), ("trainer.devices=0", ">= 1"),
                       ("trainer.val_check_interval=0", "integer >= 1"), ("trainer.val_check_interval=1.5", "0 < f"),
                       ("optim.lr=-1", ">= 0"), ("run.every_n_train_steps=-1", ">= 0"), ("model.sigma=0", "> 0"),
                       # a ZeroDivisionError in Lightning; gradients flipped (training uphill); Adam's
                       # IndexError; a negative learning rate every other epoch; silently 1 step per epoch
                       ("trainer.check_val_every_n_epoch=0", ">= 1"), ("trainer.gradient_clip_val=-1", ">= 0"),
                       ("optim.betas=[0.9]", "two decay rates"), ("optim.betas=[0.9,1.0]", "in [0, 1)"),
                       ("optim.gamma=-1", "> 0"), ("trainer.limit_train_batches=0", "integer >= 1"),
                       ("trainer.limit_train_batches=1.5", "0 < f <= 1"), ("trainer.limit_train_batches=-3", ">= 1")]:
        with pytest.raises(ConfigError, match=rf"'{item.split('=')[0]}'.*{re.escape(says)}"):
            load_config([], [item])
    # a shell variable in braces is read as an interpolation: the error says how to write it
    with pytest.raises(ConfigError, match=r"slurm.setup\[0\].*write \$SLURM_JOB_ID without braces"):
        load_config([], ['slurm.setup=["export TMPDIR=/scratch/${SLURM_JOB_ID}"]'])
    assert load_config([], ['slurm.setup=["cd /scratch/$SLURM_JOB_ID"]']).slurm.setup[0] == "cd /scratch/$SLURM_JOB_ID"
    with pytest.raises(ConfigError, match="cosine decays over the run's length"):  # an OverflowError later
        load_config([], ["optim.scheduler=cosine", "trainer.max_steps=-1", "trainer.max_epochs=-1"])
    for item in ("trainer.val_check_interval=0.25", "trainer.val_check_interval=100", "trainer.devices=-1",
                 "run.save_top_k=-1", "optim.lr=0", "trainer.check_val_every_n_epoch=null",
                 "trainer.gradient_clip_val=0", "trainer.limit_train_batches=0.5", "trainer.limit_train_batches=7"):
        load_config([], [item])  # accepted
    with pytest.raises(ConfigError, match=r"override 'model.hidden=\[1,2': its value is not valid YAML"):
        load_config([], ["model.hidden=[1,2"])
    with pytest.raises(ConfigError, match="not key=value"):
        load_config([], ["model.k"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(["no/such.yaml"])


def test_a_slurm_time_stays_as_written(tmp_path):
    # YAML 1.1 reads 12:00:00 as the base-60 integer 43200 (then refused as not a Slurm time) and
    # 1:30 as 90 (which Slurm reads as 90 minutes): the walltime is kept as written.
    site = tmp_path / "site.yaml"
    site.write_text("slurm:\n  time: 24:00:00\n")
    assert load_config([site]).slurm.time == "24:00:00"
    assert load_config([site], ["slurm.time=12:00:00"]).slurm.time == "12:00:00"
    assert load_config([], ["slurm.time=1:30"]).slurm.time == "1:30"


def test_a_broken_yaml_file_is_named_with_its_line(tmp_path):
    bad, listed = tmp_path / "bad.yaml", tmp_path / "list.yaml"
    bad.write_text("model:\n  beta: [1, 2\n")
    listed.write_text("- model\n- data\n")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(bad))} is not valid YAML: .*line 2"):
        load_config([bad])
    with pytest.raises(ConfigError, match=rf"{re.escape(str(listed))}: a config file holds a mapping"):
        load_config([listed])
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("model: 3\n")  # a group given a value: named, with the group's keys
    with pytest.raises(ConfigError, match=r"scalar.yaml: 'model' is a group of keys \(family, .*not a value \(3\)"):
        load_config([scalar])


def test_cli_config_prints_resolved_yaml_and_fails_clearly():
    out = vaepipe("config", "-c", "configs/iwae_mnist.yaml", "model.k=50").stdout
    printed = yaml.safe_load(out)
    assert printed["model"]["k"] == 50 and printed["run"]["name"] == "iwae_mnist_k50"
    assert OmegaConf.create(printed) == load_config([ROOT / "configs/iwae_mnist.yaml"], ["model.k=50"])
    bad = vaepipe("config", "model.kk=1", check=False)
    assert bad.returncode == 2 and "unknown config key 'model.kk'" in bad.stderr
    assert "Traceback" not in bad.stderr
