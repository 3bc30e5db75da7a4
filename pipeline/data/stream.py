"""Streaming loader over the shards (webdataset) and the LightningDataModule around it.

Per epoch: the shard list is shuffled from (seed, epoch), split by rank and by worker, read as
tar streams, shuffled in a buffer (seeded the same way), decoded from raw bytes and batched.
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from pipeline.data.shards import ShardError, read_manifest

# with_length() only feeds progress bars here; the epoch length is the data's, as intended.
warnings.filterwarnings("ignore", message=r"\.with_length\(\) only sets")
warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")


class EpochShardList(wds.SimpleShardList):
    """Shard URLs in an order fixed by (seed, epoch): identical on every rank, new each epoch.

    webdataset's own shuffles either ignore the epoch or count epochs inside each worker process,
    which restarts at 0 whenever workers are recreated; here the epoch is given explicitly."""

    def __init__(self, urls: list[str], seed: int | None, epoch: int = 0):
        super().__init__(urls, seed=None)
        self.shuffle_seed, self.epoch = seed, epoch

    def __iter__(self):
        urls = list(self.urls)
        if self.shuffle_seed is not None:
            random.Random(f"{self.shuffle_seed}-{self.epoch}").shuffle(urls)
        for url in urls:
            yield dict(url=url)


def _raise_with_shard(exn: Exception) -> bool:
    # webdataset appends the failing URL to the exception's args; name it in the message.
    source = next((a for a in exn.args if isinstance(a, str) and a.endswith(".tar")), None)
    raise ShardError(f"cannot read shard {source or '(unknown)'}: {exn.args[0] if exn.args else exn!r}") from exn


class Decoder:
    """Raw bytes -> numpy arrays, from the shape/dtype in the manifest (picklable for workers)."""

    def __init__(self, shape, dtype: str):
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)

    def __call__(self, sample: dict) -> dict:
        try:
            x = np.frombuffer(sample["x.bin"], dtype=self.dtype).reshape(self.shape)
        except (KeyError, ValueError) as err:
            raise ShardError(f"sample '{sample.get('__key__')}' in {sample.get('__url__')}: bad 'x.bin' "
                             f"(expected {self.shape} {self.dtype}): {err}") from None
        out = {"x": x}
        if "y.cls" in sample:
            out["y"] = int(sample["y.cls"])
        if "factors.bin" in sample:
            out["factors"] = np.frombuffer(sample["factors.bin"], dtype=np.int64)
        return out


class Collate:
    """Stack a batch of raw arrays, convert to float32 and scale once per batch (not per sample),
    then binarise if asked: `dynamic` redraws x ~ Bernoulli(pixel) on every read (the IWAE paper's
    MNIST), `threshold` keeps x > 0.5."""

    def __init__(self, scale: float, binarize: str = "none"):
        self.scale, self.binarize = float(scale), binarize

    def __call__(self, samples: list[dict]) -> dict:
        x = torch.from_numpy(np.stack([s["x"] for s in samples])).float()
        if self.scale != 1.0:
            x.mul_(self.scale)
        if self.binarize == "dynamic":
            x = torch.bernoulli(x)
        elif self.binarize == "threshold":
            x = (x > 0.5).float()
        batch = {"x": x}
        if "y" in samples[0]:
            batch["y"] = torch.tensor([s["y"] for s in samples])
        if "factors" in samples[0]:
            batch["factors"] = torch.from_numpy(np.stack([s["factors"] for s in samples]))
        return batch


def shard_urls(root: str, manifest: dict, split: str) -> list[str]:
    return [str(Path(root) / s["name"]) for s in manifest["splits"][split]["shards"]]


def make_loader(root: str, split: str, batch_size: int, *, shuffle: bool = False, seed: int = 0, epoch: int = 0,
                shuffle_buffer: int = 2000, num_workers: int = 0, binarize: str = "none", limit: int | None = None,
                manifest: dict | None = None) -> DataLoader:
    """A loader of dict batches {"x": float32 [B, *shape], "y": [B], "factors": [B, F]} over one split."""
    manifest = manifest or read_manifest(root)
    entry = manifest["splits"][split]
    urls = shard_urls(root, manifest, split)
    for url, shard in zip(urls, entry["shards"]):
        if not Path(url).is_file():
            raise FileNotFoundError(f"shard {url} listed in the manifest is missing")
        if Path(url).stat().st_size != shard["bytes"]:
            raise ShardError(f"shard {url} has {Path(url).stat().st_size} bytes, the manifest says "
                             f"{shard['bytes']}: truncated or replaced; rerun `vaepipe prepare`")
    stages = [
        EpochShardList(urls, seed if shuffle else None, epoch),
        wds.split_by_node,
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=_raise_with_shard),
    ]
    if shuffle:
        stages.append(wds.detshuffle(shuffle_buffer, initial=min(shuffle_buffer, 100), seed=seed, epoch=epoch - 1))
    stages.append(wds.map(Decoder(entry["shape"], entry["dtype"])))
    if limit is not None:
        stages.append(wds.slice(limit))
    stages.append(wds.batched(batch_size, collation_fn=Collate(manifest["scale"], binarize), partial=True))
    n = entry["num_samples"] if limit is None else min(limit, entry["num_samples"])
    dataset = wds.DataPipeline(*stages).with_length((n + batch_size - 1) // batch_size)
    workers = min(num_workers, len(urls))  # a worker without a shard would only idle
    return DataLoader(dataset, batch_size=None, num_workers=workers)


class ShardDataModule(pl.LightningDataModule):
    """train/val/test loaders from a prepared data root; the train order depends on (seed, epoch)."""

    def __init__(self, data_cfg, seed: int = 0):
        super().__init__()
        self.cfg, self.seed = data_cfg, seed
        self.manifest = read_manifest(data_cfg.root)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["splits"]["train"]["shape"])

    def _loader(self, split: str, train: bool = False) -> DataLoader:
        epoch = self.trainer.current_epoch if (train and self.trainer is not None) else 0
        return make_loader(self.cfg.root, split, self.cfg.batch_size if train else self.cfg.eval_batch_size,
                           shuffle=train, seed=self.seed, epoch=epoch, shuffle_buffer=self.cfg.shuffle_buffer,
                           num_workers=self.cfg.num_workers, binarize=self.cfg.binarize, manifest=self.manifest)

    def train_dataloader(self):
        return self._loader("train", train=True)

    def val_dataloader(self):
        return self._loader("val")

    def test_dataloader(self):
        return self._loader("test")
