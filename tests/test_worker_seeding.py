"""Worker seeding seeds ``random`` and numpy only once they are used, with results as if always seeded."""

from __future__ import annotations

import multiprocessing
import random
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from colabkit.train.state import KeyedBatch, SeededDataset, mix_seed, seed_sample

SEED, EPOCH = 9, 2
BATCHES = [[3, 1, 4], [1, 5, 9], [2, 6]]


class Draws(Dataset):  # type: ignore[type-arg]
    """Each sample: torch noise, plus `random` / numpy draws for the indices in ``python_numpy``."""

    def __init__(self, python_numpy: set[int], calls: Any) -> None:
        self.python_numpy = python_numpy
        self.calls = calls  # shared across worker processes: how many samples were read in all

    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int) -> torch.Tensor:
        with self.calls.get_lock():
            self.calls.value += 1
        value = torch.rand(2)
        if index in self.python_numpy:
            value = value + random.random() + float(np.random.rand())
        return value


def collate(samples: list[torch.Tensor]) -> torch.Tensor:
    """Draws from `random` after the samples, as mixup collates do."""
    return torch.stack(samples) * (1 + random.random())


def expected(dataset: Draws) -> list[torch.Tensor]:
    """What seeding all three generators before every sample gives."""
    batches = []
    for batch in BATCHES:
        samples = []
        for index in batch:
            seed_sample(mix_seed(SEED, EPOCH, index))
            samples.append(dataset[index])
        batches.append(collate(samples))
    return batches


def from_workers(dataset: Draws) -> list[torch.Tensor]:
    loader = DataLoader(
        SeededDataset(dataset, SEED),
        batch_sampler=[KeyedBatch(batch, EPOCH) for batch in BATCHES],
        num_workers=2,
        collate_fn=collate,
        multiprocessing_context="fork",
    )
    return list(loader)


@pytest.mark.parametrize(
    ("python_numpy", "extra_reads"),
    [(set(), 0), ({5}, 3), (set(range(10)), 3)],
    ids=["torch-only", "random-in-one-sample", "random-everywhere"],
)
def test_results_are_those_of_seeding_every_sample(python_numpy: set[int], extra_reads: int) -> None:
    calls = multiprocessing.get_context("fork").Value("i", 0)
    dataset = Draws(python_numpy, calls)
    want = expected(dataset)
    calls.value = 0
    got = from_workers(dataset)
    for a, b in zip(want, got, strict=True):
        assert torch.equal(a, b)
    # Witness of the lazy seeding: a batch is read again only when a sample drew from random or numpy
    # unseeded (once per worker; then the worker seeds them for every sample).
    samples = sum(len(batch) for batch in BATCHES)
    if not python_numpy:
        assert calls.value == samples
    else:
        assert samples < calls.value <= samples + 2 * extra_reads
