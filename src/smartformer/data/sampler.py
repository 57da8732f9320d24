"""A deterministic, resumable, distributed sample stream for step-based training.

:class:`ResumableSampler` yields *keys* ``epoch * n + index``: epoch ``e`` visits a permutation
seeded by ``seed + e``, split across ranks. :class:`SeededViews` turns a key into a sample whose
random augmentation is seeded by ``(seed, key)``. Together they make the data of step ``s`` a
pure function of ``(seed, s)``: a run resumed at step ``s`` sees exactly what an uninterrupted
run would have seen, whichever worker process loads it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

__all__ = ["ResumableSampler", "SeededViews"]


class ResumableSampler(Sampler[int]):
    """Infinite stream of keys for one rank, starting at position ``start`` of that rank's stream.

    Args:
        n: dataset size.
        seed: base seed of the per-epoch permutations.
        rank, world_size: this process and the number of processes; each epoch's permutation is
            padded by wrapping (as ``DistributedSampler`` does) so every rank gets
            ``ceil(n / world_size)`` keys per epoch.
        start: number of keys of this rank's stream to skip (``step * batch_size`` on resume).
    """

    def __init__(self, n: int, seed: int = 0, rank: int = 0, world_size: int = 1, start: int = 0) -> None:
        if n < 1:
            raise ValueError("cannot sample from an empty dataset")
        self.n, self.seed, self.rank, self.world_size, self.start = n, seed, rank, world_size, start
        self.per_rank = -(-n // world_size)

    def keys_of_epoch(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        total = self.per_rank * self.world_size
        perm = (perm * (total // self.n + 1))[:total]
        return [epoch * self.n + i for i in perm[self.rank :: self.world_size]]

    def __iter__(self) -> Iterator[int]:
        epoch, offset = divmod(self.start, self.per_rank)
        while True:
            yield from self.keys_of_epoch(epoch)[offset:]
            epoch, offset = epoch + 1, 0


class SeededViews(Dataset):
    """Wrap a dataset whose ``transform`` is MONAI-``Randomizable``: key -> seeded sample.

    ``dataset[key % len(dataset)]`` is returned after seeding ``dataset.transform`` with a seed
    derived from ``(seed, key)``.
    """

    def __init__(self, dataset: Any, seed: int = 0) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int) -> Any:
        self.dataset.transform.set_random_state(seed=(self.seed * 1_000_003 + int(key) * 7919) % 2**32)
        return self.dataset[int(key) % len(self.dataset)]
