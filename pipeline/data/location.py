"""Where shards live: a local folder, an http(s) URL (optionally a brace pattern), or a `pipe:`
command template. The manifest is read from the same place as the shards.

- `data/sprites`                                   -> data/sprites/manifest.json, data/sprites/<shard>
- `https://host/sprites` or `https://host/sprites/train-{000000..000003}.tar`
                                                   -> https://host/sprites/manifest.json, .../<shard>
- `pipe:aws s3 cp s3://bucket/sprites/{name} -`    -> the command with {name} = manifest.json or a shard
"""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path

from braceexpand import braceexpand

from pipeline.data.shards import MANIFEST, SPLITS, ShardError, read_manifest


def is_remote(root: str) -> bool:
    return root.startswith(("http://", "https://", "pipe:"))


def _base_url(root: str) -> str:
    if "{" in root and not root.startswith("pipe:"):  # a brace pattern of shard URLs: use its folder
        return next(iter(braceexpand(root))).rsplit("/", 1)[0]
    return root.rstrip("/")


def shard_url(root: str, name: str) -> str:
    """The URL webdataset opens for shard `name` under `root`."""
    root = str(root)
    if root.startswith("pipe:"):
        return root.replace("{name}", name)
    if is_remote(root):
        return f"{_base_url(root)}/{name}"
    return str(Path(root) / name)


def load_manifest(root: str) -> dict:
    """The manifest next to the shards, wherever they are; errors name the location."""
    root = str(root)
    if not is_remote(root):
        return read_manifest(root)
    try:
        if root.startswith("pipe:"):
            if "{name}" not in root:
                raise ShardError(f"data.root '{root}': a pipe: command needs a {{name}} placeholder for the file")
            cmd = root[len("pipe:"):].replace("{name}", MANIFEST)
            text = subprocess.run(cmd, shell=True, check=True, capture_output=True, timeout=300).stdout
        else:
            with urllib.request.urlopen(f"{_base_url(root)}/{MANIFEST}", timeout=60) as r:
                text = r.read()
        manifest = json.loads(text)
    except (OSError, subprocess.SubprocessError, json.JSONDecodeError) as err:
        raise ShardError(f"cannot read the manifest for data.root '{root}': {err}") from None
    for split in SPLITS:
        if split not in manifest.get("splits", {}):
            raise ShardError(f"manifest for '{root}' has no split '{split}'")
    if "{" in root and not root.startswith("pipe:"):  # a pattern must name exactly manifest shards
        wanted = {u.rsplit("/", 1)[1] for u in braceexpand(root)}
        known = {s["name"] for e in manifest["splits"].values() for s in e["shards"]}
        if not wanted <= known:
            raise ShardError(f"data.root '{root}' names shards the manifest does not list: {sorted(wanted - known)[:5]}")
        for entry in manifest["splits"].values():
            entry["shards"] = [s for s in entry["shards"] if s["name"] in wanted] or entry["shards"]
            entry["num_samples"] = sum(s["num_samples"] for s in entry["shards"])  # what the steps are planned from
    return manifest


def check_local_shards(root: str, entry: dict) -> None:
    """Before reading: every local shard exists with the manifest's size (remote ones are checked
    as they stream: a failed or truncated download raises ShardError naming the URL)."""
    if is_remote(str(root)):
        return
    for shard in entry["shards"]:
        path = Path(root) / shard["name"]
        if not path.is_file():
            raise FileNotFoundError(f"shard {path} listed in the manifest is missing")
        if path.stat().st_size != shard["bytes"]:
            raise ShardError(f"shard {path} has {path.stat().st_size} bytes, the manifest says "
                             f"{shard['bytes']}: truncated or replaced; rerun `vaepipe prepare`")
