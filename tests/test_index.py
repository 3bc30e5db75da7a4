"""`vaepipe index`: standard WebDataset shards, written here by webdataset's own TarWriter in
img2dataset's layout ({key}.jpg + {key}.json, no class, uneven shards) and webdataset's ({key}.png +
{key}.cls, keys with folders and dots, one shard gzip-compressed), are described where they lie and
trained on as they are: labels, skipped records, pickles never unpickled, a pipe: root only when
the user gives it, the shard files byte-identical afterwards, and an elastic 2 -> 1 process resume
that continues the global order exactly."""

import gzip
import hashlib
import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from pipeline.checkpoints import load_checkpoint
from pipeline.data.location import load_manifest
from pipeline.data.stream import make_loader
from pipeline.errors import ShardError
from tests.conftest import FAST, vaepipe
from tests.test_elastic import recorded

ID_SHAPE = (8, 8)  # grey images whose first pixel is the sample's id (lossless PNG)


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def jpg(rng, size) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def digests(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


class _CreatesFile:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def img2dataset_shards(folder: Path, sizes=(7, 3, 5)) -> Path:
    """00000.tar ...: 9-digit keys, {key}.jpg of several sizes + {key}.json, no class member."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for s, n in enumerate(sizes):
        with wds.TarWriter(str(folder / f"{s:05d}.tar")) as sink:
            for i in range(n):
                key = f"{s:04d}{i:05d}"
                size = (int(rng.integers(20, 40)), int(rng.integers(20, 40)))
                sink.write({"__key__": key, "jpg": jpg(rng, size),
                            "json": json.dumps({"key": key, "status": "success", "width": size[1]}).encode()})
    return folder


def webdataset_shards(folder: Path, marker: Path) -> Path:
    """train-*, val-*, test-* shards of 8x8 grey PNGs whose first pixel is the sample id, .cls labels,
    keys under folders with dots; one train shard gzip-compressed; a pickle member that must stay shut."""
    folder.mkdir(parents=True)
    next_id = 0
    for name, n in (("train-000000.tar", 70), ("train-000001.tar.gz", 50), ("train-000002.tar", 80),
                    ("train-000003.tar", 56), ("val-000000.tar", 32), ("test-000000.tar", 16)):
        buf = io.BytesIO()
        with wds.TarWriter(buf) as sink:
            for _ in range(n):
                image = np.full(ID_SHAPE, 0, dtype=np.uint8)
                image[0, 0], image[0, 1] = next_id % 256, next_id // 256
                sample = {"__key__": f"vol.{next_id % 3}/img_{next_id:05d}", "png": png(image),
                          "cls": str(next_id % 4).encode()}
                if next_id == 5:
                    sample["pyd"] = pickle.dumps(_CreatesFile(marker))
                sink.write(sample)
                next_id += 1
        data = buf.getvalue()
        (folder / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    return folder


def test_img2dataset_shards_are_indexed_and_trained_on_as_they_are(tmp_path):
    shards = img2dataset_shards(tmp_path / "shards")
    (shards / "00001.tar").write_bytes((shards / "00001.tar").read_bytes())  # (files as img2dataset leaves them)
    before = digests(shards)
    out = vaepipe("index", shards, "--out", tmp_path / "index", "--size", "16").stdout
    assert "validation: the last train shard, 00002.tar (5 samples)" in out
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    counts = {s: e["num_samples"] for s, e in manifest["splits"].items()}
    assert counts == {"train": 10, "val": 5, "test": 0} and manifest["splits"]["train"]["shape"] == [3, 16, 16]
    assert manifest["splits"]["train"]["label"] is None and not list((tmp_path / "index").glob("*.tar"))
    x = torch.cat([b["x"] for b in make_loader(str(tmp_path / "index"), "train", 4)])
    assert x.shape == (10, 3, 16, 16) and "y" not in next(iter(make_loader(str(tmp_path / "index"), "val", 4)))
    vaepipe("fit", f"data.root={tmp_path / 'index'}", "data.name=images", f"run.dir={tmp_path / 'run'}",
            "model.arch=mlp", "model.hidden=[16]", "model.latent_dim=2", "model.likelihood=gaussian",
            "data.batch_size=4", "trainer.max_steps=4", "model.eval_k=2", "logger.image_every_n_epochs=0",
            "run.test=false", *FAST)
    assert digests(shards) == before  # read, never written


def test_webdataset_shards_labels_folders_gzip_skips_and_no_pickle(tmp_path):
    marker = tmp_path / "pwned"
    shards = webdataset_shards(tmp_path / "shards", marker)
    # one record whose image is not an image: left out of the count, named, passed over when read
    with wds.TarWriter(str(shards / "train-000004.tar")) as sink:
        sink.write({"__key__": "bad", "png": b"not a png", "cls": b"1"})
        sink.write({"__key__": "good", "png": png(np.full(ID_SHAPE, 7, np.uint8)), "cls": b"2"})
    before = digests(shards)
    proc = vaepipe("index", shards, "--out", tmp_path / "index", "--channels", "1")
    assert "1 unreadable record(s) left out" in proc.stdout and "train-000004.tar record 0 ('bad')" in proc.stdout
    manifest = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert {s: e["num_samples"] for s, e in manifest["splits"].items()} == {"train": 257, "val": 32, "test": 16}
    assert manifest["splits"]["train"]["label"] == "cls" and manifest["splits"]["train"]["shape"] == [1, 8, 8]
    batches = list(make_loader(str(tmp_path / "index"), "train", 64))
    x, y = torch.cat([b["x"] for b in batches]), torch.cat([b["y"] for b in batches])
    ids = (x[:, 0, 0, 0] * 255).round().long() + 256 * (x[:, 0, 0, 1] * 255).round().long()
    assert ids[:256].tolist() == list(range(256)) and ids[256] == 7 + 7 * 256  # shard order; the bad record passed over
    assert y[:256].tolist() == [i % 4 for i in range(256)] and y[256] == 2
    assert not marker.exists() and digests(shards) == before
    # --on-error stop: one line naming the record
    proc = vaepipe("index", shards, "--out", tmp_path / "i2", "--on-error", "stop", check=False)
    assert proc.returncode == 2 and "'bad'" in proc.stderr and "Traceback" not in proc.stderr


def test_a_pipe_root_in_a_manifest_is_used_only_when_given(tmp_path):
    shards = webdataset_shards(tmp_path / "shards", tmp_path / "pwned")
    vaepipe("index", shards, "--out", tmp_path / "index")
    manifest_path = tmp_path / "index" / "manifest.json"
    manifest, marker = json.loads(manifest_path.read_text()), tmp_path / "ran"
    for entry in manifest["splits"].values():
        entry["root"] = f"pipe:touch {marker}; cat {shards}/{{name}}"  # as a shared manifest might say
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="pass data.shards"):
        list(make_loader(str(tmp_path / "index"), "val", 8))
    assert not marker.exists()
    given = load_manifest(str(tmp_path / "index"), shards=f"pipe:cat {shards}/{{name}}")  # the user's own command
    batches = list(make_loader(str(tmp_path / "index"), "val", 8, manifest=given))
    assert sum(len(b["x"]) for b in batches) == 32 and not marker.exists()


def test_two_processes_killed_resume_on_one_exactly(tmp_path):
    """The elastic resume of tests/test_elastic.py on indexed standard shards: 2 DDP processes, a
    SIGTERM mid-epoch, resumed on 1 process: the same global batches step by step, the weights of the
    uninterrupted run (up to float summation order), the shards byte-identical."""
    shards = webdataset_shards(tmp_path / "shards", tmp_path / "pwned")
    before = digests(shards)
    vaepipe("index", shards, "--out", tmp_path / "index")
    steps = 20  # 256 samples, global batch 32: 8 steps an epoch; the stop at 11 is inside epoch 1

    def fit(run, world, env=None, check=True):
        return vaepipe("fit", f"data.root={tmp_path / 'index'}", "data.name=images", f"run.dir={run}",
                       f"trainer.devices={world}", f"data.batch_size={32 // world}", "data.resident=false",
                       f"trainer.max_steps={steps}", "trainer.max_epochs=-1", "data.shuffle_buffer=100", "run.seed=3",
                       "model.arch=mlp", "model.hidden=[16]", "model.latent_dim=2", "model.likelihood=gaussian",
                       "model.eval_k=0", "trainer.steps_per_call=1", "trainer.check_val_every_n_epoch=100",
                       "logger.image_every_n_epochs=0", "trainer.accelerator=cpu", "run.test=false", *FAST,
                       env=env, check=check)

    fit(tmp_path / "ref", 2, env={"VAEPIPE_RECORD_BATCHES": str(tmp_path / "ref.ids")})
    rec = {"VAEPIPE_RECORD_BATCHES": str(tmp_path / "run.ids")}
    first = fit(tmp_path / "run", 2, env={**rec, "VAEPIPE_FAULT": "11:TERM"}, check=False)
    assert first.returncode == 75, first.stderr[-3000:]
    second = fit(tmp_path / "run", 1, env=rec)
    assert "world_size 2 -> 1" in second.stdout
    got, want = recorded(tmp_path / "run.ids", 255), recorded(tmp_path / "ref.ids", 255)  # first pixel: the id
    assert sorted(got) == list(range(steps)) and got == want
    a, b = (load_checkpoint(tmp_path / r / "checkpoints/last.ckpt")["state_dict"] for r in ("ref", "run"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4  # summation order only (test_elastic.py)
    assert digests(shards) == before


def test_shards_indexed_over_http_and_a_pipe_read_like_local_ones(tmp_path):
    """The same shards indexed from a folder, from http:// (brace patterns, a loopback server) and
    from a pipe: command (--names): the same samples; the pipe: one is read with data.shards."""
    import functools
    import threading
    from http.server import ThreadingHTTPServer

    from tests.test_remote import QuietHandler

    shards = webdataset_shards(tmp_path / "shards", tmp_path / "pwned")
    (shards / "train-000001.tar.gz").unlink()  # curl would hand the gzip through as it is: plain tars here
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(shards)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        train = "train-{000000,000002,000003}.tar"
        vaepipe("index", shards, "--out", tmp_path / "local")
        vaepipe("index", f"{url}/{train}", "--val", f"{url}/val-000000.tar", "--test", f"{url}/test-000000.tar",
                "--out", tmp_path / "http")
        vaepipe("index", f"pipe:cat {shards}/{{name}}", "--names", train, "--val", f"{shards}/val-000000.tar",
                "--test", f"{shards}/test-000000.tar", "--out", tmp_path / "pipe")
        local = torch.cat([b["x"] for b in make_loader(str(tmp_path / "local"), "train", 64)])
        http = torch.cat([b["x"] for b in make_loader(str(tmp_path / "http"), "train", 64)])
        given = load_manifest(str(tmp_path / "pipe"), shards=f"pipe:cat {shards}/{{name}}")
        piped = torch.cat([b["x"] for b in make_loader(str(tmp_path / "pipe"), "train", 64, manifest=given)])
        assert torch.equal(local, http) and torch.equal(local, piped) and len(local) == 206
    finally:
        server.shutdown()
        server.server_close()


def test_fit_and_eval_on_shards_indexed_from_a_pipe_command(tmp_path):
    """`vaepipe index 'pipe:...'`, then fit with data.shards and eval with --shards: the user's own
    command reads the shards; without it, eval says which flag to pass."""
    shards = webdataset_shards(tmp_path / "shards", tmp_path / "pwned")
    pipe = f"pipe:cat {shards}/{{name}}"
    vaepipe("index", pipe, "--names", "train-{000000,000002,000003}.tar", "--val", pipe, "--val-names",
            "val-000000.tar", "--out", tmp_path / "index")
    run = tmp_path / "run"
    vaepipe("fit", f"data.root={tmp_path / 'index'}", "data.name=images", f"data.shards={pipe}", f"run.dir={run}",
            "model.arch=mlp", "model.hidden=[16]", "model.latent_dim=2", "model.likelihood=gaussian",
            "data.batch_size=16", "trainer.max_steps=4", "model.eval_k=2", "logger.image_every_n_epochs=0",
            "run.test=false", *FAST)
    refused = vaepipe("eval", run, "--k", "2", "--split", "val", check=False)
    assert refused.returncode == 2 and "--shards" in refused.stderr and "Traceback" not in refused.stderr
    out = vaepipe("eval", run, "--k", "2", "--split", "val", "--json", "--shards", pipe).stdout
    assert json.loads(out)["examples"] == 32
