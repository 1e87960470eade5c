"""Callbacks: small hooks into fit(), and the two built in (EarlyStopping, CSVLogger).

A callback is any object with some of the methods of :class:`Callback`; each
receives the :class:`FitContext`, and any of them may end training with
``ctx.stop("why")``. ``on_step_end`` runs after every optimizer step, so it
is only called on callbacks that define it, and ``ctx.loss`` there is a
tensor on the device: reading it (``.item()``) waits for the GPU, which is
the caller's choice to make.

Callbacks with state that must survive a resume (EarlyStopping's best value
and patience counter) return it from ``state_dict()``; it is stored in the
checkpoint as plain data.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import torch

from colabkit import _notify
from colabkit.errors import ArgumentError
from colabkit.train.history import History, metric_mode

__all__ = ["CSVLogger", "Callback", "EarlyStopping", "FitContext"]


@dataclasses.dataclass
class FitContext:
    """What callbacks see of a running fit().

    Attributes:
        model: The model being trained (unwrapped from DDP / torch.compile).
        optimizer: Its optimizer.
        scheduler: The LR scheduler, if any.
        history: Records of the finished epochs.
        epochs: Epochs asked for.
        epoch: Current epoch (0-based).
        step: Optimizer steps taken so far.
        batch: Batches consumed in the current epoch.
        logs: At ``on_epoch_end``, the epoch's record (loss, metrics, val_*, lr, time).
        loss: At ``on_step_end``, the last micro-batch's loss as a device tensor.
        checkpoint_dir: Where checkpoints go, or None.
        is_main: True on the process that saves and logs (rank 0).
        monitored: Names the epoch records will hold (to validate a callback's ``monitor``).
        stop_reason: Set by :meth:`stop`; training ends at the next step boundary.
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any = None
    history: History = dataclasses.field(default_factory=History)
    epochs: int = 1
    epoch: int = 0
    step: int = 0
    batch: int = 0
    logs: dict[str, Any] = dataclasses.field(default_factory=dict)
    loss: torch.Tensor | None = None
    checkpoint_dir: Path | None = None
    is_main: bool = True
    monitored: tuple[str, ...] = ()
    stop_reason: str = ""

    def stop(self, reason: str = "callback") -> None:
        """Ask fit() to stop after the current step (it saves a checkpoint first)."""
        self.stop_reason = reason or "callback"

    @property
    def stop_requested(self) -> bool:
        return bool(self.stop_reason)


class Callback:
    """Base class for fit() callbacks; override the hooks you need.

    Example:
        >>> class PrintLR(Callback):
        ...     def on_epoch_end(self, ctx):
        ...         print(ctx.epoch, ctx.logs["lr"])
    """

    def on_fit_start(self, ctx: FitContext) -> None:
        """Before the first step (after any resume)."""

    def on_epoch_start(self, ctx: FitContext) -> None:
        """At the start of every epoch (also the resumed, partly done one)."""

    def on_step_end(self, ctx: FitContext) -> None:
        """After every optimizer step; keep it cheap."""

    def on_epoch_end(self, ctx: FitContext) -> None:
        """After each epoch's validation; ``ctx.logs`` holds the epoch's record."""

    def on_fit_end(self, ctx: FitContext) -> None:
        """When training ends for any reason other than an error."""

    def state_dict(self) -> dict[str, Any]:
        """State to keep across a resume (plain numbers, strings, lists, dicts)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved for ``patience`` epochs.

    Args:
        monitor: Record column to watch, e.g. ``"val_loss"`` or ``"val_accuracy"``.
        patience: Epochs without improvement before stopping.
        mode: ``"min"``, ``"max"`` or ``"auto"`` (min for losses and errors).
        min_delta: Smallest change that counts as an improvement.
        restore_best_weights: Put the best epoch's weights back into the model when stopping
            (kept in memory; after a resume, only epochs since the resume are candidates).

    Example:
        >>> stopper = EarlyStopping("val_accuracy", patience=5)
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        patience: int = 3,
        *,
        mode: str = "auto",
        min_delta: float = 0.0,
        restore_best_weights: bool = False,
    ) -> None:
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ArgumentError(f"patience={patience!r} must be an integer >= 1, e.g. EarlyStopping(patience=3)")
        if mode not in ("auto", "min", "max"):
            raise ArgumentError(f"mode={mode!r} must be 'min', 'max' or 'auto'")
        if min_delta < 0:
            raise ArgumentError(f"min_delta={min_delta!r} must be >= 0")
        self.monitor = monitor
        self.patience = patience
        self.mode = metric_mode(monitor) if mode == "auto" else mode
        self.min_delta = float(min_delta)
        self.restore_best_weights = restore_best_weights
        self.best: float | None = None
        self.best_epoch = -1
        self.wait = 0
        self._best_weights: dict[str, torch.Tensor] | None = None

    def on_fit_start(self, ctx: FitContext) -> None:
        if ctx.monitored and self.monitor not in ctx.monitored:
            hint = " (pass val= to fit)" if self.monitor.startswith("val_") else ""
            raise ArgumentError(
                f"EarlyStopping(monitor={self.monitor!r}) watches a value fit() does not record{hint}; "
                f"recorded: {', '.join(ctx.monitored)}"
            )

    def _improved(self, value: float) -> bool:
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def on_epoch_end(self, ctx: FitContext) -> None:
        value = ctx.logs.get(self.monitor)
        if not isinstance(value, (int, float)) or math.isnan(value):
            return
        if self._improved(float(value)):
            self.best, self.best_epoch, self.wait = float(value), ctx.epoch, 0
            if self.restore_best_weights:
                self._best_weights = {k: v.detach().to("cpu", copy=True) for k, v in ctx.model.state_dict().items()}
            return
        self.wait += 1
        if self.wait >= self.patience:
            if ctx.is_main:
                _notify.logger.info(
                    "early stopping: %s has not improved for %d epochs (best %.6g at epoch %d)",
                    self.monitor,
                    self.wait,
                    self.best,
                    self.best_epoch + 1,
                )
            if self._best_weights is not None:
                ctx.model.load_state_dict(self._best_weights)
            ctx.stop("early_stopping")

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "wait": self.wait}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state.get("best")
        self.best_epoch = int(state.get("best_epoch", -1))
        self.wait = int(state.get("wait", 0))


class CSVLogger(Callback):
    """Write the History as CSV after every epoch (rewritten whole, atomically, so a resume never duplicates rows).

    Args:
        path: The CSV file.

    Example:
        >>> logger = CSVLogger("/content/drive/MyDrive/run1/log.csv")
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def on_epoch_end(self, ctx: FitContext) -> None:
        if ctx.is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            ctx.history.to_csv(self.path)
