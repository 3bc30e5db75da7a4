"""Which samples each (rank, worker) reads in an epoch: a pure function of the manifest and
(seed, epoch, world size, workers, batch size), so every rank computes the same plan without
talking to the others, and a resumed run recomputes exactly the plan it was interrupted in.

- A *slot* is one (rank, worker) pair: slot = rank * workers + worker.
- Shards are cut into *parts* (every `parts`-th sample) when there are fewer than 4 shards per slot,
  so no slot is left without data (webdataset's "No samples found" with more workers than shards)
  and the slots can be balanced; a shard cut in p parts is read by up to p slots.
- The part list is shuffled from (seed, epoch), then each part goes to the slot with the fewest
  samples so far: balanced slots, a new assignment each epoch, identical on every rank.
- Every slot yields the same number of batches, so every rank runs the same number of steps
  whatever the shard sizes (webdataset's DDP hang with 25/25/25/20-sample shards). Training uses
  floor(N / (slots * batch)) batches per slot: a slot short of samples cycles over its parts again
  (repeats), a slot with more drops the rest; both counts are reported.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Part:
    url: str
    part: int  # keep samples whose index in the shard is = part (mod parts)
    parts: int
    count: int  # samples in this part


@dataclass(frozen=True)
class EpochPlan:
    slots: list[list[Part]]  # slot -> parts it reads, in order
    batches_per_slot: int | None  # None: each slot reads exactly its own samples (one rank, evaluation)
    batch_size: int
    dropped: int  # samples of the epoch no slot reads
    repeated: int  # samples read twice to give every slot its batches

    def batches_on_rank(self, rank: int, workers: int) -> int:
        """Batches one rank delivers per epoch (its workers' batches together)."""
        if self.batches_per_slot is not None:
            return self.batches_per_slot * max(1, workers)
        w = max(1, workers)
        return sum(math.ceil(sum(p.count for p in slot) / self.batch_size) for slot in self.slots[rank * w:(rank + 1) * w])


def split_parts(urls: list[str], counts: list[int], n_slots: int, per_slot: int = 4) -> list[Part]:
    """Cut each shard into equal interleaved parts so that there are `per_slot` parts per slot
    (none for a single slot: nothing to balance, and each cut means one more read of the shard)."""
    parts = 1 if n_slots == 1 else max(1, math.ceil(per_slot * n_slots / max(1, len(urls))))
    return [Part(url, p, parts, len(range(p, n, parts))) for url, n in zip(urls, counts) for p in range(parts)]


def plan_epoch(urls: list[str], counts: list[int], *, batch_size: int, world_size: int = 1, workers: int = 0,
               seed: int = 0, epoch: int = 0, shuffle: bool = True, train: bool = True) -> EpochPlan:
    """The epoch's plan. train=True: equal full batches per slot (floor over the whole split).
    train=False (evaluation): every sample at least once; with several ranks, slots are padded by
    cycling to ceil(max slot / batch) full batches so ranks stay in step (repeats reported)."""
    n_slots = world_size * max(1, workers)
    # Evaluation needs coverage, not balance: cut only when there are fewer shards than slots.
    parts = split_parts(urls, counts, n_slots, per_slot=4 if train else 1)
    if shuffle:
        random.Random(f"{seed}-{epoch}").shuffle(parts)
    slots: list[list[Part]] = [[] for _ in range(n_slots)]
    have = [0] * n_slots
    for part in parts:
        s = have.index(min(have))  # fewest samples so far; ties to the lowest slot
        slots[s].append(part)
        have[s] += part.count
    total = sum(counts)
    if train:
        batches = total // (n_slots * batch_size)
        if batches == 0:
            raise ValueError(f"{total} samples cannot give each of {world_size} rank(s) x {max(1, workers)} "
                             f"worker(s) one batch of {batch_size}: lower data.batch_size or data.num_workers")
    elif world_size > 1:
        batches = math.ceil(max(have) / batch_size)
    else:  # one rank: no step to keep in line with, every slot reads exactly its samples
        return EpochPlan(slots, None, batch_size, 0, 0)
    need = batches * batch_size
    dropped = sum(max(0, h - need) for h in have)
    repeated = sum(max(0, need - h) for h in have)
    return EpochPlan(slots, batches, batch_size, dropped, repeated)
