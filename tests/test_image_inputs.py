"""Image inputs as a careful outsider would make them: decompression bombs, links to devices, hidden
folders, oversized files, split and class folders only partly there, splits of other sizes, 16-bit
and palette images, .npy records, labels on some records only, a manifest claiming its pipe: root
was given by the user. Each is refused in one line, skipped and named, or read right."""

import io
import json
import os
import tracemalloc
import zipfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from pipeline.data import image_source
from pipeline.data.image_source import Collection, ImageOptions, decode, plan_splits
from pipeline.data.index import decode_record, index
from pipeline.data.location import load_manifest
from pipeline.data.shards import prepare
from pipeline.data.stream import make_loader
from pipeline.errors import ManifestError
from tests.conftest import vaepipe
from tests.test_index import webdataset_shards


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def jpeg_bytes(size=(16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, "JPEG")
    return buf.getvalue()


def bomb() -> bytes:
    """A 16x16 JPEG whose frame header (SOF0) says 20000 x 20000 pixels."""
    data = bytearray(jpeg_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = (20000).to_bytes(2, "big") * 2
    return bytes(data)


def test_a_decompression_bomb_is_refused_before_it_is_decoded():
    tracemalloc.start()
    try:
        arr, why = decode((bomb(), ImageOptions(size=8)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert arr is None and "DecompressionBomb" in why, why
    assert peak < 20 * 2**20, peak  # 20000^2 RGB would be 1.2 GB


def test_the_folder_listing_takes_regular_image_files_only(tmp_path):
    root = tmp_path / "imgs"
    (root / "cats").mkdir(parents=True)
    (root / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (8, 8)).save(root / "cats" / "a.png")
    Image.new("RGB", (8, 8)).save(root / ".ipynb_checkpoints" / "a-checkpoint.png")
    os.symlink("/dev/zero", root / "cats" / "zero.png")
    os.symlink(root / "cats" / "a.png", root / "cats" / "link.png")
    assert Collection(root).names == ["cats/a.png"]


def test_an_oversized_file_is_skipped_and_named(tmp_path, monkeypatch):
    root = tmp_path / "imgs"
    root.mkdir()
    for name, size in (("a.png", 8), ("b.png", 8), ("huge.png", 64)):
        Image.new("RGB", (size, size), (1, 2, 3)).save(root / name)
    monkeypatch.setattr(image_source, "MAX_IMAGE_BYTES", (root / "huge.png").stat().st_size - 1)
    lines = []
    manifest = prepare("images", tmp_path / "out", source=str(root), images={"size": 8, "val": 0, "test": 0},
                       log=lines.append)
    assert manifest["splits"]["train"]["num_samples"] == 2 and manifest["images"]["skipped"] == 1
    assert "huge.png" in manifest["images"]["first_skipped"][0] and "bytes" in manifest["images"]["first_skipped"][0]


def names_of(layout: list[str]) -> list[str]:
    return sorted(layout)


@pytest.mark.parametrize("layout, words", [
    (["train/a.png", "cats/b.png"], "some images are under split folders"),
    (["train/cats/a.png", "train/b.png", "test/cats/c.png"], "some images are in class folders"),
    (["val/a.png", "test/b.png"], "without a train/ folder"),
])
def test_partial_split_or_class_folders_are_refused(layout, words):
    with pytest.raises(ValueError, match=words):
        plan_splits(names_of(layout), ImageOptions(), seed=0)


def test_validation_folders_and_a_missing_test_folder():
    names = [f"train/c{i % 2}/{i:03d}.png" for i in range(20)] + [f"validation/c{i % 2}/{i:03d}.png" for i in range(4)]
    splits, labels, classes = plan_splits(sorted(names), ImageOptions(test=5), seed=0)
    assert classes == ["c0", "c1"] and {s: len(v) for s, v in splits.items()} == {"train": 15, "val": 4, "test": 5}
    train = {sorted(names)[i] for i in splits["train"]}
    assert not train & {sorted(names)[i] for i in splits["test"]} and all(n.startswith("train/") for n in train)


def test_every_split_has_the_first_images_shape(tmp_path):
    for split, size in (("train", 8), ("test", 16)):
        (tmp_path / "imgs" / split).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (size, size)).save(tmp_path / "imgs" / split / f"{i}.png")
    proc = vaepipe("prepare", "images", "--source", tmp_path / "imgs", "--out", tmp_path / "out", "--val", "1",
                   check=False)
    assert proc.returncode == 2 and "--size" in proc.stderr and "Traceback" not in proc.stderr


def test_sixteen_bit_and_palette_images_keep_their_levels():
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    arr, why = decode((png_bytes(Image.fromarray(ramp)), ImageOptions(channels=1)))
    assert why is None and arr.shape == (1, 8, 8)
    assert np.abs(arr[0].astype(int) - np.round(ramp / 257)).max() <= 1  # scaled to 8 bits, not clipped at 255
    assert arr.max() > 200 and len(np.unique(arr)) > 50


def test_npy_records_take_the_same_channels_crop_and_size_as_images():
    rgb = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    buf = io.BytesIO()
    np.save(buf, rgb)
    opts = ImageOptions(channels=1, crop=(1, 1, 9, 9), size=4)
    from_npy, _ = decode_record({"npy": buf.getvalue()}, opts)
    from_png, _ = decode((png_bytes(Image.fromarray(rgb)), opts))
    assert from_npy.shape == (1, 4, 4) and np.array_equal(from_npy, from_png)
    no_resize = ImageOptions(channels=1, crop=(1, 1, 9, 9))  # crop and grey also when no resize is asked
    from_npy, from_png = decode_record({"npy": buf.getvalue()}, no_resize)[0], decode((png_bytes(Image.fromarray(rgb)), no_resize))[0]
    assert from_npy.shape == (1, 8, 8) and np.array_equal(from_npy, from_png)
    crafted = bytearray(buf.getvalue())
    at = crafted.index(b"(12, 10, 3)")
    crafted[at:at + 11] = b"(99999, 9,3"  # a header declaring more than the member holds
    assert decode_record({"npy": bytes(crafted)}, opts)[0] is None


def test_labels_on_some_records_only_are_refused(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(2):
        with wds.TarWriter(str(shards / f"{s:05d}.tar")) as sink:
            for i in range(4):
                sample = {"__key__": f"{s}{i}", "png": png_bytes(Image.new("RGB", (8, 8)))}
                if s or i:  # the very first record has none
                    sample["cls"] = b"1"
                sink.write(sample)
    with pytest.raises(ValueError, match="7 of 8 samples have a .cls label"):
        index(str(shards), tmp_path / "index", log=lambda *_: None)


def test_val_given_keeps_the_folders_test_shards_out_of_train(tmp_path):
    shards = webdataset_shards(tmp_path / "shards", tmp_path / "pwned")
    manifest = index(str(shards), tmp_path / "index", val=str(shards / "test-000000.tar"), log=lambda *_: None)
    names = {s: [sh["name"] for sh in e["shards"]] for s, e in manifest["splits"].items()}
    assert all(n.startswith("train-") for n in names["train"]) and names["val"] == names["test"] == ["test-000000.tar"]


def test_pipe_validation_shards_by_name(tmp_path):
    shards = webdataset_shards(tmp_path / "shards", tmp_path / "pwned")
    pipe = f"pipe:cat {shards}/{{name}}"
    manifest = index(pipe, tmp_path / "index", names=["train-000000.tar"], val=pipe, val_names=["val-000000.tar"],
                     log=lambda *_: None)
    assert manifest["splits"]["val"]["num_samples"] == 32
    given = load_manifest(str(tmp_path / "index"), shards=pipe)
    batches = list(make_loader(str(tmp_path / "index"), "val", 8, manifest=given))
    assert sum(len(b["x"]) for b in batches) == 32


def test_a_manifest_cannot_claim_its_pipe_root_was_given(tmp_path):
    shards = webdataset_shards(tmp_path / "shards", tmp_path / "pwned")
    index(str(shards), tmp_path / "index", log=lambda *_: None)
    path, marker = tmp_path / "index" / "manifest.json", tmp_path / "ran"
    manifest = json.loads(path.read_text())
    for entry in manifest["splits"].values():
        entry.update(root=f"pipe:touch {marker}; cat {shards}/{{name}}", _given=True)
    path.write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="unknown key"):
        list(make_loader(str(tmp_path / "index"), "val", 8))
    assert not marker.exists()


def test_a_zip_naming_one_member_twice_is_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "d.zip", "w") as z:
        for colour in (1, 2):
            z.writestr("a.png", png_bytes(Image.new("RGB", (4, 4), (colour, 0, 0))))
    with pytest.raises(ValueError, match="more than once"):
        Collection(tmp_path / "d.zip")


def test_a_compressed_tar_of_images_is_one_line(tmp_path):
    import gzip
    import tarfile

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        data = png_bytes(Image.new("RGB", (4, 4)))
        info = tarfile.TarInfo("a.png")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    (tmp_path / "imgs.tar.gz").write_bytes(gzip.compress(raw.getvalue()))
    proc = vaepipe("prepare", "images", "--source", tmp_path / "imgs.tar.gz", "--out", tmp_path / "out", check=False)
    assert proc.returncode == 2 and "compressed tar" in proc.stderr and "Traceback" not in proc.stderr


def test_index_of_one_shard_in_the_working_folder(tmp_path):
    shards = webdataset_shards(tmp_path / "shards", tmp_path / "pwned")
    proc = vaepipe("index", "train-000000.tar", "--val", "val-000000.tar", "--out", tmp_path / "index", cwd=shards)
    assert "70 samples" in proc.stdout
