"""The in-memory fast path: bitwise the DataLoader path's batches, replay-free resume, who keeps the DataLoader."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    SubsetRandomSampler,
    TensorDataset,
    WeightedRandomSampler,
    default_collate,
)

from colabkit.train.callbacks import Callback, FitContext
from colabkit.train.fastpath import (
    DEVICE_MEMORY_SHARE,
    TensorBatches,
    choose_placement,
    dataloader_reason,
    for_evaluation,
    for_training,
)
from colabkit.train.loop import evaluate, fit, predict
from colabkit.train.state import ResumableBatchSampler, make_resumable

CPU = torch.device("cpu")
SIZE = 53  # not a multiple of any batch size below: the last batch is short


def tensors(size: int = SIZE) -> tuple[torch.Tensor, ...]:
    """Several dtypes and shapes, as real datasets have: images, labels, masks, raw bytes."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(size, 3, 4, generator=generator)
    y = torch.randint(0, 5, (size,), generator=generator)
    mask = torch.rand(size, generator=generator) > 0.5
    raw = torch.randint(0, 255, (size, 2), dtype=torch.uint8, generator=generator)
    return x, y, mask, raw


def resumable(data: Any, *, batch_size: int | None = None, seed: int = 0, workers: int = 0, **kw: Any) -> Any:
    return make_resumable(
        data,
        argument="train",
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        pin_memory=False,
        seed=seed,
        **kw,
    )


def assert_same_batches(expected: Iterable[Any], got: Iterable[Any]) -> None:
    expected, got = list(expected), list(got)
    assert len(got) == len(expected)
    for number, (want, have) in enumerate(zip(expected, got, strict=True)):
        assert type(have) is type(want) is list, number  # default_collate makes a list of a tuple sample
        assert len(have) == len(want)
        for a, b in zip(want, have, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f"batch {number} differs"


class CountRowsRead(torch.overrides.TorchFunctionMode):
    """Counts the rows that index_select reads: what a resume would replay if it replayed anything."""

    def __init__(self) -> None:
        super().__init__()
        self.rows = 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in (torch.index_select, torch.Tensor.index_select):
            self.rows += len(args[2] if len(args) > 2 else kwargs["index"])
        return func(*args, **(kwargs or {}))


# ----------------------------------------------------------------------------- bitwise the same batches


@pytest.mark.parametrize("seed", [0, 7, 2**31 + 5])
@pytest.mark.parametrize("batch_size", [1, 7, 16, 60])
def test_dataset_argument_gives_the_dataloader_batches(seed: int, batch_size: int) -> None:
    data = TensorDataset(*tensors())
    loader = resumable(data, batch_size=batch_size, seed=seed)
    fast = for_training(data, loader, CPU)
    assert isinstance(fast, TensorBatches)
    assert len(fast) == len(loader)
    for epoch in (0, 1, 3):
        assert_same_batches(loader.epoch(epoch), fast.epoch(epoch))
    first, second = (torch.cat([batch[0] for batch in fast.epoch(e)]) for e in (0, 1))
    assert not torch.equal(first, second)  # the order really changes per epoch


@pytest.mark.parametrize("seed", [0, 11])
@pytest.mark.parametrize("batch_size", [1, 8, 53])
@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("drop_last", [False, True])
def test_user_dataloader_gives_the_dataloader_batches(
    seed: int, batch_size: int, shuffle: bool, drop_last: bool
) -> None:
    user = DataLoader(TensorDataset(*tensors()), batch_size=batch_size, shuffle=shuffle, drop_last=drop_last)
    loader = resumable(user, seed=seed)
    fast = for_training(user, loader, CPU)
    assert fast is not None
    assert len(fast) == len(loader) == len(user)
    for epoch in (0, 2):
        assert_same_batches(loader.epoch(epoch), fast.epoch(epoch))
    if drop_last:
        assert all(len(batch[0]) == batch_size for batch in fast.epoch(0))


def test_same_batches_with_workers_and_after_set_seed() -> None:
    user = DataLoader(TensorDataset(*tensors()), batch_size=10, shuffle=True, num_workers=2)
    loader = resumable(user)
    fast = for_training(user, loader, CPU)
    assert fast is not None
    loader.set_seed(1234)  # what fit() does once the run seed is known: both paths follow it
    fast.set_seed(1234)
    assert_same_batches(loader.epoch(1), fast.epoch(1))
    reference = resumable(TensorDataset(*tensors()), batch_size=10, seed=1234)
    assert_same_batches(reference.epoch(1), fast.epoch(1))


def test_each_rank_gets_its_shard() -> None:
    data = TensorDataset(*tensors())
    for rank in (0, 1):
        loader = resumable(data, batch_size=4, seed=5, rank=rank, world_size=2)
        fast = for_training(data, loader, CPU)
        assert fast is not None
        assert_same_batches(loader.epoch(1), fast.epoch(1))


def test_tensors_passed_directly() -> None:
    x, y, *_ = tensors()
    loader = resumable((x, y), batch_size=8, seed=1)  # fit(model, (x, y)): rows of x and y are the samples
    fast = for_training((x, y), loader, CPU)
    assert fast is not None and len(fast.dataset) == SIZE
    assert_same_batches(resumable(TensorDataset(x, y), batch_size=8, seed=1).epoch(0), fast.epoch(0))
    ordered = for_evaluation((x, y), batch_size=8, device=CPU)
    assert_same_batches(DataLoader(TensorDataset(x, y), batch_size=8), ordered)  # type: ignore[arg-type]


def test_the_global_rng_is_not_touched() -> None:
    data = TensorDataset(*tensors())
    fast = for_training(data, resumable(data, batch_size=8, seed=3), CPU)
    assert fast is not None
    before = torch.get_rng_state()
    for epoch in range(3):
        list(fast.epoch(epoch, skip=epoch))
    assert torch.equal(torch.get_rng_state(), before)


# ----------------------------------------------------------------------------- resume mid-epoch


@pytest.mark.parametrize("skip", [0, 1, 3, 6, 7])
def test_mid_epoch_start_reads_only_the_remaining_batches(skip: int) -> None:
    data = TensorDataset(*tensors())
    loader = resumable(data, batch_size=8, seed=9)  # 7 batches: 6 of 8 and one of 5
    fast = for_training(data, loader, CPU)
    assert fast is not None
    full = list(fast.epoch(2))
    assert_same_batches(full[skip:], fast.epoch(2, skip=skip))
    assert_same_batches(loader.epoch(2, skip=skip), fast.epoch(2, skip=skip))
    with CountRowsRead() as counter:
        rest = list(fast.epoch(2, skip=skip))
    assert len(rest) == 7 - skip
    # Witness of a replay-free start: only the rows of the remaining batches are read, once per tensor.
    assert counter.rows == (SIZE - 8 * skip if skip < 7 else 0) * len(data.tensors)


# ----------------------------------------------------------------------------- evaluation order


@pytest.mark.parametrize("batch_size", [1, 10, 64])
def test_evaluation_gives_the_batches_of_an_ordered_dataloader(batch_size: int) -> None:
    data = TensorDataset(*tensors())
    fast = for_evaluation(data, batch_size=batch_size, device=CPU)
    assert fast is not None
    assert_same_batches(DataLoader(data, batch_size=batch_size, shuffle=False), fast)
    assert_same_batches(DataLoader(data, batch_size=batch_size), fast)  # iterating twice gives the same again
    user = DataLoader(data, batch_size=batch_size, drop_last=True)
    if len(user):
        assert_same_batches(user, for_evaluation(user, batch_size=999, device=CPU))  # type: ignore[arg-type]


def test_a_shuffling_evaluation_loader_keeps_the_dataloader() -> None:
    user = DataLoader(TensorDataset(*tensors()), batch_size=4, shuffle=True)
    assert "order" in str(dataloader_reason(user, device=CPU, ordered=True))
    assert for_evaluation(user, batch_size=4, device=CPU) is None
    assert dataloader_reason(user, device=CPU) is None  # for training the same loader is fine


# ----------------------------------------------------------------------------- who keeps the DataLoader


class Transformed(TensorDataset):
    def __getitem__(self, index: Any) -> Any:
        x, y = super().__getitem__(index)
        return x * 2, y


class Tagged(TensorDataset):
    """A subclass that adds something but reads samples as TensorDataset does: still rows of tensors."""

    name = "tagged"


class Folder(Dataset):  # type: ignore[type-arg]
    def __init__(self) -> None:
        self.x = torch.zeros(10, 2)

    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int) -> Any:
        return self.x[index], 0


class Stream(IterableDataset):  # type: ignore[type-arg]
    def __iter__(self) -> Any:
        return iter([(torch.zeros(2), 0)] * 4)


def _two() -> TensorDataset:
    x, y, *_ = tensors()
    return TensorDataset(x, y)


def _keeps(data: Any, words: str) -> None:
    reason = dataloader_reason(data, device=CPU)
    assert reason is not None and words in reason, reason
    loader = resumable(data, batch_size=4)  # the DataLoader path still takes it
    assert for_training(data, loader, CPU) is None


def test_custom_parts_keep_the_dataloader() -> None:
    data = _two()
    _keeps(DataLoader(data, batch_size=4, collate_fn=lambda batch: default_collate(batch)), "collate_fn")
    _keeps(DataLoader(data, batch_size=4, worker_init_fn=lambda _: None), "worker_init_fn")
    weights = torch.ones(len(data))
    _keeps(DataLoader(data, batch_size=4, sampler=WeightedRandomSampler(weights, len(data))), "WeightedRandomSampler")
    _keeps(DataLoader(data, batch_size=4, sampler=SubsetRandomSampler(range(10))), "SubsetRandomSampler")
    _keeps(DataLoader(data, batch_size=4, sampler=RandomSampler(data, replacement=True)), "RandomSampler")
    _keeps(DataLoader(data, batch_size=4, sampler=RandomSampler(data, num_samples=20)), "RandomSampler")
    batches = BatchSampler(SequentialSampler(data), batch_size=4, drop_last=False)

    class MyBatches(BatchSampler):
        pass

    _keeps(DataLoader(data, batch_sampler=MyBatches(SequentialSampler(data), 4, False)), "batch_sampler")
    _keeps(DataLoader(data, batch_size=None), "batch_size=None")
    x, y, *_ = tensors()
    _keeps(Transformed(x, y), "per-sample transform")
    _keeps(DataLoader(Transformed(x, y), batch_size=4), "per-sample transform")
    _keeps(Folder(), "not in-memory tensors")
    _keeps(DataLoader(Folder(), batch_size=4), "not in-memory tensors")
    assert dataloader_reason(Stream(), device=CPU) is not None
    assert dataloader_reason(DataLoader(Stream(), batch_size=2), device=CPU) is not None
    # Even a plain BatchSampler passed by hand: the loader no longer knows its batch size.
    _keeps(DataLoader(data, batch_sampler=batches), "batch_sampler")


def test_default_parts_take_the_fast_path() -> None:
    data = _two()
    for loader in (
        DataLoader(data, batch_size=4),
        DataLoader(data, batch_size=4, shuffle=True, drop_last=True),
        DataLoader(data, batch_size=4, collate_fn=default_collate),  # the default, named
        DataLoader(data, batch_size=4, shuffle=True, num_workers=2, pin_memory=True),
    ):
        assert dataloader_reason(loader, device=CPU) is None
        assert for_training(loader, resumable(loader), CPU) is not None
    x, y, *_ = tensors()
    assert dataloader_reason(Tagged(x, y), device=CPU) is None


def test_tensors_on_another_device_keep_the_dataloader() -> None:
    data = TensorDataset(torch.zeros(4, 2, device="meta"), torch.zeros(4, device="meta"))
    assert "meta" in str(dataloader_reason(data, device=CPU))


# ----------------------------------------------------------------------------- where the tensors live


def test_placement_rule() -> None:
    assert 0 < DEVICE_MEMORY_SHARE < 1
    free = 10_000
    assert choose_placement(int(free * DEVICE_MEMORY_SHARE), free) == "device"
    assert choose_placement(int(free * DEVICE_MEMORY_SHARE) + 1, free) == "pinned"
    assert choose_placement(0, 0) == "device"
    assert choose_placement(900, 1000, share=0.95) == "device"


def test_cpu_training_indexes_on_the_host() -> None:
    data = _two()
    fast = TensorBatches(data.tensors, ResumableBatchSampler(len(data), 5, shuffle=False), CPU)
    assert fast.describe() == f"in-memory fast path ({SIZE} samples)"
    assert fast.place() == "host"
    batch = next(iter(fast))
    assert batch[0].device == CPU and torch.equal(batch[0], data.tensors[0][:5])
    assert fast.nbytes == sum(t.numel() * t.element_size() for t in data.tensors)


# ----------------------------------------------------------------------------- fit, evaluate, predict


class Plain(TensorDataset):
    """Reads samples exactly as TensorDataset does, through its own ``__getitem__``: the DataLoader path."""

    def __getitem__(self, index: Any) -> Any:
        return super().__getitem__(index)


def classification(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=generator)
    return x, (x[:, 0] + 2 * x[:, 1]).gt(0).long() + (x[:, 2] > 1).long()


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 3))


def train(data: Any, val: Any = None, **options: Any) -> tuple[torch.nn.Module, Any]:
    model = mlp()
    settings: dict[str, Any] = {"epochs": 3, "batch_size": 8, "seed": 5, "lr": 1e-2, "progress": False}
    history = fit(model, data, val, **{**settings, **options})
    return model, history


def assert_same_training(a: tuple[torch.nn.Module, Any], b: tuple[torch.nn.Module, Any]) -> None:
    (model_a, history_a), (model_b, history_b) = a, b
    for (name, p), q in zip(model_a.state_dict().items(), model_b.state_dict().values(), strict=True):
        assert torch.equal(p, q), f"parameter {name} differs"
    timing = {"time", "samples_per_sec", "data_wait", "peak_gpu_gb"}
    records = [[{k: v for k, v in r.items() if k not in timing} for r in h.records] for h in (history_a, history_b)]
    assert records[0] and records[0] == records[1]


def test_the_data_notice_gives_a_reason_shared_by_train_and_val_once(capsys: pytest.CaptureFixture[str]) -> None:
    (x, y), (xv, yv) = classification(24, 1), classification(8, 2)
    train(Plain(x, y), Plain(xv, yv), epochs=1, progress=True)
    out = capsys.readouterr().out
    reason = "since Plain reads its samples its own way (a per-sample transform)"
    assert f"data: train on the DataLoader path, {reason}; val too" in out, out
    assert out.count("reads its samples its own way") == 1, out


@pytest.mark.parametrize("accum", [1, 3])
def test_fit_on_the_fast_path_equals_the_dataloader_path(accum: int, capsys: pytest.CaptureFixture[str]) -> None:
    (x, y), (xv, yv) = classification(70, 1), classification(30, 2)
    fast = train(TensorDataset(x, y), TensorDataset(xv, yv), grad_accum=accum, progress=True)
    out = capsys.readouterr().out
    assert "data: train on the in-memory fast path (70 samples), val on the in-memory fast path (30 samples)" in out
    loader = train(Plain(x, y), Plain(xv, yv), grad_accum=accum, progress=True)
    out = capsys.readouterr().out
    assert "data: train on the DataLoader path, since Plain reads its samples its own way" in out
    assert_same_training(fast, loader)
    assert fast[1][-1]["val_loss"] == loader[1][-1]["val_loss"]
    tuples = train((x, y), (xv, yv), grad_accum=accum)  # tensors passed directly: the same run again
    assert_same_training(fast, tuples)


def test_a_user_dataloader_takes_the_fast_path_with_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    x, y = classification(70, 1)
    fast = train(DataLoader(TensorDataset(x, y), batch_size=6, shuffle=True, drop_last=True), progress=True)
    assert "train on the in-memory fast path" in capsys.readouterr().out
    loader = train(DataLoader(Plain(x, y), batch_size=6, shuffle=True, drop_last=True))
    assert_same_training(fast, loader)
    custom = DataLoader(TensorDataset(x, y), batch_size=6, collate_fn=lambda batch: default_collate(batch))
    train(custom, epochs=1, progress=True)
    assert "DataLoader path, since the loader has a custom collate_fn" in capsys.readouterr().out


def test_evaluate_and_predict_on_the_fast_path_equal_the_dataloader_path() -> None:
    x, y = classification(50, 3)
    model = mlp()
    assert evaluate(model, TensorDataset(x, y), batch_size=7, progress=False) == evaluate(
        model, Plain(x, y), batch_size=7, progress=False
    )
    assert evaluate(model, (x, y), batch_size=7, progress=False) == evaluate(
        model, DataLoader(Plain(x, y), batch_size=7), progress=False
    )
    assert torch.equal(
        predict(model, x, batch_size=7, progress=False), predict(model, Plain(x), batch_size=7, progress=False)
    )


class FirstStep(Callback):
    def __init__(self) -> None:
        self.first: int | None = None
        self.steps = 0

    def on_step_end(self, ctx: FitContext) -> None:
        self.first = ctx.step if self.first is None else self.first
        self.steps += 1


def test_fast_path_resumes_exactly_without_reading_the_finished_batches(tmp_path: Path) -> None:
    x, y = classification(70, 1)  # 9 batches of 8 per epoch, the last one of 6
    data = TensorDataset(x, y)
    reference = train(data, epochs=2, checkpoint_dir=tmp_path / "a", save_every=5)
    _, partial = train(data, epochs=2, checkpoint_dir=tmp_path / "b", save_every=5, max_steps=5)
    assert partial.stop_reason == "max_steps"
    witness = FirstStep()
    with CountRowsRead() as counter:
        resumed = train(data, epochs=2, checkpoint_dir=tmp_path / "b", save_every=5, callbacks=[witness])
    # It resumed (first step 6, 13 of 18 steps trained) and read only the rows it trained on:
    # epoch 1 after its first 5 batches, then all of epoch 2, for both tensors; no replay.
    assert witness.first == 6 and witness.steps == 13
    assert counter.rows == ((70 - 5 * 8) + 70) * 2
    assert_same_training(reference, resumed)
