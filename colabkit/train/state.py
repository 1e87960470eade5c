"""Resumable training state: where in the data a run is, and how to get back there exactly.

Exact mid-epoch resume needs three things (reliability.md section 4):

* the data order of every epoch is a pure function of ``(seed, epoch)``, so a
  resumed run can rebuild it: :class:`ResumableBatchSampler` draws the epoch's
  permutation from its own generator, never from torch's global one;
* skipping the batches already trained on costs nothing: the sampler slices
  the permutation, no sample is loaded;
* random augmentation inside ``Dataset.__getitem__`` does not depend on which
  DataLoader worker ran it or how many samples that worker already produced:
  :class:`SeededDataset` reseeds torch, ``random`` and numpy from
  ``(seed, epoch, index)`` before each sample when it runs in a worker process
  (in the main process the global RNG stream is saved and restored as a whole).

:func:`make_resumable` turns a Dataset or an ordinary DataLoader into a
:class:`ResumableLoader` built from those parts, keeping the DataLoader's own
options (batch size, collate_fn, workers, pinning, ...). :func:`capture_rng_state`
and :func:`restore_rng_state` save and put back every global RNG as tensors and
primitives, so a checkpoint holding them loads with ``weights_only=True``.
"""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from typing import Any

import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    get_worker_info,
)
from torch.utils.data.distributed import DistributedSampler

from colabkit import _notify, versions
from colabkit.errors import ArgumentError
from colabkit.train.batches import as_dataset, check_batch_size

__all__ = [
    "KeyedBatch",
    "ResumableBatchSampler",
    "ResumableLoader",
    "SeededDataset",
    "SkippingBatchSampler",
    "TrainPosition",
    "capture_rng_state",
    "is_full_random",
    "make_resumable",
    "mix_seed",
    "ordered_loader",
    "resolve_workers",
    "restore_rng_state",
    "sample_seeds",
    "seed_python_numpy",
    "seed_sample",
]

_MASK64 = (1 << 64) - 1


_GOLDEN = 0x9E3779B97F4A7C15


def _mix(state: int, part: int) -> int:
    """One splitmix64 round: fold ``part`` into ``state``."""
    state = (state ^ (int(part) & _MASK64)) & _MASK64
    state = (state + _GOLDEN) & _MASK64
    z = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def mix_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (splitmix64 over the parts).

    Neighbouring inputs (epoch 3 vs 4, sample 10 vs 11) give unrelated seeds,
    unlike ``seed + epoch``, whose streams overlap.
    """
    state = _GOLDEN
    for part in parts:
        state = _mix(state, part)
    return state >> 1  # 63 bits: fits torch's signed int64 seed


def sample_seeds(seed: int, epoch: int, indices: Iterable[Any]) -> list[int]:
    """``mix_seed(seed, epoch, index)`` for every index of a batch, the shared rounds done once.

    Worked out for the whole batch before its first sample is read: a tight loop
    that stays in the CPU's caches, instead of one cold call between two image decodes.
    """
    prefix = _mix(_mix(_GOLDEN, seed), epoch)
    return [_mix(prefix, index) >> 1 for index in indices]


def seed_sample(seed: int) -> None:
    """Seed torch's CPU generator, ``random`` and numpy (if imported) for one sample.

    ``torch.default_generator.manual_seed`` rather than ``torch.manual_seed``:
    the latter also walks every accelerator backend and costs ~100 µs, sixty
    times more, which matters when it runs once per sample.
    """
    torch.default_generator.manual_seed(seed)
    seed_python_numpy(seed)


def seed_python_numpy(seed: int) -> None:
    """Seed ``random`` and numpy's global generator (if numpy is imported)."""
    random.seed(seed)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(seed & 0xFFFFFFFF)


def _python_numpy_state() -> Any:
    """What tells whether ``random`` or numpy's global generator drew a number (or numpy got imported)."""
    numpy = sys.modules.get("numpy")
    if numpy is None:
        return random.getstate(), None
    _, keys, position, has_gauss, cached = numpy.random.get_state(legacy=True)
    return random.getstate(), (keys.tobytes(), position, has_gauss, cached)


class KeyedBatch(list):
    """A batch of dataset indices that also knows its epoch (travels to DataLoader workers)."""

    def __init__(self, indices: Iterable[Any], epoch: int) -> None:
        super().__init__(indices)
        self.epoch = epoch


class SeededDataset(Dataset):
    """Wraps a map-style dataset so worker-side randomness is a function of (seed, epoch, index).

    The DataLoader hands :meth:`__getitems__` a whole :class:`KeyedBatch`. In a
    worker process every sample is fetched right after seeding from
    ``mix_seed(seed, epoch, index)``; a ``collate_fn`` that draws random numbers
    (mixup, cutmix) then continues from the last sample's seed, equally
    reproducible. In the main process nothing is reseeded: the loop saves and
    restores the whole global RNG stream, and reseeding would make dropout
    masks a function of the data position.

    Seeding ``random`` and numpy costs ~25 µs a sample between image decodes,
    a tenth of reading a small PNG, and most datasets draw only from torch. So
    a worker seeds torch per sample and checks after the batch whether
    ``random`` or numpy moved; if one did, it fetches that batch again seeding
    all three per sample, and keeps doing so. Either way every sample sees the
    generators exactly as if all three had been seeded for it (an unused
    generator cannot change a sample); only a ``__getitem__`` with side effects
    notices that one batch per worker was read twice.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.seeds_python_numpy = False  # this process saw a sample draw from random or numpy

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: Any) -> Any:
        return self.dataset[index]

    def __getitems__(self, indices: list[Any]) -> list[Any]:
        epoch = getattr(indices, "epoch", None)
        if epoch is None or get_worker_info() is None:
            fetch_many = getattr(self.dataset, "__getitems__", None)
            if fetch_many is not None:
                return list(fetch_many(list(indices)))
            return [self.dataset[index] for index in indices]
        seeds = sample_seeds(self.seed, epoch, indices)
        if self.seeds_python_numpy:
            return self._fetch(indices, seeds, seed_sample)
        before = _python_numpy_state()
        samples = self._fetch(indices, seeds, torch.default_generator.manual_seed)
        if _python_numpy_state() != before:
            self.seeds_python_numpy = True  # a sample drew from them unseeded: read the batch again, seeded
            return self._fetch(indices, seeds, seed_sample)
        seed_python_numpy(seeds[-1])  # as if seeded per sample: a collate_fn continues from the last seed
        return samples

    def _fetch(self, indices: list[Any], seeds: list[int], seed: Callable[[int], Any]) -> list[Any]:
        samples = []
        for index, sample_seed in zip(indices, seeds, strict=True):
            seed(sample_seed)
            samples.append(self.dataset[index])
        return samples


class ResumableBatchSampler:
    """Batches of a (shuffled) permutation that depends only on ``(seed, epoch)``, with free skipping.

    Also does DistributedSampler's job: with ``world_size > 1`` each rank takes
    every ``world_size``-th index of the (padded) permutation.

    Args:
        length: Number of samples in the dataset.
        batch_size: Samples per batch.
        shuffle: Permute the samples every epoch.
        drop_last: Drop a last, incomplete batch.
        seed: Run seed; the epoch's order is drawn from ``mix_seed(seed, epoch)``.
        rank: This process's rank (DDP).
        world_size: Number of processes (DDP).
    """

    def __init__(
        self,
        length: int,
        batch_size: int,
        *,
        shuffle: bool,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.length = length
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip(self, batches: int) -> None:
        """Leave out the first ``batches`` batches of the next iteration only."""
        self._skip = batches

    def _per_rank(self) -> int:
        return -(-self.length // self.world_size)  # padded so every rank gets as many samples

    def __len__(self) -> int:
        per_rank = self._per_rank()
        if self.drop_last:
            return per_rank // self.batch_size
        return -(-per_rank // self.batch_size)

    def indices(self, epoch: int) -> torch.Tensor:
        """This rank's sample order for ``epoch``."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
            order = torch.randperm(self.length, generator=generator)
        else:
            order = torch.arange(self.length)
        if self.world_size > 1:
            total = self._per_rank() * self.world_size
            if total > self.length:  # pad by wrapping around, as DistributedSampler does
                order = torch.cat([order, order[: total - self.length]])
            order = order[self.rank : total : self.world_size]
        return order

    def epoch_order(self, epoch: int, *, skip: int = 0) -> torch.Tensor:
        """The indices of ``epoch``'s batches after the first ``skip``, back to back (``drop_last`` applied).

        Batch ``k`` of the epoch is ``order[(k - skip) * batch_size:][:batch_size]``; the
        DataLoader path and the in-memory fast path both cut their batches from this.
        """
        order = self.indices(epoch)
        size = self.batch_size
        stop = (len(order) // size) * size if self.drop_last else len(order)
        return order[skip * size : stop]

    def __iter__(self) -> Iterator[KeyedBatch]:
        skip, self._skip = self._skip, 0
        epoch = self.epoch
        size = self.batch_size
        # One tolist() for the whole epoch; slicing Python lists is cheaper than per-batch tensor work.
        flat = self.epoch_order(epoch, skip=skip).tolist()
        for start in range(0, len(flat), size):
            yield KeyedBatch(flat[start : start + size], epoch)


class SkippingBatchSampler:
    """Wraps a batch sampler colabkit does not know: skipping iterates indices only, never data.

    Exact resume then also needs the sampler's randomness restored, which the
    loop does by restoring the global RNG state saved at the epoch's start.
    """

    def __init__(self, batch_sampler: Iterable[list[Any]]) -> None:
        self.batch_sampler = batch_sampler
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for inner in (self.batch_sampler, getattr(self.batch_sampler, "sampler", None)):
            set_epoch = getattr(inner, "set_epoch", None)
            if callable(set_epoch):
                set_epoch(epoch)

    def skip(self, batches: int) -> None:
        self._skip = batches

    def __len__(self) -> int:
        return len(self.batch_sampler)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[KeyedBatch]:
        # Not a generator: the skipping and the first batch happen now, when the DataLoader
        # iterator is created, so a sampler that draws its order from the global RNG draws it
        # from the restored state of the epoch's start, before the loop restores the current one.
        skip, self._skip = self._skip, 0
        inner = iter(self.batch_sampler)
        for _ in range(skip):
            next(inner, None)
        first = next(inner, None)
        return self._rest(first, inner, self.epoch)

    @staticmethod
    def _rest(first: Any, inner: Iterator[Any], epoch: int) -> Iterator[KeyedBatch]:
        if first is None:
            return
        yield KeyedBatch(first, epoch)
        for batch in inner:
            yield KeyedBatch(batch, epoch)


class _WorkerInit:
    """worker_init_fn: ignores SIGINT, seeds numpy like torch seeds the worker, then runs the user's own function.

    A class, not a closure, so it pickles under the ``spawn`` start method.
    """

    def __init__(self, user_fn: Callable[[int], None] | None) -> None:
        self.user_fn = user_fn

    def __call__(self, worker_id: int) -> None:
        # Ctrl-C in a terminal reaches the whole process group: the main process turns it into a
        # clean stop at the next step boundary, so a worker must not die of it first.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        numpy = sys.modules.get("numpy")
        if numpy is not None:
            numpy.random.seed(torch.initial_seed() & 0xFFFFFFFF)
        if self.user_fn is not None:
            self.user_fn(worker_id)


@dataclasses.dataclass
class TrainPosition:
    """Where a run is: saved in every checkpoint as primitives.

    Attributes:
        epoch: Current epoch (0-based); equals ``epochs`` when training finished.
        batch: Loader batches already consumed in this epoch (always at an optimizer-step boundary).
        step: Optimizer steps taken since the run began.
        samples: Training samples seen since the run began.
    """

    epoch: int = 0
    batch: int = 0
    step: int = 0
    samples: int = 0

    def state_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> TrainPosition:
        return cls(**{field.name: int(state[field.name]) for field in dataclasses.fields(cls)})


def default_workers(dataset: Any) -> int:
    """``num_workers="auto"``: none for in-memory tensors or streams, else up to 4 (one per CPU core)."""
    if isinstance(dataset, torch.utils.data.TensorDataset):
        return 0  # a worker only adds pickling to an indexing operation
    if isinstance(dataset, IterableDataset):
        return 0  # each worker would replay the whole stream unless the dataset shards itself
    return max(0, min(4, (os.cpu_count() or 1)))


class ResumableLoader:
    """A DataLoader whose epoch order can be reproduced and resumed mid-epoch.

    Use :meth:`epoch` to get the iterator for an epoch, optionally skipping the
    batches already trained on. ``exact`` says whether resuming reproduces the
    data order and augmentation exactly; ``needs_epoch_rng`` says the loop must
    restore the RNG state of the epoch's start before iterating (samplers
    colabkit does not know draw their order from the global RNG). It is the DataLoader
    path of :class:`~colabkit.train.datapath.Batches` (``placement == "loader"``).
    """

    placement = "loader"

    def __init__(
        self,
        loader: DataLoader,
        batch_sampler: ResumableBatchSampler | SkippingBatchSampler | None,
        *,
        seed: int,
        exact: bool,
        needs_epoch_rng: bool,
    ) -> None:
        self.loader = loader
        self.batch_sampler = batch_sampler
        self.seed = seed
        self.exact = exact
        self.needs_epoch_rng = needs_epoch_rng
        self.dataset = getattr(loader.dataset, "dataset", loader.dataset)
        self.why: str | None = None  # why the data takes this path (for :meth:`describe`)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.loader)

    @property
    def batch_size(self) -> int | None:
        # A DataLoader with colabkit's own batch sampler has batch_size None: the sampler knows it.
        return self.loader.batch_size or getattr(self.loader.batch_sampler, "batch_size", None)

    @property
    def workers(self) -> int:
        return self.loader.num_workers

    @property
    def samples(self) -> int | None:
        try:
            return len(self.dataset)  # type: ignore[arg-type]
        except TypeError:
            return None

    def place(self) -> str:
        return self.placement

    def describe(self) -> str:
        return f"DataLoader path, since {self.why}" if self.why else "DataLoader path"

    def set_seed(self, seed: int) -> None:
        """Change the run seed (data order and worker randomness) before the first epoch."""
        self.seed = seed
        for part in (self.batch_sampler, self.loader.dataset):
            if isinstance(part, (ResumableBatchSampler, SeededDataset)):
                part.seed = seed

    def has_length(self) -> bool:
        try:
            len(self.loader)
        except TypeError:
            return False
        return True

    def epoch(self, epoch: int, *, skip: int = 0) -> Iterator[Any]:
        """The iterator for ``epoch``, starting after ``skip`` batches."""
        if self.loader.generator is not None:
            # Worker base seeds come from this generator, not the global RNG.
            self.loader.generator.manual_seed(mix_seed(self.seed, epoch, 1))
        if self.batch_sampler is not None:
            self.batch_sampler.set_epoch(epoch)
            self.batch_sampler.skip(skip)
            return iter(self.loader)
        sampler = getattr(self.loader, "sampler", None)
        set_epoch = getattr(sampler, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        iterator = iter(self.loader)
        if skip:
            # An IterableDataset cannot be indexed: the skipped batches must be produced.
            _notify.warn_once(
                "iterable-skip",
                f"resuming inside an epoch of an IterableDataset reads and discards {skip} batches; "
                "use a map-style Dataset for an instant, exact resume",
            )
            for _ in range(skip):
                next(iterator, None)
        return iterator


def is_full_random(sampler: Any) -> bool:
    """Whether ``sampler`` is a RandomSampler over the whole dataset without replacement (a plain shuffle)."""
    return isinstance(sampler, RandomSampler) and not sampler.replacement and sampler._num_samples is None


def make_resumable(
    data: Any,
    *,
    argument: str,
    batch_size: int | None,
    shuffle: bool,
    num_workers: int | str,
    pin_memory: bool,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
) -> ResumableLoader:
    """Build a :class:`ResumableLoader` from a Dataset or an ordinary DataLoader.

    A Dataset (or an ``(x, y)`` pair of tensors) gets a DataLoader with ``batch_size``
    (:data:`~colabkit.train.batches.DEFAULT_BATCH_SIZE` if None), shuffling as
    asked and ``num_workers`` ("auto": see :func:`default_workers`). A DataLoader
    is rebuilt on the same dataset with the same options, with colabkit's
    sampler in place of a RandomSampler / SequentialSampler / DistributedSampler
    and colabkit's worker seeding chained before the user's ``worker_init_fn``.

    Args:
        data: A map-style or iterable Dataset, or a DataLoader.
        argument: The fit() argument name, for error messages.
        batch_size: Batch size for a Dataset (ignored for a DataLoader).
        shuffle: Shuffle a Dataset every epoch (a DataLoader keeps its own choice).
        num_workers: Worker processes for a Dataset, or "auto".
        pin_memory: Pin host memory (for CUDA).
        seed: Run seed that fixes data order and worker randomness.
        rank: DDP rank.
        world_size: DDP world size.

    Raises:
        ArgumentError: ``data`` is neither, is empty, or ``batch_size`` / ``num_workers`` are invalid.
    """
    data = as_dataset(data, argument)
    if isinstance(data, DataLoader):
        return _from_loader(data, argument=argument, seed=seed, rank=rank, world_size=world_size)
    batch_size = check_batch_size(batch_size)
    workers = resolve_workers(num_workers, data)
    if isinstance(data, IterableDataset):
        loader = DataLoader(data, batch_size=batch_size, num_workers=workers, pin_memory=pin_memory)
        return ResumableLoader(loader, None, seed=seed, exact=workers == 0, needs_epoch_rng=False)
    length = _length(data, argument)
    sampler = ResumableBatchSampler(length, batch_size, shuffle=shuffle, seed=seed, rank=rank, world_size=world_size)
    loader = DataLoader(
        SeededDataset(data, seed),
        batch_sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        worker_init_fn=_WorkerInit(None),
        generator=torch.Generator(),
        persistent_workers=workers > 0,
    )
    return ResumableLoader(loader, sampler, seed=seed, exact=True, needs_epoch_rng=False)


def ordered_loader(
    data: Any, *, argument: str, batch_size: int | None, num_workers: int | str, pin_memory: bool
) -> Any:
    """The data in its own order, once (evaluate, predict, validation, lr_find, compare_devices).

    A DataLoader is used as it is; a Dataset or an ``(x, y)`` pair of tensors is batched as
    fit() batches it (:func:`~colabkit.train.batches.check_batch_size`), without shuffling.

    Raises:
        ArgumentError: ``data`` is not a Dataset, DataLoader or tensor pair, or it is empty.
    """
    data = as_dataset(data, argument)
    if isinstance(data, DataLoader):
        return data
    if not isinstance(data, IterableDataset):
        _length(data, argument)
    return DataLoader(
        data,
        batch_size=check_batch_size(batch_size),
        shuffle=False,
        num_workers=resolve_workers(num_workers, data),
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(0),  # do not draw worker seeds from the global RNG
    )


def resolve_workers(num_workers: int | str, dataset: Any) -> int:
    """The number of DataLoader workers for ``num_workers`` ("auto" or an integer >= 0)."""
    if num_workers == "auto":
        return default_workers(dataset)
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ArgumentError(f"num_workers={num_workers!r} must be 'auto' or an integer >= 0, e.g. num_workers=2")
    return num_workers


def _length(dataset: Sized, argument: str) -> int:
    try:
        length = len(dataset)
    except TypeError:
        raise ArgumentError(f"{argument} has no len(); pass a map-style Dataset or a DataLoader") from None
    if length == 0:
        raise ArgumentError(f"{argument} is empty (0 samples); check the dataset's path or filtering")
    return length


def _from_loader(loader: DataLoader, *, argument: str, seed: int, rank: int, world_size: int) -> ResumableLoader:
    dataset = loader.dataset
    if isinstance(dataset, IterableDataset) or (loader.batch_size is None and loader.batch_sampler is None):
        # Nothing to index: keep the loader; resuming reads and discards the skipped batches.
        if isinstance(dataset, Sized) and not isinstance(dataset, IterableDataset):
            _length(dataset, argument)
        return ResumableLoader(loader, None, seed=seed, exact=loader.num_workers == 0, needs_epoch_rng=False)
    length = _length(dataset, argument)  # type: ignore[arg-type]
    sampler = loader.sampler
    batch_sampler: ResumableBatchSampler | SkippingBatchSampler
    known_batches = type(loader.batch_sampler) is BatchSampler and loader.batch_size is not None
    if known_batches and (isinstance(sampler, SequentialSampler) or is_full_random(sampler)):
        batch_sampler = ResumableBatchSampler(
            length,
            int(loader.batch_size),  # type: ignore[arg-type]
            shuffle=isinstance(sampler, RandomSampler),
            drop_last=loader.drop_last,
            seed=seed,
            rank=rank,
            world_size=world_size,
        )
        needs_epoch_rng = False
    elif known_batches and isinstance(sampler, DistributedSampler):
        batch_sampler = ResumableBatchSampler(
            length,
            int(loader.batch_size),  # type: ignore[arg-type]
            shuffle=sampler.shuffle,
            drop_last=loader.drop_last,
            seed=seed,
            rank=sampler.rank,
            world_size=sampler.num_replicas,
        )
        needs_epoch_rng = False
    else:
        batch_sampler = SkippingBatchSampler(loader.batch_sampler)  # type: ignore[arg-type]
        needs_epoch_rng = True
    options: dict[str, Any] = {
        "num_workers": loader.num_workers,
        "collate_fn": loader.collate_fn,
        "pin_memory": loader.pin_memory,
        "timeout": loader.timeout,
        "worker_init_fn": _WorkerInit(loader.worker_init_fn),
        "multiprocessing_context": loader.multiprocessing_context,
        "generator": torch.Generator(),
        "persistent_workers": loader.persistent_workers,
        "pin_memory_device": loader.pin_memory_device,
    }
    if loader.num_workers > 0:
        options["prefetch_factor"] = loader.prefetch_factor
    if versions.dataloader_has_in_order():
        options["in_order"] = loader.in_order
    rebuilt = DataLoader(SeededDataset(dataset, seed), batch_sampler=batch_sampler, **options)
    return ResumableLoader(rebuilt, batch_sampler, seed=seed, exact=True, needs_epoch_rng=needs_epoch_rng)


# --------------------------------------------------------------------------- global RNG state


def _import_numpy() -> Any:
    try:
        import numpy
    except ImportError:
        return None
    return numpy


def capture_rng_state() -> dict[str, Any]:
    """Every global RNG state, as tensors and primitives only (loads with weights_only=True).

    Covers python ``random``, numpy's legacy global generator (when numpy is
    importable), torch CPU, and each CUDA device once CUDA is initialised
    (capturing never initialises CUDA itself, which would break fork-based launchers).

    Example:
        >>> state = capture_rng_state()
        >>> a = torch.rand(1); restore_rng_state(state); torch.equal(a, torch.rand(1))
        True
    """
    version, internal, gauss_next = random.getstate()
    out: dict[str, Any] = {
        "python": {"version": int(version), "state": [int(x) for x in internal], "gauss_next": gauss_next},
        "torch": torch.get_rng_state(),
    }
    np = _import_numpy()
    if np is not None:
        name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        out["numpy"] = {
            "bit_generator": str(name),
            "state": torch.from_numpy(np.asarray(keys).astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = list(torch.cuda.get_rng_state_all())
    return out


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Put back RNG states made by :func:`capture_rng_state` (missing parts are left alone).

    Raises:
        ArgumentError: ``state`` is not such a dict.
    """
    if not isinstance(state, Mapping):
        raise ArgumentError(f"restore_rng_state() needs the dict capture_rng_state() made, got {type(state).__name__}")
    py = state.get("python")
    if py is not None:
        random.setstate((int(py["version"]), tuple(int(x) for x in py["state"]), py["gauss_next"]))
    if state.get("torch") is not None:
        torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    npstate = state.get("numpy")
    if npstate is not None:
        np = _import_numpy()
        if np is None:
            _notify.warn_once("rng-numpy-missing", "the checkpoint holds a numpy RNG state but numpy is not installed")
        else:
            keys = torch.as_tensor(npstate["state"]).cpu().numpy().astype(np.uint32)
            np.random.set_state(
                (
                    str(npstate["bit_generator"]),
                    keys,
                    int(npstate["pos"]),
                    int(npstate["has_gauss"]),
                    float(npstate["cached_gaussian"]),
                )
            )
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if len(cuda) != count:
            _notify.warn(
                f"the checkpoint holds RNG states for {len(cuda)} CUDA devices but {count} are visible; "
                "restoring the first ones, so random numbers will not repeat exactly"
            )
        for index, rng in enumerate(list(cuda)[:count]):
            torch.cuda.set_rng_state(torch.as_tensor(rng, dtype=torch.uint8).cpu(), index)
