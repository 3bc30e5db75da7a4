"""Data on the device: a split read once from its shards into one tensor where training runs.

For data that fits (MNIST is 39 MB as uint8), reading shards, shuffling in a buffer, collating and
copying every batch to the device is pure overhead: a step then costs a gather, a conversion and
(for dynamic binarisation) one Bernoulli draw, all on the device, with no loader process and no
host-to-device copy. `data.resident=auto` (default) takes this path when the split fits the memory
budget, and the streaming loader otherwise (`pipeline/data/stream.py`).

Order and noise are functions of (seed, epoch, batch, rank), never of how the steps are grouped
into calls or when a run was interrupted:
- epoch e's order is one permutation of the split drawn from (seed, e); global batch g is the
  slice [g*B*W, (g+1)*B*W) of it and rank r reads its r-th part of B samples: disjoint parts,
  equal steps on every rank, the remainder of the epoch (< B*W samples) unused;
- dynamic binarisation of rank r's batch g is drawn from a generator seeded by (seed, e, g, r).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pipeline.data.order import binarize, binarize_by_index, epoch_order
from pipeline.data.stream import make_loader

GIB = 1 << 30


def split_bytes(entry: dict) -> int:
    """Bytes a split takes on the device in its stored dtype (uint8 MNIST: 784 bytes a sample)."""
    return entry["num_samples"] * math.prod(entry["shape"]) * torch.empty((), dtype=_dtype(entry["dtype"])).element_size()


def _dtype(name: str) -> torch.dtype:
    return {"uint8": torch.uint8, "float32": torch.float32, "float16": torch.float16, "int64": torch.int64}[name]


def default_budget(device: torch.device) -> int:
    """A quarter of the device's memory (free GPU memory, or the machine's RAM): room for the model,
    activations and a second split, and for other processes of a multi-process run on one node."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 4
    try:
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 2 * GIB


def load_split(root: str, split: str, manifest: dict, device: torch.device, on_error: str = "stop",
               verify: bool = True) -> torch.Tensor:
    """All samples of a split in shard order, [N, *shape] in the stored dtype, on `device`. Read with
    the streaming reader (same manifest and size checks, same errors for a missing or corrupt shard,
    same data.on_error behaviour), one pass."""
    loader = make_loader(root, split, 4096, shuffle=False, train=False, manifest=manifest, on_error=on_error, raw=True,
                         verify=verify)
    parts = [batch["x"] for batch in loader]
    if not parts:
        raise ValueError(f"split '{split}' of {root} has no readable samples")
    return torch.cat(parts).to(device)


def pixel_mean(root: str, manifest: dict, binarize: str = "none", on_error: str = "stop") -> torch.Tensor:
    """The training split's mean sample in model units (float32, [*shape]): what a decoder's output
    bias starts from (model.init=iwae). Dynamic binarisation keeps the mean; a threshold does not."""
    x = load_split(root, "train", manifest, torch.device("cpu"), on_error).float() * float(manifest["scale"])
    return (x > 0.5).float().mean(0) if binarize == "threshold" else x.mean(0)


class ResidentSplit:
    """One split on the device and the batches of one rank, epoch by epoch.

    Training (`train=True`): each epoch a fresh permutation, `steps_per_epoch` full batches per
    rank. Evaluation: every sample once in order, rank r reads samples r, r+W, ...; with several
    ranks the shorter ranks repeat their first samples so all run the same number of batches."""

    def __init__(self, data: torch.Tensor, *, batch_size: int, scale: float, binarize: str, seed: int,
                 rank: int = 0, world_size: int = 1, train: bool = True, limit_steps: int | None = None,
                 counts: list[int] | None = None, window: int = 2000):
        self.data, self.batch_size, self.scale, self.binarize = data, batch_size, float(scale), binarize
        self.seed, self.rank, self.world, self.train = seed, rank, world_size, train
        # The epoch order is the streaming loader's (data/order.py): shard sizes in manifest order;
        # a load that skipped unreadable data (data.on_error=skip) is ordered as one shard.
        self.counts = tuple(counts) if counts and sum(counts) == data.shape[0] else (data.shape[0],)
        self.window = window
        n = data.shape[0]
        if train:
            # `limit_steps`: the run's steps per epoch, planned from the manifest. A load that skipped
            # unreadable data (data.on_error=skip) has fewer samples; its epochs then repeat some
            # (the order cycles) to keep the planned steps, as the streaming loader fills its plan.
            self.steps_per_epoch = limit_steps if limit_steps is not None else n // (batch_size * world_size)
            if self.steps_per_epoch <= 0:
                raise ValueError(f"{n} samples cannot give each of {world_size} rank(s) one batch of {batch_size}: "
                                 "lower data.batch_size")
        else:
            per_rank = math.ceil(n / world_size)
            mine = torch.arange(rank, n, world_size, device=data.device)
            self._eval_index = torch.cat([mine, mine[: per_rank - len(mine)]]) if len(mine) < per_rank else mine
            self._eval_own = len(mine)  # the rest repeats, only to keep the ranks in step (marked)
            self.steps_per_epoch = math.ceil(per_rank / batch_size) if world_size > 1 else math.ceil(len(mine) / batch_size)
        self._order_epoch, self._order = None, None
        self._gen = torch.Generator(device=data.device)  # reseeded per batch: no generator built per step

    def order(self, epoch: int) -> torch.Tensor:
        """This rank's sample indices for the epoch, [steps_per_epoch * B], on the device: its slice
        of every global batch of the epoch's global order (data/order.py)."""
        if self._order_epoch != epoch:
            b, w = self.batch_size, self.world
            perm = epoch_order(self.counts, self.seed, epoch, self.window).sample_indices()
            perm = torch.from_numpy(np.resize(perm, max(len(perm), self.steps_per_epoch * b * w)))  # resize cycles
            used = perm[: self.steps_per_epoch * b * w].view(self.steps_per_epoch, w, b)[:, self.rank]
            self._order, self._order_epoch = used.reshape(-1).to(self.data.device), epoch
        return self._order

    def batch(self, epoch: int, index: int) -> dict:
        """Batch `index` of the epoch as {"x": float32 [B, *shape]} on the device."""
        b = self.batch_size
        idx = (self.order(epoch) if self.train else self._eval_index)[index * b:(index + 1) * b]
        x = self.data[idx].float()
        if self.scale != 1.0:
            x.mul_(self.scale)
        if self.binarize == "dynamic" and self.train:  # this rank's slice of the global batch's draw
            x = binarize(x, self.seed, epoch, index, self.rank, self.world, generator=self._gen)
        elif self.binarize == "dynamic":  # evaluation: by each sample's index, as the streamed loader
            x = binarize_by_index(x, self.seed, idx)
        elif self.binarize == "threshold":
            x = (x > 0.5).float()
        if not self.train and self.world > 1:  # which samples are this rank's own, not padding
            return {"x": x, "real": torch.arange(index * b, index * b + len(idx), device=x.device) < self._eval_own}
        return {"x": x}


class EvalBatches:
    """A resident split as a loader of evaluation batches (validation: the same batches every time)."""

    def __init__(self, split: ResidentSplit):
        self.split = split

    def __len__(self) -> int:
        return self.split.steps_per_epoch

    def __iter__(self):
        for i in range(self.split.steps_per_epoch):
            yield self.split.batch(0, i)
