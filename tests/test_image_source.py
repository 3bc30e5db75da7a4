"""`vaepipe prepare images`: a folder, a zip and a tar of images (coloured shapes written here as JPEG
and PNG, one corrupt file among them) become the same shards, whatever the number of workers; labels
from class folders, splits from split folders or held out by the seed; a bad image is skipped and
named (or stops the run); a fit trains on the result."""

import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.checkpoints import load_checkpoint
from pipeline.data.shards import prepare
from pipeline.data.stream import make_loader
from tests.conftest import FAST, SHARED_DATA, needs_shared, vaepipe

CLASSES = ("circle", "square")


def shapes_folder(root: Path, n_per_class: int = 12, split_folders: bool = False, seed: int = 0) -> Path:
    """Coloured circles and squares of several sizes on a grey ground, half JPEG, half PNG."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    for split in (("train", "test") if split_folders else ("",)):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n_per_class):
                w, h = int(rng.integers(24, 48)), int(rng.integers(24, 48))
                img = Image.new("RGB", (w, h), (128, 128, 128))
                colour = tuple(int(v) for v in rng.integers(0, 256, 3))
                box = (w // 4, h // 4, 3 * w // 4, 3 * h // 4)
                (ImageDraw.Draw(img).ellipse if c == 0 else ImageDraw.Draw(img).rectangle)(box, fill=colour)
                img.save(folder / f"{i:03d}.{'jpg' if i % 2 else 'png'}")
    (root / ("train" if split_folders else "") / "circle" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    return root


def archive(folder: Path, out: Path) -> Path:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if out.suffix == ".zip":
        with zipfile.ZipFile(out, "w") as z:
            for p in files:
                z.write(p, f"shapes/{p.relative_to(folder)}")
    else:
        with tarfile.open(out, "w") as t:
            for p in files:
                t.add(p, f"shapes/{p.relative_to(folder)}")
    return out


def shard_digests(root: Path) -> list:
    manifest = json.loads((root / "manifest.json").read_text())
    return [(s["name"], s["sha256"]) for e in manifest["splits"].values() for s in e["shards"]]


def test_folder_zip_and_tar_give_the_same_shards_whatever_the_workers(tmp_path):
    folder = shapes_folder(tmp_path / "shapes")
    common = ["--size", "16", "--val", "4", "--test", "4", "--shard-samples", "8"]
    outs = {}
    for label, source, workers in (("folder0", folder, 0), ("folder2", folder, 2),
                                   ("zip", archive(folder, tmp_path / "s.zip"), 2),
                                   ("tar", archive(folder, tmp_path / "s.tar"), 1)):
        proc = vaepipe("prepare", "images", "--source", source, "--out", tmp_path / label, "--workers", workers, *common)
        assert "1 unreadable image(s) skipped" in proc.stdout + proc.stderr and "broken.jpg" in proc.stdout + proc.stderr
        outs[label] = shard_digests(tmp_path / label)
    assert outs["folder0"] == outs["folder2"] == outs["zip"] == outs["tar"]
    manifest = json.loads((tmp_path / "folder0" / "manifest.json").read_text())
    assert manifest["classes"] == list(CLASSES) and manifest["scale"] == pytest.approx(1 / 255)
    counts = {s: e["num_samples"] for s, e in manifest["splits"].items()}
    assert counts == {"train": 16, "val": 4, "test": 4}  # 24 good images (the broken one skipped)
    assert manifest["splits"]["train"]["shape"] == [3, 16, 16] and manifest["images"]["skipped"] == 1
    batch = next(iter(make_loader(str(tmp_path / "folder0"), "train", 16)))
    assert set(batch["y"].tolist()) <= {0, 1} and batch["x"].shape == (16, 3, 16, 16)


def test_pixels_are_the_images(tmp_path):
    """Solid-colour PNGs (lossless) of several sizes and modes: every prepared pixel is the colour."""
    from PIL import Image

    colours = {"a.png": (200, 30, 90), "b.png": (0, 255, 12), "c.png": (7, 7, 250)}
    folder = tmp_path / "solid"
    folder.mkdir()
    for i, (name, colour) in enumerate(colours.items()):
        img = Image.new("RGB", (20 + 7 * i, 31 - 3 * i), colour)
        if i == 1:  # a palette image whose one entry is the colour
            img = Image.new("P", img.size, 0)
            img.putpalette(list(colour))
        (img.convert("RGBA") if i == 2 else img).save(folder / name)
    manifest = prepare("images", tmp_path / "out", source=str(folder), images={"size": 8, "val": 0, "test": 0},
                       log=lambda *_: None)
    assert manifest["classes"] is None and manifest["splits"]["train"]["num_samples"] == 3
    x = next(iter(make_loader(str(tmp_path / "out"), "train", 3)))["x"]  # name order: a, b, c
    for image, colour in zip(x, colours.values()):
        assert ((image * 255).round() == torch.tensor(colour).view(3, 1, 1)).all()


def test_split_folders_labels_and_a_held_out_validation(tmp_path):
    folder = shapes_folder(tmp_path / "shapes", n_per_class=6, split_folders=True)
    manifest = prepare("images", tmp_path / "out", source=str(folder), images={"size": 8, "val": 2},
                       log=lambda *_: None)
    counts = {s: e["num_samples"] for s, e in manifest["splits"].items()}
    assert counts == {"train": 10, "val": 2, "test": 12}  # train/ (one broken) less 2 held out; test/ whole
    y = np.concatenate([b["y"].numpy() for b in make_loader(str(tmp_path / "out"), "test", 4)])
    assert sorted(y.tolist()) == [0] * 6 + [1] * 6  # class folders -> labels, in class-name order


def test_a_bad_image_stops_the_run_when_asked_and_sizes_must_agree(tmp_path):
    folder = shapes_folder(tmp_path / "shapes", n_per_class=3)
    proc = vaepipe("prepare", "images", "--source", folder, "--out", tmp_path / "a", "--size", "8", "--on-error",
                   "stop", check=False)
    assert proc.returncode == 2 and "broken.jpg" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "a" / "manifest.json").exists()
    proc = vaepipe("prepare", "images", "--source", folder, "--out", tmp_path / "b", check=False)  # no --size
    assert proc.returncode == 2 and "--size" in proc.stderr and "Traceback" not in proc.stderr


def test_grey_crop_and_fit_on_prepared_images(tmp_path):
    folder = shapes_folder(tmp_path / "shapes", n_per_class=40)
    vaepipe("prepare", "images", "--source", folder, "--out", tmp_path / "data", "--crop", "0,0,24,24", "--size", "12",
            "--channels", "1", "--val", "10", "--test", "10")
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["shape"] == [1, 12, 12]
    out = vaepipe("fit", f"data.root={tmp_path / 'data'}", "data.name=images", f"run.dir={tmp_path / 'run'}",
                  "model.arch=mlp", "model.hidden=[32]", "model.latent_dim=2", "model.likelihood=gaussian",
                  "data.batch_size=16", "trainer.max_steps=6", "model.eval_k=2", "logger.image_every_n_epochs=0",
                  *FAST).stdout
    assert "done at step 6" in out


@needs_shared
def test_cifar10_zip_end_to_end(tmp_path):
    """The real CIFAR-10 zip (60 000 JPEGs in cifar10/{train,test}/<class>/), read in place: the
    standard split (5 000 of train held out for validation), then a short fit and an eval on it."""
    source = SHARED_DATA / "cifar10" / "cifar10-jpeg.zip"
    if not source.is_file():
        pytest.skip(f"{source} absent")
    vaepipe("prepare", "images", "--source", source, "--out", tmp_path / "cifar10", "--workers", "2")
    manifest = json.loads((tmp_path / "cifar10" / "manifest.json").read_text())
    assert {s: e["num_samples"] for s, e in manifest["splits"].items()} == {"train": 45000, "val": 5000, "test": 10000}
    assert manifest["classes"][:3] == ["airplane", "automobile", "bird"] and manifest["images"]["skipped"] == 0
    assert manifest["splits"]["test"]["shape"] == [3, 32, 32]
    run = tmp_path / "run"
    out = vaepipe("fit", f"data.root={tmp_path / 'cifar10'}", "data.name=images", f"run.dir={run}", "model.arch=mlp",
                  "model.hidden=[64]", "model.latent_dim=8", "model.likelihood=gaussian", "trainer.max_steps=20",
                  "trainer.val_check_interval=20", "model.eval_k=2", "logger.image_every_n_epochs=0", "run.test=false",
                  *FAST).stdout
    assert "train split resident" in out  # 150 MB of uint8: held in memory (a quarter of it is the budget)
    result = json.loads(vaepipe("eval", run, "--k", "4", "--limit", "50", "--json").stdout)
    assert result["examples"] == 50 and np.isfinite(result["nll"])


def test_resident_when_it_fits_streamed_when_not_same_run(tmp_path):
    """An image set small enough is held on the device (data.resident=auto), a small budget streams it
    from the shards: the same global order, the same weights."""
    folder = shapes_folder(tmp_path / "shapes", n_per_class=40)
    vaepipe("prepare", "images", "--source", folder, "--out", tmp_path / "data", "--size", "12", "--val", "8")
    runs = {}
    for name, budget in (("resident", "0"), ("streamed", "0.00001")):
        runs[name] = tmp_path / name
        out = vaepipe("fit", f"data.root={tmp_path / 'data'}", "data.name=images", f"run.dir={runs[name]}",
                      "model.arch=mlp", "model.hidden=[32]", "model.latent_dim=2", "model.likelihood=gaussian",
                      "data.batch_size=16", "trainer.max_steps=9", "trainer.max_epochs=-1", "model.eval_k=0",
                      "logger.image_every_n_epochs=0", "run.test=false", f"data.resident_max_gb={budget}", *FAST).stdout
        assert ("train split resident" in out) == (name == "resident") and ("streaming" in out) == (name == "streamed")
    a, b = (load_checkpoint(runs[n] / "checkpoints/last.ckpt")["state_dict"] for n in ("resident", "streamed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_simplejpeg_and_pillow_give_the_same_pixels(tmp_path):
    """JPEGs decode through simplejpeg when installed: the shards must not depend on it."""
    import pipeline.data.image_source as source

    if source._simplejpeg is None:
        pytest.skip("simplejpeg is not installed: Pillow decodes every image")
    folder = shapes_folder(tmp_path / "shapes", n_per_class=10)
    jpegs = [p.read_bytes() for p in sorted(folder.rglob("*.jpg")) if p.name != "broken.jpg"]
    for opts in (source.ImageOptions(), source.ImageOptions(size=16, channels=1),
                 source.ImageOptions(crop=(2, 3, 20, 21), size=8)):
        fast = [source.decode((data, opts))[0] for data in jpegs]
        sj, source._simplejpeg = source._simplejpeg, None
        try:
            slow = [source.decode((data, opts))[0] for data in jpegs]
        finally:
            source._simplejpeg = sj
        assert all(np.array_equal(a, b) for a, b in zip(fast, slow))
