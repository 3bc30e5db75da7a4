"""Where shards live: a local folder, an http(s) URL (optionally a brace pattern), or a `pipe:`
command template. The manifest is read from the same place as the shards.

- `data/sprites`                                   -> data/sprites/manifest.json, data/sprites/<shard>
- `https://host/sprites` or `https://host/sprites/train-{000000..000003}.tar`
                                                   -> https://host/sprites/manifest.json, .../<shard>
- `pipe:aws s3 cp s3://bucket/sprites/{name} -`    -> the command with {name} = manifest.json or a shard
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import urllib.request
from pathlib import Path

from braceexpand import braceexpand

from pipeline.data.manifest import check_manifest, check_shard_name
from pipeline.data.shards import MANIFEST, MAX_MANIFEST_BYTES, ShardError, read_manifest


def is_remote(root: str) -> bool:
    return root.startswith(("http://", "https://", "pipe:"))


def _base_url(root: str) -> str:
    if "{" in root and not root.startswith("pipe:"):  # a brace pattern of shard URLs: use its folder
        return next(iter(braceexpand(root))).rsplit("/", 1)[0]
    return root.rstrip("/")


def shard_url(root: str, name: str) -> str:
    """The URL webdataset opens for shard `name` under `root`. `name` must be a plain file name
    (data/manifest.py); in a `pipe:` command it is also shell-quoted, and a local path is made
    absolute, so that no name and no folder (`gs:x`, `pipe:...` relative to the working folder)
    is taken by webdataset for a URL scheme that runs a program."""
    root, name = str(root), check_shard_name(name, f"data.root '{root}'")
    if root.startswith("pipe:"):
        return root.replace("{name}", shlex.quote(name))
    if is_remote(root):
        return f"{_base_url(root)}/{name}"
    return os.path.join(os.path.abspath(root), name)


# load_manifest records the user's data.shards under this key: not a string, so no manifest (JSON,
# whose keys are strings) can claim that its pipe: root was given by the user
GIVEN_SHARDS = ("data.shards",)


def shards_base(root: str, entry: dict, manifest: dict | None = None) -> str:
    """Where a split's shards are: beside the manifest, or, for shards indexed where they lie
    (`vaepipe index`, data/index.py), the split's `root` in the manifest: a local folder or an
    http(s) URL. A `pipe:` root there is a command named by a shared file: used only when the user
    gave it (data.shards, which load_manifest puts in place and records under GIVEN_SHARDS)."""
    base = entry.get("root")
    if base is None:
        return str(root)
    if base.startswith("pipe:") and (manifest or {}).get(GIVEN_SHARDS) != base:
        raise ShardError(f"the manifest in '{root}' says its shards come from a shell command ({base[:120]!r}); vaepipe "
                         "runs no command named by a manifest: pass data.shards='pipe:...{name}...' yourself (eval: --shards)")
    return base


def data_root_for(stored: str, given: str | None, what: str = "--data-root") -> str:
    """The data root a command reads: the one the user gave (`--data-root`), else the one stored in
    a checkpoint's config, but only when that is a local folder. A stored `pipe:` command or URL is
    never used: a checkpoint is data, and running a command (or fetching from a host, with
    credentials) because a file said so is what a shared file must never do (docs/trust.md)."""
    if given:
        return str(given)
    stored = str(stored)
    if is_remote(stored):
        kind = "a shell command" if stored.startswith("pipe:") else "a URL"
        raise ShardError(f"the checkpoint's data.root is {kind} ({stored[:120]!r}); vaepipe never runs commands or "
                         f"opens URLs taken from a checkpoint: pass {what} with the data root you trust "
                         f"(e.g. {what} data/NAME, or the same {kind} if it is yours)")
    return stored


def load_manifest(root: str, shards: str | None = None) -> dict:
    """The manifest next to the shards, wherever they are, checked against the schema
    (data/manifest.py); errors name the location. `shards` (data.shards, the user's): where the
    shards of an indexed manifest are, instead of the roots it names."""
    root = str(root)
    manifest = _load_manifest(root)
    if shards:
        for entry in manifest["splits"].values():
            if "root" not in entry:
                raise ShardError(f"data.shards is for shards indexed by `vaepipe index`; the manifest in '{root}' "
                                 "lists its own shards beside it")
            entry["root"] = str(shards)
        manifest[GIVEN_SHARDS] = str(shards)
    return manifest


def _load_manifest(root: str) -> dict:
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
                text = r.read(MAX_MANIFEST_BYTES + 1)
        if len(text) > MAX_MANIFEST_BYTES:
            raise ShardError(f"the manifest of data.root '{root}' is larger than {MAX_MANIFEST_BYTES} bytes")
        manifest = json.loads(text)
    except (OSError, subprocess.SubprocessError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ShardError(f"cannot read the manifest for data.root '{root}': {err}") from None
    check_manifest(manifest, f"the manifest of data.root '{root}'")
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
    """Before reading: every local shard under `root` (shards_base) exists with the manifest's size
    (remote ones are checked as they stream: a failed or truncated download raises ShardError naming the URL)."""
    if is_remote(str(root)):
        return
    for shard in entry["shards"]:
        path = Path(root) / shard["name"]
        if not path.is_file():
            raise FileNotFoundError(f"shard {path} listed in the manifest is missing")
        if path.stat().st_size != shard["bytes"]:
            raise ShardError(f"shard {path} has {path.stat().st_size} bytes, the manifest says "
                             f"{shard['bytes']}: truncated or replaced; rerun `vaepipe prepare`")
