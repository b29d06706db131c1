"""The resumable, process-sharded sample order for map-style datasets (``ShardedSampler``)."""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler


class ShardedSampler(Sampler):
    """Deterministic, resumable, process-sharded order for a map-style dataset.

    Epoch ``e``'s order is ``randperm(num_samples)`` from a generator seeded by (seed, e) (identity when
    ``shuffle=False``). It is padded by wrapping around to a multiple of ``world_size`` (or truncated if
    ``drop_last``), and rank ``r`` takes positions ``r, r + world_size, ...``: ranks are disjoint (up to
    the wrapped padding) and together cover every index. Iteration starts at position ``start`` of this
    rank's list (``set_epoch(e, start)`` or ``resume(step, batch_size)``). Use one sampler per process
    (rank = ``accelerator.process_index``, world_size = ``accelerator.num_processes``) and do not pass
    the DataLoader through ``accelerator.prepare`` (which would shard a second time).
    """

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1, drop_last: bool = False, with_epoch: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.num_samples, self.seed, self.shuffle = num_samples, seed, shuffle
        self.rank, self.world_size, self.drop_last, self.with_epoch = rank, world_size, drop_last, with_epoch
        self.epoch, self.start = 0, 0

    @property
    def per_rank(self) -> int:
        """Indices per rank per epoch."""
        if self.drop_last:
            return self.num_samples // self.world_size
        return math.ceil(self.num_samples / self.world_size)

    def permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        seed = np.random.SeedSequence([self.seed & 0xFFFFFFFF, epoch]).generate_state(1)[0]
        gen = torch.Generator().manual_seed(int(seed))
        return torch.randperm(self.num_samples, generator=gen).tolist()

    def rank_indices(self, epoch: int) -> list[int]:
        order = self.permutation(epoch)
        total = self.per_rank * self.world_size
        order = (order * math.ceil(total / max(len(order), 1)))[:total]
        return order[self.rank::self.world_size]

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start)

    def resume(self, step: int, batch_size: int, drop_last_batch: bool = True) -> None:
        """Position after ``step`` optimizer steps of ``batch_size`` samples per rank (DataLoader
        ``drop_last=drop_last_batch``): epoch = step // batches_per_epoch, start = rest * batch_size."""
        per_epoch = self.per_rank // batch_size if drop_last_batch else math.ceil(self.per_rank / batch_size)
        if per_epoch == 0:
            raise ValueError(f"batch_size={batch_size} exceeds the {self.per_rank} samples per rank")
        self.set_epoch(step // per_epoch, (step % per_epoch) * batch_size)

    def __iter__(self) -> Iterator:
        for index in self.rank_indices(self.epoch)[self.start:]:
            yield (index, self.epoch) if self.with_epoch else index

    def __len__(self) -> int:
        return max(self.per_rank - self.start, 0)
