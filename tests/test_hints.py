"""The warning signs and the finish estimate, checked on History records (the real runs are in test_fit_display)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest

from colabkit.errors import ArgumentError
from colabkit.train.hints import (
    INPUT_MIN_BATCHES,
    INPUT_MIN_SECONDS,
    NAMES,
    Advisor,
    EpochClock,
    FinishEstimate,
    RunFacts,
    resolve_hints,
)


def _records(losses: list[float], **columns: list[float]) -> list[dict[str, Any]]:
    out = []
    for epoch, loss in enumerate(losses):
        record: dict[str, Any] = {"epoch": epoch, "loss": loss, "lr": 1e-3}
        record.update({key: values[epoch] for key, values in columns.items()})
        out.append(record)
    return out


def _fired(records: list[dict[str, Any]], **kwargs: Any) -> list[tuple[str, int]]:
    """Check epoch by epoch, as fit() does; (name, epoch) of every hint given."""
    advisor = Advisor(NAMES, **kwargs)
    return [(hint.name, hint.epoch) for end in range(1, len(records) + 1) for hint in advisor.check(records[:end])]


def test_resolve_hints() -> None:
    assert resolve_hints(True) == set(NAMES)
    assert resolve_hints(False) == set()
    assert resolve_hints(("lr", "memory")) == {"lr", "memory"}
    assert resolve_hints("input") == {"input"}
    with pytest.raises(ArgumentError, match=r"hints=\['speed'\]: speed unknown"):
        resolve_hints(["speed"])
    with pytest.raises(ArgumentError, match=r"hints=3"):
        resolve_hints(3)  # type: ignore[arg-type]


def test_flat_loss_gives_the_lr_hint_once_after_the_first_epochs() -> None:
    assert _fired(_records([2.3026, 2.3026, 2.3025, 2.3026, 2.3026])) == [("lr", 2)]
    assert _fired(_records([2.3, 2.4, 2.6])) == [("lr", 2)]  # rising: too high
    assert _fired(_records([2.3, 1.9, 1.5, 1.5, 1.5])) == []  # fell at first: a later plateau is not this
    message = Advisor(["lr"]).check(_records([0.7, 0.7, 0.7]))[0].message
    assert "lr=0.001" in message and "colabkit.lr_find(model, train)" in message and "lr=result.suggestion" in message


def test_overfitting_from_the_accuracy_gap_or_a_rising_val_loss() -> None:
    gap = _records([1.0, 0.6, 0.3], accuracy=[0.6, 0.8, 0.97], val_accuracy=[0.58, 0.73, 0.80])
    assert _fired(gap) == [("overfitting", 2)]
    once = _records([1.0, 0.6, 0.3], accuracy=[0.6, 0.8, 0.9], val_accuracy=[0.58, 0.7, 0.88])
    assert _fired(once) == []  # one epoch's gap on a small validation set can be noise
    rising = _records([1.0, 0.6, 0.4, 0.3], val_loss=[0.9, 0.8, 0.85, 0.95])
    assert _fired(rising) == [("overfitting", 3)]
    healthy = _records([1.0, 0.6, 0.4, 0.3], val_loss=[0.9, 0.7, 0.5, 0.45], accuracy=[0.5, 0.7, 0.8, 0.85],
                       val_accuracy=[0.5, 0.69, 0.79, 0.84])  # fmt: skip
    assert _fired(healthy) == []
    message = Advisor(["overfitting"]).check(gap)[0].message
    assert "17-point gap" in message and "early_stopping=3" in message and "augmentation" in message


def test_memory_near_full_names_the_batch_size_and_grad_accum() -> None:
    records = _records([1.0, 0.5], peak_gpu_gb=[10.0, 14.2], gpu_total_gb=[15.0, 15.0])
    hints = [h for end in (1, 2) for h in Advisor(["memory"], facts=RunFacts(batch_size=64)).check(records[:end])]
    assert [h.epoch for h in hints] == [1]
    assert "14.2/15.0 GB (95%)" in hints[0].message
    assert "batch_size=32 (now 64)" in hints[0].message and "grad_accum=2" in hints[0].message


def test_input_bound_names_workers_staging_and_memory() -> None:
    records = _records([1.0, 0.5], data_wait=[0.2, 0.7])
    (hint,) = Advisor(["input"], facts=RunFacts(num_workers=2)).check(records)
    assert "70% of the epoch waiting" in hint.message
    assert "num_workers (now 2)" in hint.message and "colabkit.stage()" in hint.message
    assert "TensorDataset" in hint.message


def test_each_sign_is_named_with_the_courses_word() -> None:
    flat = Advisor(["lr"]).check(_records([0.7, 0.7, 0.7]))[0].message
    assert "learning rate" in flat
    gap = _records([1.0, 0.6, 0.3], accuracy=[0.6, 0.8, 0.97], val_accuracy=[0.58, 0.73, 0.80])
    rising = _records([1.0, 0.6, 0.4, 0.3], val_loss=[0.9, 0.8, 0.85, 0.95])
    for records in (gap, rising):
        assert Advisor(["overfitting"]).check(records)[0].message.startswith("overfitting: ")
    full = _records([1.0], peak_gpu_gb=[14.2], gpu_total_gb=[15.0])
    assert "run out of memory" in Advisor(["memory"], facts=RunFacts(batch_size=64)).check(full)[0].message


def test_advice_leaves_out_what_the_run_does_already() -> None:
    flat = _records([0.7, 0.7, 0.7])
    built = Advisor(["lr"], facts=RunFacts(own_optimizer=True)).check(flat)[0].message
    assert "create your optimizer with lr=result.suggestion" in built and "fit(..., lr=" not in built
    gap = _records([1.0, 0.6, 0.3], accuracy=[0.6, 0.8, 0.97], val_accuracy=[0.58, 0.73, 0.80])
    stopping = Advisor(["overfitting"], facts=RunFacts(early_stopping=True)).check(gap)[0].message
    assert "early_stopping" not in stopping and "augmentation" in stopping
    full = _records([1.0], peak_gpu_gb=[14.2], gpu_total_gb=[15.0])
    single = Advisor(["memory"], facts=RunFacts(batch_size=1)).check(full)[0].message
    assert "batch_size=" not in single and "precision='bf16'" in single


def _input_message(**facts: Any) -> str:
    """The input hint on a long, slow epoch (20 batches, 30 s, 80% waiting) of a run with ``facts``."""
    records = _records([1.0], data_wait=[0.8], time=[30.0])
    hints = Advisor(["input"], facts=RunFacts(batches_per_epoch=20, **facts)).check(records)
    return hints[0].message if hints else ""


def test_input_is_not_timed_on_an_epoch_too_short_to_time() -> None:
    # The case: 4 batches, a 9 ms epoch, 52% of it "waiting".
    tiny = _records([1.0], data_wait=[0.52], time=[0.009])
    assert Advisor(["input"], facts=RunFacts(path="dataloader", batches_per_epoch=4)).check(tiny) == []
    short = _records([1.0], data_wait=[0.9], time=[0.3])  # enough batches, well under a second
    assert Advisor(["input"], facts=RunFacts(path="dataloader", batches_per_epoch=50)).check(short) == []
    few = _records([1.0], data_wait=[0.9], time=[5.0])  # seconds long, but a handful of batches
    assert (
        Advisor(["input"], facts=RunFacts(path="dataloader", batches_per_epoch=INPUT_MIN_BATCHES - 1)).check(few) == []
    )
    timed = _records([1.0], data_wait=[0.9], time=[INPUT_MIN_SECONDS])
    facts = RunFacts(path="dataloader", batches_per_epoch=INPUT_MIN_BATCHES)
    assert [h.name for h in Advisor(["input"], facts=facts).check(timed)] == ["input"]


def test_input_advice_fits_the_path_that_runs() -> None:
    # The DataLoader path over files: every fix that helps there.
    files = _input_message(path="dataloader", num_workers=0, cpus=2)
    assert "80% of the epoch waiting" in files and "num_workers (now 0), up to this machine's 2 CPU cores" in files
    assert "colabkit.stage()" in files and "TensorDataset" in files
    # Tensors in memory with a per-sample transform (DataLoader path): not "use a TensorDataset".
    transformed = _input_message(path="dataloader", num_workers=0, cpus=2, tensors=True)
    assert "num_workers (now 0" in transformed and "TensorDataset" not in transformed and "stage()" not in transformed
    assert "whole batches" in transformed
    # Every core has a worker already: more would not help.
    busy = _input_message(path="dataloader", num_workers=4, cpus=4)
    assert "Raise num_workers" not in busy and "4 workers use every CPU core already" in busy
    # The in-memory fast path: the data is tensors in memory already, cut by indexing.
    for placement in ("device", "host"):
        assert _input_message(path="fast", num_workers=0, placement=placement) == ""
    pinned = _input_message(path="fast", num_workers=0, placement="pinned")
    assert "uint8" in pinned and "too big to keep on the GPU" in pinned
    assert "num_workers" not in pinned and "TensorDataset" not in pinned and "stage()" not in pinned


def test_each_hint_once_silenced_or_already_given_before_a_resume() -> None:
    flat = _records([0.7] * 6, data_wait=[0.9] * 6)
    assert _fired(flat) == [("input", 0), ("lr", 2)]
    assert _fired(flat, given=["lr"]) == [("input", 0)]
    assert [h.name for h in Advisor(resolve_hints(False)).check(flat)] == []
    assert [h.name for h in Advisor(resolve_hints(["lr"])).check(flat)] == ["lr"]


def test_finish_estimate_against_the_session() -> None:
    left = [timedelta(hours=2, minutes=10)]
    estimate = FinishEstimate(session_left=lambda: left[0], platform="Colab", resumable=True)
    # 1 of 5 epochs done, 25 min each: 1 h 40 min to go.
    assert (
        estimate.check(epochs_left=4, seconds_per_epoch=1500, now=0.0)
        == "the run finishes in about 1 h 40 min; the Colab session ends in about 2 h 10 min"
    )
    left[0] = timedelta(hours=1, minutes=45)
    assert estimate.check(epochs_left=3, seconds_per_epoch=1500, now=1500.0) == ""  # same finish: said once
    left[0] = timedelta(minutes=55)
    # Epochs got slower: the run no longer fits. Said again, with what to do.
    message = estimate.check(epochs_left=2, seconds_per_epoch=2400, now=3000.0)
    assert message.startswith("the run will not finish before the Colab session ends in about 55 min")
    assert "time_limit='session'" in message and "next session resumes" in message
    left[0] = timedelta(minutes=15)
    assert estimate.check(epochs_left=1, seconds_per_epoch=2400, now=5400.0) == ""  # nothing new
    assert estimate.check(epochs_left=0, seconds_per_epoch=2400, now=7800.0) == ""  # done


def test_finish_estimate_advice_depends_on_time_limit_and_checkpoints() -> None:
    def said(**kwargs: Any) -> str:
        return FinishEstimate(session_left=lambda: timedelta(minutes=10), **kwargs).check(
            epochs_left=2, seconds_per_epoch=3600, now=0.0
        )

    assert "time_limit='session' stops it cleanly there and the next session resumes" in said(
        stops_at_session_end=True, resumable=True
    )
    assert "pass time_limit='session' so it stops cleanly" in said(resumable=True)
    assert "pass checkpoint_dir= (on Drive) and time_limit='session'" in said()


def test_finish_estimate_without_a_session_end_is_said_only_for_long_runs() -> None:
    unknown = FinishEstimate(session_left=lambda: None)
    assert unknown.check(epochs_left=9, seconds_per_epoch=10, now=0.0) == ""
    assert unknown.check(epochs_left=8, seconds_per_epoch=600, now=10.0) == "the run finishes in about 1 h 20 min"


def test_epoch_clock_times_the_wait_for_batches_but_the_first() -> None:
    now = [0.0]

    def batches() -> Iterator[int]:
        for index, load in enumerate([5.0, 1.0, 3.0]):  # seconds each batch takes to arrive
            now[0] += load
            yield index

    clock = EpochClock(lambda: now[0])
    clock.start(whole=True)
    for _ in clock.timed(batches()):
        now[0] += 2.0  # the step that uses the batch
    # From the first batch's arrival (t=5) to the end (t=15): 1 + 3 s of waiting in 10 s.
    assert clock.wait_share() == 0.4
    clock.end()
    clock.start(whole=False)  # resumed inside an epoch: its wall time says nothing about a whole one
    clock.end()
    assert clock.seconds_per_epoch() == 15.0
