"""What fit() tells the user while it trains: the table of epochs, the live bar, notices, hints and the finish.

:class:`Reporter` owns every word fit() says: the start notice of the data path, the table and the
bar (:class:`~colabkit.train.progress.Bars`), the warning signs (:class:`~colabkit.train.hints.Advisor`,
each once, kept in the History), when the run will finish against the session's end
(:class:`~colabkit.train.hints.FinishEstimate`), the session's 30 / 10 minutes warnings
(:class:`~colabkit.session.SessionWatch`) and ``history.csv``. It decides nothing about training.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from colabkit import _io, _notify, drive
from colabkit.runtime import runtime
from colabkit.session import SessionWatch
from colabkit.train.callbacks import EarlyStopping
from colabkit.train.datapath import Batches
from colabkit.train.hints import DATA_WAIT, Advisor, EpochClock, FinishEstimate, RunFacts
from colabkit.train.history import History
from colabkit.train.metrics import Totals
from colabkit.train.options import FitOptions
from colabkit.train.progress import MEMORY_KEYS, Bars
from colabkit.train.state import TrainPosition

__all__ = ["Reporter", "peak_memory"]


class Reporter:
    """The notices, progress and hints of one fit() call.

    Args:
        options: fit()'s checked arguments (``progress``, ``hints``, ``epochs``, ``time_limit``, ...).
        clock: The loop's clock (seconds).
        is_main: Rank 0 (other ranks say nothing).
    """

    def __init__(self, options: FitOptions, *, clock: Callable[[], float], is_main: bool) -> None:
        o = self.o = options
        self.quiet = not (o.progress and is_main)
        self.bars = Bars(not self.quiet)  # the table of epochs and the live bar
        self.epoch_clock = EpochClock(clock)  # the wait for batches, the epochs' wall time
        self.watch = SessionWatch() if o.session_time and is_main else None  # 30 / 10 minutes left
        self.finish = None if self.quiet else _finish_estimate(o)  # the finish against the session's end
        self.advisor = Advisor(())
        self.data_notice = ""
        self.is_main = is_main

    def say(self, message: str) -> None:
        _notify.logger.info(message)
        if not self.quiet:
            _notify.say(message)

    def check_session(self) -> None:
        if self.watch is not None:
            for message in self.watch.check():
                _notify.warn(message)

    def place_data(self, train: Batches, val: Batches | None) -> None:
        """Place the data (the model is already on its device) and word the notice of the path it takes."""
        train.place()
        train_path = train.describe()
        self.data_notice = f"data: train on the {train_path}"
        if val is not None:
            val.place()
            val_path = val.describe()
            self.data_notice += "; val too" if val_path == train_path else f", val on the {val_path}"  # said once

    def say_data(self) -> None:
        self.say(self.data_notice)

    def watch_for(self, history: History, train: Batches) -> None:
        """The warning signs to give, once each: not those a resumed run's History says were given.

        The facts say what the run already does (its data path, workers, optimizer), so that the
        advice never asks for what is done already; ``train`` is placed by :meth:`place_data` first.
        """
        o = self.o
        self.advisor = Advisor(
            o.hint_names,
            given=[str(hint.get("name")) for hint in history.hints],
            facts=RunFacts(
                batch_size=train.batch_size,
                grad_accum=o.grad_accum,
                num_workers=train.workers,
                path="dataloader" if train.placement == "loader" else "fast",
                placement=train.placement,
                tensors=isinstance(getattr(train, "dataset", None), torch.utils.data.TensorDataset),
                batches_per_epoch=len(train) if train.has_length() else None,
                cpus=os.cpu_count(),
                own_optimizer=isinstance(o.optimizer, torch.optim.Optimizer),
                early_stopping=any(isinstance(cb, EarlyStopping) for cb in o.callback_list),
            ),
        )

    def start_epoch(self, epoch: int, total: int | None, done: int) -> None:
        """The bar of ``epoch`` of ``total`` batches, from batch ``done``; the epoch's clock starts."""
        self.epoch_clock.start(whole=not done)
        self.bars.start_epoch(epoch, self.o.epochs, total, done)

    def timed(self, batches: Iterator[Any]) -> Iterator[Any]:
        """``batches``, timing the wait for each (the "input" hint's measure)."""
        return self.epoch_clock.timed(batches)

    def steps(self, done: int, totals: Totals, seconds: float) -> None:
        """The live bar after ``done`` batches: running means and samples/s."""
        if self.quiet:
            return
        postfix = {key: value for key, value in totals.means("").items() if not math.isnan(value)}
        if seconds > 0:
            postfix["samples/s"] = totals.samples / seconds
        self.bars.steps(done, postfix)

    def wait_record(self) -> dict[str, float]:
        """The epoch's share of time spent waiting for batches, as a record column (when known)."""
        waited = self.epoch_clock.wait_share()
        return {} if waited is None else {DATA_WAIT: waited}

    def end_epoch(self, record: Mapping[str, Any], history: History) -> None:
        """The epoch's row in the table, and the hints its record shows (kept with the History)."""
        self.bars.end_epoch(record)
        for hint in self.advisor.check(history.records):
            history.hints.append(hint.state_dict())  # saved with the History: not repeated after a resume
            self.bars.note(hint.name, f"hint: {hint.message}")

    def say_finish(self, pos: TrainPosition, *, epoch_length: int | None, now: float) -> None:
        """After each epoch, validated and saved: when the run will end, against the session's end."""
        self.epoch_clock.end()
        if self.finish is None:
            return
        o = self.o
        left: float = o.epochs - pos.epoch
        if o.max_steps is not None and epoch_length:
            left = min(left, (o.max_steps - pos.step) * o.grad_accum / epoch_length)
        seconds = self.epoch_clock.seconds_per_epoch()
        message = self.finish.check(epochs_left=left, seconds_per_epoch=seconds, now=now)
        if message:
            self.bars.note("finish", message)

    def stopped(self, reason: str, *, step: int, signal: str | None, resumable: bool) -> None:
        if reason == "interrupted":
            self.say(
                f"stopped by {signal} at step {step}; "
                + ("checkpoint saved, rerun to continue" if resumable else "returning the history so far")
            )
        elif reason == "time_limit":
            self.say(f"time_limit reached at step {step}; checkpoint saved, rerun to continue")

    def write_history(self, history: History) -> None:
        """history.csv beside the checkpoints; on Drive a lost connection (errno 107) is remounted here."""
        if not self.is_main or self.o.directory is None:
            return
        path = self.o.directory / "history.csv"

        def write() -> None:
            # On Drive the folder may not exist yet: the mirror creates it with its first copy, in the background.
            path.parent.mkdir(parents=True, exist_ok=True)
            history.to_csv(path)

        try:
            drive.drive_retry(write)
        except OSError as exc:
            if not _io.is_transient(exc):
                raise
            # The checkpoints hold the history too; a flaky Drive must not end the run.
            _notify.warn(f"could not write {path} ({exc}); the checkpoints keep the history, training goes on")


def _finish_estimate(o: FitOptions) -> FinishEstimate:
    return FinishEstimate(
        platform={"colab": "Colab", "kaggle": "Kaggle"}.get(runtime().kind, ""),
        stops_at_session_end=o.session_time,
        resumable=o.directory is not None,
    )


def peak_memory(device: torch.device) -> dict[str, float]:
    """This epoch's peak GPU memory and the device's total, in GB (CUDA only).

    The caching allocator keeps these numbers on the host: reading them does not wait for the GPU.
    Reserved, not allocated, memory: what the process holds, as nvidia-smi and Colab show it.
    """
    if device.type != "cuda":
        return {}
    total = torch.cuda.get_device_properties(device).total_memory
    return {
        MEMORY_KEYS[0]: round(torch.cuda.max_memory_reserved(device) / 2**30, 2),
        MEMORY_KEYS[1]: round(total / 2**30, 2),
    }
