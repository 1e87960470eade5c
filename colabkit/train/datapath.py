"""The one protocol for the batches fit(), evaluate() and predict() read, and the choice of its implementation.

:class:`Batches` is what the loop knows of its data, whatever path the data takes:

* :class:`~colabkit.train.state.ResumableLoader`: a DataLoader with colabkit's resumable sampler
  (any Dataset or DataLoader; ``placement == "loader"``);
* :class:`~colabkit.train.fastpath.TensorBatches`: in-memory tensors cut into batches by
  indexing (``placement`` ``"device"``, ``"pinned"`` or ``"host"``);
* :class:`~colabkit.train.imagebatches.ImageBatches`: in-memory uint8 image datasets whose
  transform translates into batched ops, transformed a batch at a time where the images live.

The loop never asks which one it has. :func:`training_batches` and :func:`evaluation_batches`
try the candidates of :data:`TRAINING_PATHS` / :data:`EVALUATION_PATHS` in order; the first that
takes the data wins, and the DataLoader path is the fallback. A candidate that knows the data
but cannot take it says why (a phrase), and the start notice quotes the first such reason. A new
in-memory path is added by appending its constructor to those tuples: nothing in the loop changes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import torch

from colabkit.train.batches import as_dataset, check_batch_size
from colabkit.train.distributed import DistInfo
from colabkit.train.fastpath import dataloader_reason, for_evaluation, for_training
from colabkit.train.imagebatches import for_evaluation as images_for_evaluation
from colabkit.train.imagebatches import for_training as images_for_training
from colabkit.train.state import ResumableLoader, make_resumable, ordered_loader

__all__ = [
    "EVALUATION_PATHS",
    "TRAINING_PATHS",
    "Batches",
    "EvaluationPath",
    "TrainingPath",
    "evaluation_batches",
    "training_batches",
    "validation_batches",
]


@runtime_checkable
class Batches(Protocol):
    """The batches of a run's data: what fit()'s loop, its validation, evaluate() and predict() use.

    Training reads :meth:`epoch` (an order that depends only on the run seed and the epoch, so a
    resume can skip the finished batches without reading them); evaluation reads one pass in
    the data's own order with ``iter()``.

    Attributes:
        exact: Whether a resume inside an epoch reproduces the data order and augmentation exactly.
        needs_epoch_rng: Whether the order is drawn from the global RNG (a sampler colabkit does
            not know): the loop then restores the RNG state of the epoch's start before
            :meth:`epoch` on a resume.
        batch_size: Samples per batch (None when the loader batches its own way).
        workers: DataLoader worker processes (0: batches are made in this process).
        placement: Where the data lives: ``"device"`` (on the GPU), ``"pinned"`` (page-locked
            host memory, copied per batch), ``"host"`` (host memory; the loop moves each batch)
            or ``"loader"`` (a DataLoader reads it). None until :meth:`place` ran.
        samples: Samples in the whole dataset (every rank's), None when unknown.
    """

    exact: bool
    needs_epoch_rng: bool

    @property
    def batch_size(self) -> int | None: ...

    @property
    def workers(self) -> int: ...

    @property
    def placement(self) -> str | None: ...

    @property
    def samples(self) -> int | None: ...

    def __len__(self) -> int:
        """Batches per epoch on this rank (only when :meth:`has_length`)."""
        ...

    def has_length(self) -> bool:
        """Whether ``len()`` is known (not for a stream)."""
        ...

    def set_seed(self, seed: int) -> None:
        """Set the run seed (the data order and augmentation) before the first epoch."""
        ...

    def place(self) -> str:
        """Decide where the data lives, once the model is on its device, put it there, and return :attr:`placement`."""
        ...

    def describe(self) -> str:
        """The start notice's words for this path: which one runs and why (``"in-memory fast path (...)"``)."""
        ...

    def epoch(self, epoch: int, *, skip: int = 0) -> Iterator[Any]:
        """The batches of ``epoch`` after the first ``skip`` (which are not read)."""
        ...

    def __iter__(self) -> Iterator[Any]:
        """One pass in the data's own order (evaluation)."""
        ...


class TrainingPath(Protocol):
    """A candidate for training data: its batches following ``resumable``'s order; else why it
    cannot take data it knows (a phrase), or None to pass."""

    def __call__(self, data: Any, resumable: ResumableLoader, device: torch.device, *, argument: str) -> Any: ...


class EvaluationPath(Protocol):
    """A candidate for evaluation data (dataset order): its batches, a phrase, or None (as :class:`TrainingPath`)."""

    def __call__(self, data: Any, *, batch_size: int, device: torch.device, argument: str) -> Any: ...


#: Training candidates, tried in order before the DataLoader path (append a new in-memory path here).
TRAINING_PATHS: tuple[TrainingPath, ...] = (for_training, images_for_training)
#: Evaluation candidates, tried in order before the DataLoader path (append a new in-memory path here).
EVALUATION_PATHS: tuple[EvaluationPath, ...] = (for_evaluation, images_for_evaluation)


def training_batches(
    data: Any,
    *,
    argument: str,
    batch_size: int | None,
    shuffle: bool,
    num_workers: int | str,
    device: torch.device,
    dist: DistInfo | None = None,
) -> Batches:
    """fit()'s resumable batches of ``data`` (seed 0 until :meth:`Batches.set_seed`).

    The DataLoader is built first in any case: it checks the data and owns the sampler whose
    order every path follows.
    """
    resumable = make_resumable(
        data,
        argument=argument,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        seed=0,
        rank=0 if dist is None else dist.rank,
        world_size=1 if dist is None else dist.world_size,
    )
    reasons = []
    for path in TRAINING_PATHS:
        batches: Batches | str | None = path(data, resumable, device, argument=argument)
        if isinstance(batches, str):
            reasons.append(batches)
        elif batches is not None:
            return batches
    resumable.why = reasons[0] if reasons else dataloader_reason(as_dataset(data, argument), device=device)
    return resumable


def evaluation_batches(
    data: Any, *, argument: str, batch_size: int | None, num_workers: int | str, device: torch.device
) -> Batches:
    """The batches of ``data`` in its own order, for validation, evaluate() and predict()."""
    loader = ordered_loader(
        data, argument=argument, batch_size=batch_size, num_workers=num_workers, pin_memory=device.type == "cuda"
    )
    size = check_batch_size(batch_size)
    reasons = []
    for path in EVALUATION_PATHS:
        batches: Batches | str | None = path(data, batch_size=size, device=device, argument=argument)
        if isinstance(batches, str):
            reasons.append(batches)
        elif batches is not None:
            return batches
    ordered = ResumableLoader(loader, None, seed=0, exact=True, needs_epoch_rng=False)
    ordered.why = reasons[0] if reasons else dataloader_reason(as_dataset(data, argument), device=device, ordered=True)
    return ordered


def validation_batches(
    data: Any, *, batch_size: int | None, num_workers: int | str, device: torch.device, dist: DistInfo
) -> Batches:
    """fit()'s validation data: in order; with DDP a Dataset is sharded (each rank validates its share
    and the sums are added up across ranks), while a DataLoader is read whole by every rank."""
    options: dict[str, Any] = {"batch_size": batch_size, "num_workers": num_workers, "device": device}
    if dist.enabled and not isinstance(data, torch.utils.data.DataLoader):
        return training_batches(data, argument="val", shuffle=False, dist=dist, **options)
    return evaluation_batches(data, argument="val", **options)
