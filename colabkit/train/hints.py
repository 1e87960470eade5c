"""The warning signs a course tells students to watch for, said by fit() once each, with the fix.

Checked at each epoch's end from the History record fit() already made (no
extra reads from the GPU):

- ``"lr"``: the loss has not fallen over the first :data:`LR_EPOCHS` epochs.
- ``"overfitting"``: validation loss rising two epochs while training loss
  falls, or a train-validation accuracy gap beyond :data:`ACCURACY_GAP` (5
  points) two epochs in a row.
- ``"memory"``: peak GPU memory above :data:`MEMORY_SHARE` of the device.
- ``"input"``: the loop waited for the next batch more than :data:`INPUT_SHARE`
  of the epoch (timed on the host around the loader), in an epoch long enough to
  time (:data:`INPUT_MIN_BATCHES` batches, :data:`INPUT_MIN_SECONDS` of training).

Each message uses the course's words for the sign (learning rate, overfitting,
out of memory) and advises only what the run does not do already
(:class:`RunFacts`): no ``num_workers`` or ``TensorDataset`` on the in-memory
fast path, no ``early_stopping=3`` when early stopping is on.

Each hint given is kept in ``History.hints`` and so in checkpoints: a resumed
run does not repeat it. ``fit(hints=False)`` silences them all, ``hints=("lr",)``
keeps only those named.

:class:`FinishEstimate` says when the run will end and how that compares with
the notebook session's end (:func:`colabkit.session_time_left`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import timedelta
from typing import Any

from colabkit import display as _display
from colabkit.errors import ArgumentError
from colabkit.train.progress import MEMORY_KEYS

__all__ = [
    "ACCURACY_GAP",
    "INPUT_MIN_BATCHES",
    "INPUT_MIN_SECONDS",
    "INPUT_SHARE",
    "LR_EPOCHS",
    "MEMORY_SHARE",
    "NAMES",
    "Advisor",
    "EpochClock",
    "FinishEstimate",
    "Hint",
    "RunFacts",
    "resolve_hints",
]

NAMES = ("lr", "overfitting", "memory", "input")
#: Epochs over which the loss must fall by at least LR_MIN_DROP (relative).
LR_EPOCHS = 3
LR_MIN_DROP = 0.01
#: Train minus validation accuracy (0-1 scale) past which the model is memorising.
ACCURACY_GAP = 0.05
#: Share of the GPU's memory past which the next bigger batch will not fit.
MEMORY_SHARE = 0.9
#: Share of an epoch's wall time spent waiting for the next batch that makes the data the bottleneck.
INPUT_SHARE = 0.5
#: An epoch shorter than this many batches, or this many seconds of training, is too short to time:
#: fixed costs (the loader's start, the first step) and the clock's noise make its share meaningless.
INPUT_MIN_BATCHES = 5
INPUT_MIN_SECONDS = 1.0
#: Record key of that share (set by fit()).
DATA_WAIT = "data_wait"


def resolve_hints(hints: bool | Iterable[str]) -> frozenset[str]:
    """``fit(hints=...)`` as the set of hint names to give.

    Raises:
        ArgumentError: an unknown name, or a value of another type.
    """
    if hints is True:
        return frozenset(NAMES)
    if hints is False or hints is None:
        return frozenset()
    if isinstance(hints, str):
        hints = (hints,)
    try:
        names = frozenset(hints)
    except TypeError:
        raise ArgumentError(
            f"hints={hints!r}: pass True (all), False (none) or names from {NAMES}, e.g. hints=('lr', 'memory')"
        ) from None
    unknown = sorted(str(name) for name in names - set(NAMES))
    if unknown:
        raise ArgumentError(f"hints={sorted(map(str, names))!r}: {', '.join(unknown)} unknown; the hints are {NAMES}")
    return names


@dataclasses.dataclass(frozen=True)
class Hint:
    """One warning sign, as given: its name, the epoch (0-based) it was seen at, and the advice."""

    name: str
    epoch: int
    message: str

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class RunFacts:
    """What the run already does, so the advice fits it (from fit()'s arguments and its data path).

    None means unknown: the advice then names every usual fix.

    Attributes:
        batch_size: Samples per batch.
        grad_accum: Batches per optimizer step.
        num_workers: DataLoader worker processes (0 on the in-memory fast path).
        path: How batches are made: ``"fast"`` (cut by indexing in-memory tensors) or ``"dataloader"``.
        placement: On the fast path, where the tensors live (``"device"``, ``"pinned"`` or ``"host"``,
            see :mod:`colabkit.train.fastpath`).
        tensors: The dataset is tensors in memory already (a ``TensorDataset``, perhaps with a
            per-sample transform that keeps it on the DataLoader path).
        batches_per_epoch: Training batches in one epoch (this process's share).
        cpus: CPU cores of this machine (DataLoader workers past that do not help).
        own_optimizer: The user built the optimizer (``fit(lr=...)`` does not reach it).
        early_stopping: An EarlyStopping callback is on.
    """

    batch_size: int | None = None
    grad_accum: int = 1
    num_workers: int | None = None
    path: str | None = None
    placement: str | None = None
    tensors: bool = False
    batches_per_epoch: int | None = None
    cpus: int | None = None
    own_optimizer: bool = False
    early_stopping: bool = False


class Advisor:
    """Checks a run's records at each epoch's end and gives each enabled hint at most once.

    Args:
        enabled: Names of the hints to give (:func:`resolve_hints`).
        given: Names given before (a resumed run's ``History.hints``): not repeated.
        facts: What the messages quote.
    """

    def __init__(self, enabled: Iterable[str], *, given: Iterable[str] = (), facts: RunFacts | None = None) -> None:
        self.enabled = frozenset(enabled)
        self.given = set(given)
        self.facts = facts or RunFacts()

    def check(self, records: Sequence[Mapping[str, Any]]) -> list[Hint]:
        """New hints after the last record (usually none)."""
        if not records:
            return []
        epoch = int(records[-1].get("epoch", len(records) - 1))
        out = []
        for name in NAMES:
            if name not in self.enabled or name in self.given:
                continue
            message = _CHECKS[name](records, self.facts)
            if message:
                self.given.add(name)
                out.append(Hint(name, epoch, message))
        return out


def _get(record: Mapping[str, Any], key: str) -> float | None:
    """The record's finite number under ``key``, else None."""
    value = record.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _values(records: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    return [value for value in (_get(r, key) for r in records) if value is not None]


def _lr(records: Sequence[Mapping[str, Any]], facts: RunFacts) -> str:
    losses = _values(records[:LR_EPOCHS], "loss")
    if len(records) < LR_EPOCHS or len(losses) < LR_EPOCHS:
        return ""
    first, last = losses[0], losses[-1]
    if last < first - abs(first) * LR_MIN_DROP:
        return ""
    lr = _get(records[LR_EPOCHS - 1], "lr")
    at = f" at lr={lr:g}" if lr is not None else ""
    use = (
        "and create your optimizer with lr=result.suggestion (fit's lr= does not reach an optimizer you built)"
        if facts.own_optimizer
        else "and pass fit(..., lr=result.suggestion)"
    )
    return (
        f"the training loss has not fallen over the first {LR_EPOCHS} epochs ({first:.4g} -> {last:.4g}){at}: "
        "the learning rate is probably too low, or too high. Find one with result = colabkit.lr_find(model, train) "
        f"{use}; check too that the labels match the inputs"
    )


def _overfitting(records: Sequence[Mapping[str, Any]], facts: RunFacts) -> str:
    # The gap must hold two epochs in a row: one epoch's gap on a small validation set is noise.
    fixes = "Add data augmentation or regularisation (dropout, weight_decay)"
    stop = "" if facts.early_stopping else ", or stop at the best epoch with fit(..., early_stopping=3)"
    last = records[-1]
    for key in last:
        if "accuracy" not in key or key.startswith("val_") or len(records) < 2:
            continue
        gaps = [_gap(record, key) for record in records[-2:]]
        if all(gap is not None and gap > ACCURACY_GAP for gap in gaps):
            value, val = last[key], last[f"val_{key}"]
            return (
                f"overfitting: {key} {value:.3f} vs val_{key} {val:.3f}, a {100 * (value - val):.0f}-point gap "
                f"(over {100 * ACCURACY_GAP:.0f} means the model memorises the training set). {fixes}, "
                f"more data{stop}"
            )
    recent = records[-3:]
    losses, val_losses = _values(recent, "loss"), _values(recent, "val_loss")
    if len(recent) == 3 and len(losses) == 3 and len(val_losses) == 3:
        rising = val_losses[0] < val_losses[1] < val_losses[2]
        if rising and losses[2] < losses[0]:
            return (
                f"overfitting: val_loss rose two epochs in a row ({val_losses[0]:.4g} -> {val_losses[2]:.4g}) while "
                f"the training loss fell, so the model starts to memorise the training set. {fixes}{stop}"
            )
    return ""


def _gap(record: Mapping[str, Any], key: str) -> float | None:
    value, val = _get(record, key), _get(record, f"val_{key}")
    return None if value is None or val is None else value - val


def _memory(records: Sequence[Mapping[str, Any]], facts: RunFacts) -> str:
    last = records[-1]
    peak, total = _get(last, MEMORY_KEYS[0]), _get(last, MEMORY_KEYS[1])
    if peak is None or total is None or total <= 0 or peak / total <= MEMORY_SHARE:
        return ""
    gib = 2**30
    batch = facts.batch_size
    if batch == 1:  # nothing left to halve
        fix = "Use a smaller model or shorter inputs, or mixed precision (precision='bf16' or 'fp16')"
    else:
        smaller = f"batch_size={batch // 2} (now {batch})" if batch else "half the batch size"
        fix = f"Use {smaller} and keep the effective batch with grad_accum={2 * facts.grad_accum}"
    return (
        f"peak GPU memory {_display.format_memory(peak * gib, total * gib)} ({100 * peak / total:.0f}%) is close to "
        f"full: a longer input or a bigger batch will run out of memory. {fix}"
    )


def _input(records: Sequence[Mapping[str, Any]], facts: RunFacts) -> str:
    last = records[-1]
    share = _get(last, DATA_WAIT)
    if share is None or share <= INPUT_SHARE or not _long_enough_to_time(last, facts):
        return ""
    fixes = _input_fixes(facts)
    if not fixes:
        return ""
    return (
        f"the training loop spent {100 * share:.0f}% of the epoch waiting for the next batch: loading data is the "
        f"bottleneck, not the model. {fixes}"
    )


def _long_enough_to_time(record: Mapping[str, Any], facts: RunFacts) -> bool:
    """Whether the epoch had the batches and the seconds for its wait share to mean something."""
    if facts.batches_per_epoch is not None and facts.batches_per_epoch < INPUT_MIN_BATCHES:
        return False
    seconds = _get(record, "time")
    return seconds is None or seconds >= INPUT_MIN_SECONDS


def _input_fixes(facts: RunFacts) -> str:
    """What shortens the wait on the path that runs ("" when nothing left would)."""
    if facts.path == "fast":
        if facts.placement == "pinned":
            # The one cost left: each batch crosses from host memory to the GPU.
            return (
                "The tensors are in memory already but too big to keep on the GPU, so each batch is copied there "
                "from the host: store them smaller (uint8 images, float16 features) so they move to the GPU once"
            )
        # On the GPU a batch is an index there; on the CPU it is a copy in memory: nothing to fetch faster.
        return ""
    workers = facts.num_workers
    busy = workers is not None and facts.cpus is not None and workers >= facts.cpus
    fixes = []
    if workers is None:
        fixes.append("raise num_workers")
    elif not busy:
        cores = f", up to this machine's {facts.cpus} CPU cores" if facts.cpus else ""
        fixes.append(f"raise num_workers (now {workers}){cores}")
    if facts.tensors:  # in memory already: only the per-sample step is left to speed up
        fixes.append("do the per-sample work (decoding, transforms) once or on whole batches")
    else:
        fixes.append("stage the dataset to local disk with colabkit.stage() if it is read from Drive")
        fixes.append("load it into memory as tensors (a TensorDataset takes the in-memory fast path)")
    text = ", ".join(fixes[:-1]) + f", or {fixes[-1]}" if len(fixes) > 1 else fixes[0]
    if busy:
        return f"The {workers} workers use every CPU core already: {text}"
    return text[0].upper() + text[1:]


_CHECKS: dict[str, Callable[[Sequence[Mapping[str, Any]], RunFacts], str]] = {
    "lr": _lr,
    "overfitting": _overfitting,
    "memory": _memory,
    "input": _input,
}


class EpochClock:
    """An epoch's time on the host: the wait for each batch (timed around the loader) and the whole epoch.

    The first batch of an epoch is not counted as waiting: it includes starting the
    loader's workers, which more workers would not shorten.

    Args:
        clock: The loop's clock (seconds).
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.waited = 0.0
        self._first: float | None = None  # when the epoch's first batch arrived
        self._start: float | None = None  # when a whole epoch started (None: resumed inside it)
        self.epoch_seconds: list[float] = []  # wall time of this run's whole epochs

    def start(self, *, whole: bool) -> None:
        """An epoch starts (``whole``: from its first batch, not resumed inside it)."""
        self.waited, self._first = 0.0, None
        self._start = self._clock() if whole else None

    def timed(self, batches: Iterator[Any]) -> Iterator[Any]:
        """``batches``, timing the wait for each."""
        clock = self._clock
        while True:
            asked = clock()
            try:
                batch = next(batches)
            except StopIteration:
                return
            arrived = clock()
            if self._first is None:
                self._first = arrived
            else:
                self.waited += arrived - asked
            yield batch

    def wait_share(self) -> float | None:
        """Share of the epoch's training time (from the first batch on) spent waiting for batches."""
        if self._first is None:
            return None
        span = self._clock() - self._first
        return round(min(self.waited / span, 1.0), 3) if span > 0 else None

    def end(self) -> None:
        """The epoch is done (validated, saved): its wall time counts if it was whole."""
        if self._start is not None:
            self.epoch_seconds.append(self._clock() - self._start)
            self._start = None

    def seconds_per_epoch(self) -> float:
        """Mean wall time of this run's whole epochs (NaN before the first)."""
        times = self.epoch_seconds
        return sum(times) / len(times) if times else float("nan")


class FinishEstimate:
    """When the run will finish, against the session's end: said after the first epoch, again when it changes.

    Args:
        session_left: The session's time left (default :func:`colabkit.session_time_left`), None if unknown.
        platform: The platform's name for sentences (``"Colab"``).
        stops_at_session_end: ``time_limit="session"`` is on.
        resumable: A ``checkpoint_dir`` is set (a stopped run can continue).
        quiet_below: Without a known session end, runs that finish sooner than this (seconds) say nothing.
    """

    def __init__(
        self,
        *,
        session_left: Callable[[], timedelta | None] | None = None,
        platform: str = "",
        stops_at_session_end: bool = False,
        resumable: bool = False,
        quiet_below: float = 600.0,
    ) -> None:
        self._session_left = session_left if session_left is not None else _session_time_left
        self.platform = platform
        self.stops_at_session_end = stops_at_session_end
        self.resumable = resumable
        self.quiet_below = quiet_below
        self._said: tuple[bool, float] | None = None  # (fits the session, finish moment on the loop's clock)

    def check(self, *, epochs_left: float, seconds_per_epoch: float, now: float) -> str:
        """A message when the estimate is first known or changed materially, else ``""``.

        Args:
            epochs_left: Epochs still to train (fewer when ``max_steps`` ends the run sooner).
            seconds_per_epoch: Wall time of one epoch in this run (training, validation, saving).
            now: The loop's clock (seconds), to tell an unchanged estimate from a moved one.
        """
        if epochs_left <= 0 or not math.isfinite(seconds_per_epoch) or seconds_per_epoch <= 0:
            return ""
        needed = epochs_left * seconds_per_epoch
        session = self._session_left()
        session_seconds = None if session is None else session.total_seconds()
        fits = session_seconds is None or needed <= session_seconds
        finish_at = now + needed
        if self._said is not None:
            # Material: the verdict flipped, or the finish moved by over 5 min and a quarter of what is left.
            was_fitting, said_finish = self._said
            if fits == was_fitting and abs(finish_at - said_finish) <= max(300.0, 0.25 * needed):
                return ""
        elif session_seconds is None and needed < self.quiet_below:
            return ""
        self._said = (fits, finish_at)
        finish = f"the run finishes in {_display.format_about(needed)}"
        if session_seconds is None:
            return finish
        name = f"{self.platform} session" if self.platform else "session"
        ends = f"the {name} ends in {_display.format_about(session_seconds)}"
        if fits:
            return f"{finish}; {ends}"
        if self.stops_at_session_end:
            then = "the next session resumes" if self.resumable else "pass checkpoint_dir= (on Drive) to resume later"
            action = f"time_limit='session' stops it cleanly there and {then}"
        elif self.resumable:
            action = (
                "pass time_limit='session' so it stops cleanly with a checkpoint before then; rerunning the cell "
                "in the next session resumes"
            )
        else:
            action = (
                "pass checkpoint_dir= (on Drive) and time_limit='session' so it stops cleanly with a checkpoint "
                "and the next session resumes"
            )
        return f"the run will not finish before {ends} (it needs {_display.format_about(needed)} more): {action}"


def _session_time_left() -> timedelta | None:
    from colabkit.session import session_time_left

    return session_time_left()
