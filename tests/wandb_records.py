"""Read what an offline wandb run wrote: the records of its `run-<id>.wandb` file.

wandb 0.31 has no Python reader (its core is Go), so this parses the file directly: a 7-byte
header (':W&B', 2 magic bytes, version 0), then LevelDB log records in 32 KiB blocks (crc32 u32,
length u16, type u8: 1 full, 2 first, 3 middle, 4 last), each payload a protobuf `Record`.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32768
HEADER = 7


def records(path: str | Path):
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb data file"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:  # the block's tail is padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        payload = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            continue
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(pending)
            yield rec
            pending = b""


def _key(item) -> str:
    return item.key or ".".join(item.nested_key)


def read_run(run_folder: str | Path) -> dict:
    """{'id', 'config': {key: value}, 'history': [{key: value}], 'summary': {key: value}}."""
    run_folder = Path(run_folder)
    (path,) = run_folder.glob("run-*.wandb")
    out = {"id": path.stem[len("run-"):], "config": {}, "history": [], "summary": {}}
    for rec in records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "config":
            out["config"].update({_key(i): json.loads(i.value_json) for i in rec.config.update})
        elif kind == "history":
            out["history"].append({_key(i): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "summary":
            out["summary"].update({_key(i): json.loads(i.value_json) for i in rec.summary.update})
        elif kind == "run":
            out["id"] = rec.run.run_id
            out["config"].update({_key(i): json.loads(i.value_json) for i in rec.run.config.update})
    return out
