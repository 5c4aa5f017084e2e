"""The batches of a training run, step by step: step ``s``'s images and their augmentation are a pure function
of (seed, s, rank), so a resumed run sees the batches an uninterrupted one would have (StepBatches).
"""
from __future__ import annotations

from typing import Callable

import torch


class BatchInterrupted(Exception):
    """StepBatches stopped loading a batch because ``interrupted()`` said so."""


class StepBatches(torch.utils.data.Dataset):
    """Item ``s`` = this process's batch for optimizer step ``s``, a pure function of (seed, s, rank).

    Indices come from torch's DistributedSampler (one shuffled permutation per epoch, split between
    ranks); augmentation runs under a RNG seeded from (seed, s, rank). So batches don't depend on
    worker processes or on where a run was resumed. ``interrupted``, asked before each image, ends the
    loading of a batch with BatchInterrupted (a cancel need not wait for a large batch).
    """

    def __init__(self, dataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 interrupted: Callable[[], bool] | None = None):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size, self.interrupted = rank, world_size, interrupted
        self._epoch_indices: dict[int, list[int]] = {}

    def _indices(self, epoch: int) -> list[int]:
        if epoch not in self._epoch_indices:
            sampler = torch.utils.data.DistributedSampler(self.dataset, num_replicas=self.world_size, rank=self.rank,
                                                          shuffle=True, seed=self.seed, drop_last=False)
            sampler.set_epoch(epoch)
            self._epoch_indices = {epoch: list(sampler)}  # keep one epoch: the sequence only moves forward
        return self._epoch_indices[epoch]

    def batch_indices(self, step: int) -> list[int]:
        per_epoch = len(self._indices(0))
        out = []
        for k in range(step * self.batch_size, (step + 1) * self.batch_size):
            out.append(self._indices(k // per_epoch)[k % per_epoch])
        return out

    def __len__(self) -> int:
        return 1 << 40

    def __getitem__(self, step: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + step) * 64 + self.rank)
            items = []
            for i in self.batch_indices(step):
                if self.interrupted is not None and self.interrupted():
                    raise BatchInterrupted(f"the loading of step {step + 1}'s batch was interrupted")
                items.append(self.dataset[i])
        images, targets = zip(*items)
        return list(images), list(targets)


def step_loader(batches: StepBatches, start: int, stop: int, num_workers: int):
    return torch.utils.data.DataLoader(batches, batch_size=None, sampler=range(start, stop),
                                       num_workers=num_workers, generator=torch.Generator(),  # not the global RNG
                                       prefetch_factor=2 if num_workers else None)


__all__ = ["BatchInterrupted", "StepBatches", "step_loader"]
