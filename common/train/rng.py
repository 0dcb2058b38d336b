"""Random state isolation, so that resuming from a checkpoint replays the exact same random numbers.

The global generators (python, numpy, torch) carry the noise of the loss and are saved in checkpoints.
Everything else that draws random numbers (data augmentation, validation) runs in an isolated state and
so cannot shift that stream: validation is invisible to training, and an item's augmentation depends only
on (seed, epoch, index), not on worker count, prefetching, or where a resumed run starts.
"""
from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset


@contextlib.contextmanager
def isolated_rng(seed: int | None = None, cuda: bool = True) -> Iterator[None]:
    """Run a block with the python, numpy and torch random states restored afterwards, optionally seeded.

    `cuda=False` leaves CUDA generators alone (needed in data loader workers, which must not touch CUDA).
    """
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if cuda and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            if seed is not None:
                random.seed(seed)
                np.random.seed(seed % 2**32)
                torch.random.default_generator.manual_seed(seed)
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class ItemSeededDataset(Dataset):
    """Wrap a map-style dataset so `dataset[i]` draws its randomness from a state seeded by (seed, epoch, i)."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch, so each epoch sees fresh but reproducible augmentations."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        item_seed = ((self.seed % 2**31) * 1_000_003 + self.epoch) * 1_000_003 + index
        with isolated_rng(item_seed % 2**63, cuda=False):
            return self.dataset[index]
