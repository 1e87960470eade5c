"""When fit() reads values back from the device, stops and saves: every such decision, on one clock.

At each optimizer step boundary the loop asks :class:`Cadence`:

* :meth:`~Cadence.read_due`: read the buffered losses (NaN check, progress) every
  :data:`~colabkit.train.progress.REFRESH_SECONDS` with a progress bar, :data:`QUIET_CHECK_SECONDS`
  without, or when :data:`MAX_BUFFER` values wait;
* :meth:`~Cadence.after_step`: stop (a signal, a callback's request, ``max_steps``, ``time_limit``)
  and save (``save_every`` steps or duration). With DDP the ranks vote every :data:`AGREE_EVERY`
  steps, so all stop and save at the same step;
* :meth:`~Cadence.after_epoch`: at an epoch's end, which saves once, with the epoch's metrics.

The clock is handed in (``fit``'s ``loop._clock``, which tests replace); ``time_limit``'s
reserve is :class:`~colabkit.train.budget.TimeBudget`'s.
"""

from __future__ import annotations

from collections.abc import Callable

from colabkit._signals import SignalFlag
from colabkit.train.budget import TimeBudget
from colabkit.train.options import FitOptions
from colabkit.train.progress import REFRESH_SECONDS

__all__ = ["AGREE_EVERY", "MAX_BUFFER", "QUIET_CHECK_SECONDS", "Cadence", "Vote"]

#: Without a progress bar, losses are still checked for NaN this often.
QUIET_CHECK_SECONDS = 2.0
#: Buffered per-step values before they are summed on the device (bounds memory, no read).
MAX_BUFFER = 512
#: With DDP, ranks agree on signals / time limits every this many optimizer steps.
AGREE_EVERY = 8

#: With DDP: each flag true on any rank (a collective every rank calls at the same step).
Vote = Callable[[list[bool]], list[bool]]


class Cadence:
    """The read, stop and save decisions of one fit() call.

    Args:
        options: fit()'s checked arguments (``max_steps``, ``save_every``, ``time_limit``, ``epochs``).
        clock: Seconds, monotonic.
        quiet: No progress bar: read only for the NaN check.
        save_guess: What a save costs until one is timed (``time_limit``'s reserve).
        vote: With DDP, how the ranks agree; None for one process.
    """

    def __init__(
        self,
        options: FitOptions,
        *,
        clock: Callable[[], float],
        quiet: bool,
        save_guess: float,
        vote: Vote | None = None,
    ) -> None:
        o = self.o = options
        self.clock = clock
        self.vote = vote
        self.budget = TimeBudget(o.time_limit_seconds, save_guess)
        self.signal = SignalFlag()  # save_on_signal's flag while the run runs
        self.read_every = QUIET_CHECK_SECONDS if quiet else REFRESH_SECONDS
        # Whether some stop or save condition must be looked at after every step (else only
        # at an epoch's end, a signal or a callback's request): keeps the usual step cheap.
        self.every_step = (
            o.time_limit_seconds is not None
            or o.save_seconds is not None
            or o.save_steps is not None
            or o.max_steps is not None
            or vote is not None
        )
        self.next_read = 0.0
        self.last_save = 0.0
        self.saved_step = -1  # the step of the newest checkpoint this call wrote
        self.stop_after_epoch = ""  # a stop asked at an epoch's last step waits for its validation and save
        self.save_after_epoch = False

    def start(self) -> None:
        now = self.clock()
        self.budget.start(now)
        self.last_save = now

    def start_epoch(self) -> float:
        now = self.clock()
        self.budget.epoch_started(now)
        self.next_read = now + self.read_every
        return now

    def read_due(self, now: float, buffered: int) -> bool:
        return now >= self.next_read or buffered >= MAX_BUFFER

    def was_read(self, now: float) -> None:
        self.next_read = now + self.read_every

    def after_step(self, now: float, step: int, *, epoch_ends: bool, asked: str) -> tuple[str, bool]:
        """After optimizer step ``step``: ``(stop reason or "", save now)``; ``asked`` is a callback's stop reason."""
        if not (epoch_ends or self.every_step or self.signal.requested or asked):
            return "", False  # the usual step: nothing to decide
        o = self.o
        # Local wishes first; with DDP all ranks must agree, so they vote every few steps.
        reason = "interrupted" if self.signal.requested else asked
        if not reason and self.budget.expired(now):
            reason = "time_limit"
        timed_save = o.save_seconds is not None and now - self.last_save >= o.save_seconds
        if self.vote is not None:
            if step % AGREE_EVERY and not epoch_ends:
                reason, timed_save = "", False
            else:
                stop, timed_save = self.vote([bool(reason), timed_save])
                reason = (reason or "interrupted") if stop else ""
        if o.max_steps is not None and step >= o.max_steps:
            reason = reason or "max_steps"
        self.budget.step_ended(now)
        save_due = (o.save_steps is not None and step % o.save_steps == 0) or timed_save
        if epoch_ends:
            # The epoch's end saves (after validation) instead: one checkpoint, with the epoch's metrics.
            self.stop_after_epoch, self.save_after_epoch = reason, save_due
            return reason, False
        return reason, save_due and not reason

    def validated(self, seconds: float) -> None:
        self.budget.val_cost = seconds

    def after_epoch(self, *, asked: str, epochs_done: int) -> tuple[str, bool]:
        """At an epoch's end, validated: ``(stop reason or "", save now)``."""
        reason = self.stop_after_epoch or asked
        if self.vote is not None:
            reason = (reason or "callback") if self.vote([bool(reason)])[0] else ""
        save = self.o.save_epoch or self.save_after_epoch or bool(reason) or epochs_done >= self.o.epochs
        self.stop_after_epoch, self.save_after_epoch = "", False
        return reason, save

    def finished(self, epoch: int, step: int) -> str:
        """Why a run at ``epoch`` and ``step`` has nothing left to train ("" while it has)."""
        if self.o.max_steps is not None and step >= self.o.max_steps:
            return "max_steps"
        return "completed" if epoch >= self.o.epochs else ""

    def saved(self, step: int, started: float) -> float:
        """A save of ``step`` that began at ``started`` returned; returns the clock's reading."""
        self.saved_step = step
        self.last_save = self.clock()
        self.budget.saved(self.last_save - started)
        return self.last_save

    @property
    def times_flush(self) -> bool:
        """Whether this save should wait for its commit and copies to time them (once, ``time_limit`` only)."""
        return self.budget.times_flush

    def flushed(self, since: float) -> None:
        self.budget.flushed(self.clock() - since)
