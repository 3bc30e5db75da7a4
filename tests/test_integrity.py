"""Verified reads: every record is checked against its checksum in the manifest as it is read
(data.verify), so a flipped byte, a zeroed block or a swapped shard of the same size is a clear
error naming the shard and the record (or, with data.on_error=skip, skipped and counted), on
local, http and pipe: shards alike."""

import json
import tarfile

import pytest
import torch

from pipeline.data.shards import ShardError, prepare
from pipeline.data.stream import make_loader
from tests.conftest import FAST, vaepipe
from tests.test_remote import served  # noqa: F401  (fixture: the shards behind a loopback http server)



@pytest.fixture()
def small(tmp_path):
    """Sprites, 512 training samples in 2 shards of 4 records of 64 (uint8 64x64: 256 KiB a record)."""
    root = tmp_path / "data"
    prepare("sprites", root, seed=0, sizes={"train": 512, "val": 64, "test": 64}, shard_samples=256,
            log=lambda *_: None)
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["splits"]["train"]["samples_per_record"] == 128
    return root


def member_offset(shard, record: int, name: str = "x.bin") -> int:
    """Byte offset in the tar file of the data of member `name` of the record-th record."""
    with tarfile.open(shard) as tar:
        members = [m for m in tar.getmembers() if m.name.endswith("." + name)]
        return members[record].offset_data


def read_all(root, **kw) -> torch.Tensor:
    return torch.cat([b["x"] for b in make_loader(str(root), "train", 64, raw=True, **kw)])


def test_manifest_holds_a_checksum_per_record(small):
    shards = json.loads((small / "manifest.json").read_text())["splits"]["train"]["shards"]
    assert [len(s["records"]) for s in shards] == [2, 2]
    assert len({c for s in shards for c in s["records"]}) == 4
    assert len(read_all(small)) == 512


def test_a_flipped_byte_in_sample_data_is_named(small):
    clean = read_all(small)
    shard = small / "train-000001.tar"
    size = shard.stat().st_size
    at = member_offset(shard, 1) + 12345
    data = bytearray(shard.read_bytes())
    data[at] ^= 0x01
    shard.write_bytes(bytes(data))
    assert shard.stat().st_size == size  # same size: the manifest's size check cannot see it
    with pytest.raises(ShardError, match=r"train-000001\.tar.*record 1 \('train-00000384'\) does not match its checksum"):
        read_all(small)
    # data.verify=false reads it silently: exactly one sample differs from the clean read, by one grey level
    changed = (read_all(small, verify=False).int() - clean.int()).abs()
    assert int((changed.flatten(1).sum(1) > 0).sum()) == 1 and int(changed.max()) == 1


def test_a_zeroed_block_is_named_and_skip_passes_over_the_record(small):
    shard = small / "train-000000.tar"
    at = member_offset(shard, 0) + 50_000
    data = bytearray(shard.read_bytes())
    data[at:at + 4096] = bytes(4096)
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"train-000000\.tar.*record 0 \('train-00000000'\)"):
        read_all(small)
    with pytest.warns(UserWarning, match=r"skipping unreadable data in shard .*train-000000\.tar.*record 0"):
        kept = read_all(small, on_error="skip")
    assert len(kept) == 512 - 128  # the corrupt record's 128 samples, and nothing else, passed over
    assert torch.equal(kept, read_all(small, verify=False)[128:])


def test_a_swapped_shard_of_the_same_size_is_named(small):
    a, b = small / "train-000000.tar", small / "train-000001.tar"
    assert a.stat().st_size == b.stat().st_size
    tmp = small / "swap"
    a.rename(tmp), b.rename(a), tmp.rename(b)
    with pytest.raises(ShardError, match=r"train-000000\.tar.*record 0 \('train-00000256'\) does not match"):
        read_all(small)


def test_remote_shards_are_verified_the_same_way(served):  # noqa: F811
    folder, url = served
    shard = folder / "train-000002.tar"
    data = bytearray(shard.read_bytes())
    data[member_offset(shard, 0) + 777] ^= 0xFF
    shard.write_bytes(bytes(data))
    for root in (url, f"pipe:cat {folder}/{{name}}"):
        with pytest.raises(ShardError, match=r"train-000002\.tar.*record 0 .*does not match its checksum"):
            read_all(root)


def test_shards_without_checksums_are_read_with_a_warning(small):
    manifest = json.loads((small / "manifest.json").read_text())
    for s in manifest["splits"]["train"]["shards"]:
        del s["records"]
    (small / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match="no per-record checksums"):
        assert len(read_all(small)) == 512


def test_fit_stops_on_a_corrupt_record_and_names_it(small, tmp_path):
    shard = small / "train-000001.tar"
    data = bytearray(shard.read_bytes())
    data[member_offset(shard, 0) + 99] ^= 0x10
    shard.write_bytes(bytes(data))
    args = ["fit", *FAST, "data.name=sprites", f"data.root={small}", "model.arch=mlp", "model.hidden=[16]",
            "model.latent_dim=2", "model.eval_k=0", "data.batch_size=64", "trainer.max_steps=4"]
    for resident in ("true", "false"):  # the device-resident load and the stream read the same way
        proc = vaepipe(*args, f"data.resident={resident}", f"run.dir={tmp_path / resident}", check=False)
        assert proc.returncode != 0
        assert "train-000001.tar" in proc.stderr and "does not match its checksum" in proc.stderr
        assert "Traceback" not in proc.stderr
    vaepipe(*args, "data.verify=false", f"run.dir={tmp_path / 'unverified'}")
