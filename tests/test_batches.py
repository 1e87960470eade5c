"""The batch contract: the same dict and tuple datasets work in fit, evaluate, predict, lr_find and
compare_devices, and a batch none of them can use gets the same advice from each."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import colabkit
from colabkit.errors import ArgumentError
from colabkit.train.batches import DEFAULT_BATCH_SIZE

SAMPLES, FEATURES, CLASSES = 96, 6, 3


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(SAMPLES, FEATURES, generator=generator)
    mask = (torch.rand(SAMPLES, FEATURES, generator=generator) > 0.2).float()
    y = (x * mask).sum(1).gt(0).long() + (x[:, 0] > 1).long()
    return x, mask, y


class DictDataset(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Samples as dicts, as Hugging Face datasets give them: the model takes the other keys by name."""

    def __init__(self, label_key: str = "labels") -> None:
        self.x, self.mask, self.y = _data()
        self.label_key = label_key

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[index], "mask": self.mask[index], self.label_key: self.y[index]}


class MaskedModel(nn.Module):
    """Called as ``model(x, mask)`` or ``model(x=..., mask=...)``; counts the samples it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(FEATURES, CLASSES)
        self.seen = 0

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.seen += x.shape[0]
        return self.linear(x * mask)


def _tuple_dataset() -> torch.utils.data.Dataset:  # type: ignore[type-arg]
    return torch.utils.data.TensorDataset(*_data())


DATASETS: dict[str, Callable[[], Any]] = {"dict": DictDataset, "tuple": _tuple_dataset}


@pytest.mark.parametrize("kind", sorted(DATASETS))
def test_one_dataset_runs_through_all_five_entry_points(kind: str) -> None:
    data = DATASETS[kind]()

    model = MaskedModel()
    result = colabkit.lr_find(model, data, steps=12, end_lr=1.0, device="cpu", progress=False)
    assert model.seen == 12 * DEFAULT_BATCH_SIZE  # lr_find batches a Dataset as fit() does, cycling it

    # lr_find's promise: its suggestion goes straight into fit().
    model.seen = 0
    history = colabkit.fit(model, data, epochs=1, lr=result.suggestion, device="cpu", progress=False)
    assert len(history) == 1 and history[-1]["samples_per_sec"] > 0
    assert model.seen == SAMPLES

    scores = colabkit.evaluate(model, data, device="cpu", progress=False)
    assert set(scores) == {"loss", "accuracy"} and 0 <= scores["accuracy"] <= 1

    outputs = colabkit.predict(model, data, device="cpu", progress=False)
    assert outputs.shape == (SAMPLES, CLASSES)
    x, mask, _ = _data()
    assert torch.allclose(outputs, model(x, mask).detach())

    model.seen = 0
    timing = colabkit.compare_devices(model, data, devices="cpu", steps=2, warmup=0, progress=False)
    assert {t.phase for t in timing.timings} == {"train", "inference"}
    assert {t.batch_size for t in timing.timings} == {DEFAULT_BATCH_SIZE}
    assert model.seen == 0  # each device times its own copy


def _no_targets() -> Any:
    return DictDataset(label_key="answer")


def _float_labels() -> Any:
    x, mask, y = _data()
    return torch.utils.data.TensorDataset(x, mask, y.float())


@pytest.mark.parametrize(
    ("make_data", "advice"),
    [
        (_no_targets, "none of labels, label, targets, target, y holds the targets; name the label key 'labels'"),
        (_float_labels, "loss_fn=None means cross-entropy"),
    ],
)
def test_a_batch_that_does_not_fit_gets_the_same_advice_everywhere(make_data: Callable[[], Any], advice: str) -> None:
    data = make_data()
    calls: list[Callable[[], Any]] = [
        lambda: colabkit.fit(MaskedModel(), data, device="cpu", progress=False),
        lambda: colabkit.evaluate(MaskedModel(), data, device="cpu", progress=False),
        lambda: colabkit.lr_find(MaskedModel(), data, steps=5, device="cpu", progress=False),
        lambda: colabkit.compare_devices(MaskedModel(), data, devices="cpu", phases=["train"], progress=False),
    ]
    for call in calls:
        with pytest.raises(ArgumentError, match=advice):
            call()


def test_a_tensor_pair_is_data_everywhere() -> None:
    x, _, y = _data()
    model = nn.Linear(FEATURES, CLASSES)
    pair = (x, y)
    result = colabkit.lr_find(model, pair, steps=8, end_lr=1.0, device="cpu", progress=False)
    history = colabkit.fit(model, pair, lr=result.suggestion, device="cpu", progress=False)
    assert history[-1]["samples_per_sec"] > 0
    assert colabkit.evaluate(model, pair, device="cpu", progress=False)["loss"] > 0
    assert colabkit.predict(model, x, device="cpu", progress=False).shape == (SAMPLES, CLASSES)
    with pytest.raises(ArgumentError, match="96 inputs but 3 targets"):
        colabkit.fit(model, (x, y[:3]), device="cpu", progress=False)
