"""Each training epoch's sample order: a function of the split's shard sizes, the seed and the
epoch alone, never of how many processes or loader workers share the run.

- The shards are permuted from (seed, epoch) and grouped, in that order, into *windows* of at least
  `window_samples` samples (whole shards; data.shuffle_buffer); the samples of each window are
  permuted from (seed, epoch, window). The epoch's order is the windows' permuted samples, one
  window after the other: a shuffle as wide as the window, read shard by shard (the streaming
  loader holds one window in memory, never the split). `window_samples` 0 (data.shuffle_buffer=0)
  shuffles nothing: every epoch is the split's own order, as in the IWAE authors' code.
- Global batch g is positions [g G, (g + 1) G) of that order, G = data.batch_size x world size;
  rank r reads the r-th slice of b = G / W samples of every global batch, its DataLoader workers
  take turns by batch. An epoch has floor(N / G) steps whatever the topology.
- Dynamic binarisation draws one uniform number per pixel of the global batch from
  (seed, epoch, g) and each rank takes its slice; the training noise likewise (models/step_engine).

So the sequence of global batches, and with it the run, is the same on 1 process or 8, with 0 or
4 workers, resident or streamed (on a GPU, resident data draws dynamic binarisation with the
GPU's generator and the loader with the CPU's: the same seeds, other draws), up to the order of
floating-point sums in the gradient's mean;
a run interrupted on one topology continues on another at the same global sample position
(docs/resume.md).
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import random
from dataclasses import dataclass

import numpy as np
import torch


def derived_seed(*parts) -> int:
    """A 63-bit seed from any tuple: independent streams for (seed, epoch, step, ...)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


@dataclass(frozen=True)
class Window:
    shards: tuple[int, ...]  # indices into the split's shard list, in reading order
    start: int  # epoch position of the window's first sample
    size: int


@dataclass(frozen=True)
class EpochOrder:
    windows: tuple[Window, ...]
    offsets: tuple[int, ...]  # shard i's samples are [offsets[i], offsets[i] + counts[i]) in shard order
    seed: int
    epoch: int
    shuffled: bool = True  # False: the split's order (shards in manifest order, samples as stored)

    def window_permutation(self, w: int) -> np.ndarray:
        """Window-local position -> window-local sample (the window's samples in its shard order)."""
        if not self.shuffled:
            return np.arange(self.windows[w].size)
        rng = np.random.default_rng(derived_seed(self.seed, self.epoch, w, "window"))
        return rng.permutation(self.windows[w].size)

    def window_at(self, position: int) -> int:
        """The window holding epoch position `position`."""
        return bisect.bisect_right([w.start for w in self.windows], position) - 1

    def sample_indices(self) -> np.ndarray:
        """The whole order as indices into the split in shard order (what resident data reads)."""
        parts = []
        for w, window in enumerate(self.windows):
            local = np.concatenate([np.arange(self.offsets[i], self.offsets[i] + c)
                                    for i, c in zip(window.shards, self._counts(window))])
            parts.append(local[self.window_permutation(w)])
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def _counts(self, window: Window) -> list[int]:
        return [self.offsets[i + 1] - self.offsets[i] for i in window.shards]


@functools.lru_cache(maxsize=8)
def epoch_order(counts: tuple[int, ...], seed: int, epoch: int, window_samples: int) -> EpochOrder:
    """The epoch's windows (see the module doc). counts: samples per shard, in manifest order;
    window_samples 0: no shuffle (one window per shard, in manifest order, each read as stored)."""
    shards = list(range(len(counts)))
    if window_samples > 0:
        random.Random(derived_seed(seed, epoch, "shards")).shuffle(shards)
    windows, current, size, start = [], [], 0, 0
    for i in shards:
        current.append(i)
        size += counts[i]
        if size >= max(1, window_samples):
            windows.append(Window(tuple(current), start, size))
            start, current, size = start + size, [], 0
    if current:
        windows.append(Window(tuple(current), start, size))
    offsets = tuple(int(v) for v in np.concatenate([[0], np.cumsum(counts)]))
    return EpochOrder(tuple(windows), offsets, seed, epoch, shuffled=window_samples > 0)


def rank_slice(step: int, rank: int, batch_size: int, world_size: int) -> tuple[int, int]:
    """[start, end) epoch positions of rank `rank`'s batch at step `step` of the epoch."""
    start = step * batch_size * world_size + rank * batch_size
    return start, start + batch_size


_M32 = 0xFFFFFFFF


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Wellons' lowbias32) on int64 tensors: well-mixed bits, on any device."""
    h = h & _M32
    h = ((h ^ (h >> 16)) * 0x7FEB352D) & _M32
    h = ((h ^ (h >> 15)) * 0x846CA68B) & _M32
    return h ^ (h >> 16)


def binarize_by_index(x: torch.Tensor, seed: int, index) -> torch.Tensor:
    """x ~ Bernoulli(x) for evaluation, each sample's uniforms a function of (seed, its index in the
    split, pixel) alone: a test image gets the same pixels whatever the batch size, loader workers,
    ranks, resident or streamed path (the IWAE paper binarises its test images once)."""
    index = torch.as_tensor(index, dtype=torch.int64, device=x.device).reshape(-1, 1)
    pixel = torch.arange(x[0].numel(), dtype=torch.int64, device=x.device).reshape(1, -1)
    key = _mix32(index ^ (derived_seed(seed, "binarize-eval") & _M32))
    u = (_mix32(key * 0x9E3779B1 + _mix32(pixel + 0x632BE5AB)).double() + 0.5) / 2.0**32
    return (u.to(x.dtype).reshape(x.shape) < x).to(x.dtype)


def binarize(x: torch.Tensor, seed: int, epoch: int, step: int, rank: int, world_size: int,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """x ~ Bernoulli(x) for rank `rank`'s slice of global batch `step`: uniforms for the whole
    global batch from (seed, epoch, step), this rank's rows taken, so the binarisation of a sample
    does not depend on the number of ranks."""
    b = x.shape[0]
    gen = generator or torch.Generator(device=x.device)
    gen.manual_seed(derived_seed(seed, epoch, step, "binarize"))
    u = torch.rand((b * world_size, *x.shape[1:]), generator=gen, device=x.device)[rank * b:(rank + 1) * b]
    return (u < x).to(x.dtype)
