"""Shards from a loopback HTTP server (plain and brace-pattern URLs) and from a `pipe:` command, with
the manifest read from the same place; failed and truncated downloads named; on_error=skip."""

import functools
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from pipeline.data.location import load_manifest
from pipeline.data.shards import ShardError
from pipeline.data.stream import make_loader
from tests.conftest import FAST, vaepipe
from pipeline.checkpoints import load_checkpoint


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture()
def served(sprites_root, tmp_path):
    """A copy of the sprites shards behind http://127.0.0.1:<port>, stopped after the test."""
    folder = tmp_path / "www"
    shutil.copytree(sprites_root, folder)
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def xs(root, split="train", **kw):
    return torch.cat([b["x"] for b in make_loader(root, split, 64, **kw)])


def test_http_and_pipe_read_the_same_samples_as_local(sprites_root, served):
    _, url = served
    local = xs(str(sprites_root))
    assert load_manifest(url) == load_manifest(str(sprites_root))
    assert torch.equal(xs(url), local)
    assert torch.equal(xs(f"pipe:cat {sprites_root}/{{name}}"), local)
    assert torch.equal(xs(url, shuffle=True, seed=3, num_workers=2), xs(str(sprites_root), shuffle=True, seed=3,
                                                                        num_workers=2))
    # a brace pattern restricts a split to the shards it names
    assert len(xs(f"{url}/train-{{000000..000001}}.tar")) == 256
    # ... and its size, from which a run plans its steps per epoch (the other splits stay whole)
    splits = load_manifest(f"{url}/train-{{000000..000001}}.tar")["splits"]
    assert splits["train"]["num_samples"] == 256 and splits["val"]["num_samples"] == 128


def test_failed_and_truncated_downloads_are_named(served):
    folder, url = served
    (folder / "train-000003.tar").unlink()
    with pytest.raises(ShardError, match=r"train-000003\.tar"):
        xs(url)
    with pytest.warns(UserWarning, match=r"skipping unreadable data in shard .*train-000003\.tar"):
        assert len(xs(url, on_error="skip")) == 640 - 128
    (folder / "train-000001.tar").write_bytes((folder / "train-000002.tar").read_bytes()[:3000])
    with pytest.raises(ShardError, match=r"train-00000[13]\.tar"):
        xs(url)
    with pytest.raises(ShardError, match="cannot read the manifest"):
        load_manifest(url + "/nowhere")


def test_fit_streams_from_http(served, tmp_path):
    _, url = served
    vaepipe("fit", f"data.root={url}", f"run.dir={tmp_path / 'run'}", "trainer.max_steps=4", "model.arch=mlp",
            "model.hidden=[16]", "model.latent_dim=2", "model.eval_k=0", "data.batch_size=32", *FAST)
    assert load_checkpoint(tmp_path / "run/checkpoints/last.ckpt")["global_step"] == 4
