"""The in-memory fast path: whole batches of tensors by indexing, instead of a DataLoader sample by sample.

When the data is tensors in memory (a ``TensorDataset``, tensors passed
directly, or a DataLoader over a ``TensorDataset`` with the default collate and
no custom sampler, batch sampler, ``collate_fn`` or ``worker_init_fn``), batch
``k`` of an epoch is ``tensor.index_select(0, idx)`` for each tensor, where
``idx`` is the ``k``-th slice of the very order the resumable sampler
(:meth:`~colabkit.train.state.ResumableBatchSampler.epoch_order`) draws from
``(seed, epoch)``. So the batches are bitwise the ones the DataLoader path
yields (a list of tensors, as ``default_collate`` makes them), in the same
order, ``drop_last`` included, and the global RNG is not touched either way. A
resume starts at batch ``k`` by slicing the order: nothing is read or replayed.

Where the tensors live when training on CUDA (:attr:`TensorBatches.placement`):

* ``"device"``: moved to the GPU once, when they take at most
  :data:`DEVICE_MEMORY_SHARE` of the GPU's free memory (measured at the first
  epoch, after the model is on the GPU). A batch is then an ``index_select``
  on the GPU: no host work and no copy per step.
* ``"pinned"``: too big for that. Each batch is gathered on the host into one
  of two page-locked staging buffers and copied with ``non_blocking=True``, so
  the copy overlaps the GPU's work on the previous step; a buffer is reused
  only after its copy has finished (a CUDA event says so).
* ``"host"``: training on the CPU (or MPS): plain indexing; the loop moves the batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, TensorDataset, default_collate
from torch.utils.data.distributed import DistributedSampler

from colabkit.train.batches import as_dataset
from colabkit.train.oom import is_out_of_memory
from colabkit.train.state import ResumableBatchSampler, ResumableLoader, is_full_random

__all__ = [
    "DEVICE_MEMORY_SHARE",
    "Placement",
    "TensorBatches",
    "choose_placement",
    "dataloader_reason",
    "for_evaluation",
    "for_training",
    "loader_reason",
]

#: The tensors move to the GPU once when their size is at most this share of the GPU's free memory
#: at the first epoch; the rest stays for activations, gradients and optimizer state.
DEVICE_MEMORY_SHARE = 0.5

Placement = Literal["device", "pinned", "host"]

_STAGING_SLOTS = 2  # one buffer being copied to the GPU while the next batch is gathered into the other


def choose_placement(nbytes: int, free_bytes: int, *, share: float | None = None) -> Placement:
    """``"device"`` when ``nbytes`` of data fit in ``share`` (default :data:`DEVICE_MEMORY_SHARE`) of
    ``free_bytes`` of GPU memory, else ``"pinned"``."""
    limit = (DEVICE_MEMORY_SHARE if share is None else share) * free_bytes
    return "device" if nbytes <= limit else "pinned"


def _is_plain_tensor_dataset(dataset: Any) -> bool:
    """A TensorDataset whose samples are its rows: no subclass ``__getitem__`` (a per-sample transform)."""
    if not isinstance(dataset, TensorDataset):
        return False
    kind = type(dataset)
    return all(
        getattr(kind, name, None) is getattr(TensorDataset, name, None)
        for name in ("__getitem__", "__getitems__", "__len__")
    )


def _dataset_reason(dataset: Any, device: torch.device) -> str | None:
    if not isinstance(dataset, TensorDataset):
        return f"{type(dataset).__name__} is not in-memory tensors"
    if not _is_plain_tensor_dataset(dataset):
        return f"{type(dataset).__name__} reads its samples its own way (a per-sample transform)"
    places = {t.device for t in dataset.tensors}
    if places != {torch.device("cpu")} and places != {device}:
        where = ", ".join(sorted(str(p) for p in places))
        return f"the tensors are on {where}, the model on {device}"
    return None


def dataloader_reason(data: Any, *, device: torch.device, ordered: bool = False) -> str | None:
    """Why ``data`` keeps the DataLoader path, or None when its batches can be cut by indexing.

    Args:
        data: What fit(), evaluate() or predict() was given (after
            :func:`~colabkit.train.batches.as_dataset`).
        device: The device the model runs on.
        ordered: Evaluation: the batches must come in dataset order (no shuffling sampler).

    Returns:
        A phrase for the progress notice ("the loader has a custom collate_fn"), or None.
    """
    if not isinstance(data, DataLoader):
        return _dataset_reason(data, device)
    return _dataset_reason(data.dataset, device) or loader_reason(data, ordered=ordered)


def loader_reason(data: DataLoader, *, ordered: bool = False) -> str | None:
    """Why the options of the DataLoader ``data`` keep the DataLoader path (whatever its dataset), or None."""
    if data.batch_size is None or type(data.batch_sampler) is not BatchSampler:
        return "the loader has a custom batch_sampler (or batch_size=None)"
    if data.collate_fn is not default_collate:
        return "the loader has a custom collate_fn"
    if data.worker_init_fn is not None:
        return "the loader has a worker_init_fn"
    sampler = data.sampler
    if ordered and not isinstance(sampler, SequentialSampler):
        return f"the loader's {type(sampler).__name__} draws the evaluation order"
    if not (isinstance(sampler, (SequentialSampler, DistributedSampler)) or is_full_random(sampler)):
        return f"the loader has a custom sampler ({type(sampler).__name__})"
    return None


class TensorBatches:
    """Batches of in-memory tensors, cut by indexing (a :class:`~colabkit.train.datapath.Batches`).

    Args:
        tensors: The dataset's tensors (equal leading size).
        sampler: The resumable sampler whose order the batches follow.
        device: The device the model runs on.
    """

    exact = True
    needs_epoch_rng = False
    workers = 0  # indexed in this process

    def __init__(self, tensors: Sequence[torch.Tensor], sampler: ResumableBatchSampler, device: torch.device) -> None:
        self.tensors = tuple(tensors)
        self.batch_sampler = sampler
        self.device = device
        self.dataset = TensorDataset(*self.tensors)
        self.placement: Placement | None = None
        self._sources: tuple[torch.Tensor, ...] = self.tensors
        self._staging: _PinnedStaging | None = None

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def has_length(self) -> bool:
        return True

    def set_seed(self, seed: int) -> None:
        """Change the run seed (the data order) before the first epoch."""
        self.batch_sampler.seed = seed

    @property
    def batch_size(self) -> int:
        return self.batch_sampler.batch_size

    @property
    def samples(self) -> int:
        return len(self.dataset)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def place(self) -> Placement:
        """Decide where the tensors live (once; see the module docstring) and put them there."""
        if self.placement is not None:
            return self.placement
        if self.device.type != "cuda":
            self.placement = "host"
        elif all(t.device == self.device for t in self.tensors):
            self.placement = "device"
        else:
            self.placement = self._place_on_cuda()
        return self.placement

    def _place_on_cuda(self) -> Placement:
        free, _ = torch.cuda.mem_get_info(self.device)
        if choose_placement(self.nbytes, free) == "device":
            try:
                self._sources = tuple(t.to(self.device) for t in self.tensors)
                return "device"
            except Exception as exc:  # the estimate was wrong: fall back to copies per batch
                if not is_out_of_memory(exc):
                    raise
                self._sources = self.tensors
                torch.cuda.empty_cache()
        try:
            self._staging = _PinnedStaging(self.tensors, self.batch_sampler.batch_size, self.device)
        except RuntimeError:  # page-locked memory refused (container limits): plain copies by the loop
            return "host"
        return "pinned"

    def describe(self) -> str:
        """For the progress notice: which path runs and where the data is."""
        samples = f"{len(self.dataset):,} samples"
        where = {
            "device": f"{samples} on {self.device}",
            "pinned": f"{samples} in pinned host memory, copied to {self.device} per batch",
            "host": samples,
            None: samples,
        }[self.placement]
        return f"in-memory fast path ({where})"

    def epoch(self, epoch: int, *, skip: int = 0) -> Iterator[list[torch.Tensor]]:
        """The batches of ``epoch``, starting after ``skip`` batches (none of those is read)."""
        placement = self.place()
        order = self.batch_sampler.epoch_order(epoch, skip=skip)
        if placement == "device":
            order = order.to(self.device)
        return self._batches(order)

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        return self.epoch(0)

    def _batches(self, order: torch.Tensor) -> Iterator[list[torch.Tensor]]:
        size = self.batch_sampler.batch_size
        sources, staging = self._sources, self._staging
        for start in range(0, len(order), size):
            index = order[start : start + size]
            if staging is not None:
                yield staging.copy(index)
            else:
                yield [source.index_select(0, index) for source in sources]


class _PinnedStaging:
    """Two page-locked buffers per tensor: gather a batch into one while the other copies to the GPU."""

    def __init__(self, tensors: Sequence[torch.Tensor], batch_size: int, device: torch.device) -> None:
        self.tensors = tuple(tensors)
        self.device = device
        self.slots = [
            [torch.empty((batch_size, *t.shape[1:]), dtype=t.dtype, pin_memory=True) for t in self.tensors]
            for _ in range(_STAGING_SLOTS)
        ]
        self.copied: list[Any] = [None] * _STAGING_SLOTS  # a CUDA event per slot: its last copy is done
        self.turn = 0

    def copy(self, index: torch.Tensor) -> list[torch.Tensor]:
        slot, self.turn = self.turn, (self.turn + 1) % _STAGING_SLOTS
        if self.copied[slot] is not None:
            self.copied[slot].synchronize()  # long done in practice: that copy was queued two batches ago
        count = len(index)
        batch = []
        for source, buffer in zip(self.tensors, self.slots[slot], strict=True):
            staged = buffer[:count]
            torch.index_select(source, 0, index, out=staged)
            batch.append(staged.to(self.device, non_blocking=True))
        event = torch.cuda.Event()
        event.record()
        self.copied[slot] = event
        return batch


def for_training(
    data: Any, resumable: ResumableLoader, device: torch.device, *, argument: str = "train"
) -> TensorBatches | None:
    """The fast path for fit()'s training data, following ``resumable``'s sampler; None keeps the DataLoader."""
    data = as_dataset(data, argument)
    if dataloader_reason(data, device=device) is not None:
        return None
    sampler = resumable.batch_sampler
    if not isinstance(sampler, ResumableBatchSampler):
        return None
    dataset: TensorDataset = data.dataset if isinstance(data, DataLoader) else data  # type: ignore[assignment]
    return TensorBatches(dataset.tensors, sampler, device)


def for_evaluation(data: Any, *, batch_size: int, device: torch.device, argument: str = "data") -> TensorBatches | None:
    """The fast path for evaluate(), predict() and validation (dataset order); None keeps the DataLoader.

    Args:
        data: A TensorDataset or ``(x, y)`` tensors (``batch_size`` applies), or a DataLoader
            (its own batch size and ``drop_last``).
        batch_size: Batch size for a dataset.
        device: The device the model runs on.
        argument: The argument's name, for errors.
    """
    data = as_dataset(data, argument)
    if dataloader_reason(data, device=device, ordered=True) is not None:
        return None
    dataset: TensorDataset
    if isinstance(data, DataLoader):
        dataset, size, drop_last = data.dataset, int(data.batch_size), data.drop_last  # type: ignore[assignment, arg-type]
    else:
        dataset, size, drop_last = data, batch_size, False
    sampler = ResumableBatchSampler(len(dataset), size, shuffle=False, drop_last=drop_last)
    return TensorBatches(dataset.tensors, sampler, device)
