"""The Batches protocol: both data paths implement it, and a third one is added by one entry in a list."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from colabkit.train import datapath
from colabkit.train.datapath import Batches, evaluation_batches, training_batches
from colabkit.train.fastpath import TensorBatches, for_evaluation, for_training
from colabkit.train.loop import evaluate, fit
from colabkit.train.state import ResumableLoader

CPU = torch.device("cpu")


def blobs(n: int = 64, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=generator)
    return TensorDataset(x, (x[:, 0] + x[:, 1] > 0).long())


class Rows(Dataset):
    """A map-style dataset that is not in-memory tensors: the DataLoader path."""

    def __init__(self, data: TensorDataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Any:
        return self.data[index]


def test_both_paths_implement_the_protocol_and_say_which_runs() -> None:
    options: dict[str, Any] = {"argument": "train", "batch_size": 8, "shuffle": True, "num_workers": 0, "device": CPU}
    fast = training_batches(blobs(), **options)
    slow = training_batches(Rows(blobs()), **options)
    assert isinstance(fast, TensorBatches) and isinstance(slow, ResumableLoader)
    for batches in (fast, slow):
        assert isinstance(batches, Batches)
        assert (batches.batch_size, batches.workers, batches.samples, len(batches)) == (8, 0, 64, 8)
    assert (fast.place(), slow.place()) == ("host", "loader")
    assert fast.describe() == "in-memory fast path (64 samples)"
    assert slow.describe() == "DataLoader path, since Rows is not in-memory tensors"
    ordered = evaluation_batches(Rows(blobs()), argument="val", batch_size=8, num_workers=0, device=CPU)
    assert isinstance(ordered, Batches) and "order" not in ordered.describe()
    assert [batch[1].tolist() for batch in ordered] == [blobs()[i : i + 8][1].tolist() for i in range(0, 64, 8)]


class Counted:
    """A third data path: in-memory batches behind a class the loop has never heard of."""

    exact = True
    needs_epoch_rng = False
    workers = 0

    def __init__(self, inner: TensorBatches) -> None:
        self.inner = inner
        self.given = 0

    @property
    def batch_size(self) -> int:
        return self.inner.batch_size

    @property
    def placement(self) -> str | None:
        return self.inner.placement

    @property
    def samples(self) -> int:
        return self.inner.samples

    def __len__(self) -> int:
        return len(self.inner)

    def has_length(self) -> bool:
        return True

    def set_seed(self, seed: int) -> None:
        self.inner.set_seed(seed)

    def place(self) -> str:
        return self.inner.place()

    def describe(self) -> str:
        return "counted path"

    def epoch(self, epoch: int, *, skip: int = 0) -> Iterator[Any]:
        return self._count(self.inner.epoch(epoch, skip=skip))

    def __iter__(self) -> Iterator[Any]:
        return self._count(iter(self.inner))

    def _count(self, batches: Iterator[Any]) -> Iterator[Any]:
        for batch in batches:
            self.given += 1
            yield batch


def test_a_third_path_is_one_entry_in_the_candidates(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    made: list[Counted] = []

    def wrap(inner: TensorBatches | None) -> Counted | None:
        if inner is None:
            return None
        made.append(Counted(inner))
        return made[-1]

    def counted_training(data: Any, resumable: ResumableLoader, device: torch.device, *, argument: str) -> Any:
        return wrap(for_training(data, resumable, device, argument=argument))

    def counted_evaluation(data: Any, *, batch_size: int, device: torch.device, argument: str) -> Any:
        return wrap(for_evaluation(data, batch_size=batch_size, device=device, argument=argument))

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))

    plain = model()
    fit(plain, blobs(), blobs(16, 1), epochs=2, batch_size=8, seed=0, progress=False)
    monkeypatch.setattr(datapath, "TRAINING_PATHS", (counted_training, *datapath.TRAINING_PATHS))
    monkeypatch.setattr(datapath, "EVALUATION_PATHS", (counted_evaluation, *datapath.EVALUATION_PATHS))
    counted = model()
    fit(counted, blobs(), blobs(16, 1), epochs=2, batch_size=8, seed=0, metrics=())
    assert "data: train on the counted path; val too" in capsys.readouterr().out
    train, val = made
    assert (train.given, val.given) == (2 * 8, 2 * 2)  # every batch came through the new path
    for a, b in zip(plain.parameters(), counted.parameters(), strict=True):
        assert torch.equal(a, b)  # and the loop treated it as any other
    evaluate(counted, blobs(16, 1), batch_size=8, progress=False)
    assert made[-1].given == 2
