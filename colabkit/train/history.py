"""History: what fit() learned, one record per epoch.

Records hold plain numbers only (``epoch``, ``loss``, ``accuracy``,
``val_loss``, ``val_accuracy``, ``lr``, ``time``, ``samples_per_sec``,
``data_wait``, and on CUDA ``peak_gpu_gb`` / ``gpu_total_gb``), so a History
travels inside a checkpoint and a resumed run returns the epochs trained
before the interruption too, and the hints already given (``hints``).
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

from colabkit import _io, _plot
from colabkit.errors import ArgumentError

__all__ = ["History", "metric_mode"]

Record = dict[str, Any]

_NOT_PLOTTED = {"epoch", "lr", "time", "samples_per_sec", "step", "data_wait", "peak_gpu_gb", "gpu_total_gb"}


def metric_mode(monitor: str) -> str:
    """``"min"`` for losses and errors, ``"max"`` for everything else (accuracy, f1, ...)."""
    name = monitor.lower()
    lower_is_better = ("loss", "error", "mae", "mse", "rmse", "perplexity")
    return "min" if any(word in name for word in lower_is_better) else "max"


class History:
    """Per-epoch training records, returned by :func:`colabkit.fit`.

    Attributes:
        records: One dict per finished epoch.
        stop_reason: Why training stopped: ``"completed"``, ``"max_steps"``,
            ``"early_stopping"``, ``"callback"``, ``"time_limit"``, ``"interrupted"``
            (SIGTERM or a notebook interrupt), or ``""`` while running.
        hints: The warning signs fit() gave, each once: ``{"name", "epoch", "message"}``
            dicts (see :mod:`colabkit.train.hints`).

    Example:
        >>> history = History([{"epoch": 0, "loss": 0.9}, {"epoch": 1, "loss": 0.5}])
        >>> history["loss"]
        [0.9, 0.5]
        >>> history.best("loss")["epoch"]
        1
    """

    def __init__(self, records: Sequence[Record] = (), *, stop_reason: str = "", hints: Sequence[Record] = ()) -> None:
        self.records: list[Record] = [dict(record) for record in records]
        self.stop_reason = stop_reason
        self.hints: list[Record] = [dict(hint) for hint in hints]

    def append(self, record: Record) -> None:
        """Add the record of a finished epoch."""
        self.records.append(dict(record))

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def __getitem__(self, key: str | int) -> Any:
        """``history["val_loss"]`` is that column (None where an epoch lacks it); ``history[-1]`` a record."""
        if isinstance(key, int):
            return self.records[key]
        if key not in self.keys():
            raise KeyError(f"{key!r} is not in this History; it has {', '.join(self.keys()) or 'no records'}")
        return [record.get(key) for record in self.records]

    def keys(self) -> list[str]:
        """Column names, in the order they first appear."""
        seen: dict[str, None] = {}
        for record in self.records:
            seen.update(dict.fromkeys(record))
        return list(seen)

    @property
    def history(self) -> dict[str, list[Any]]:
        """Keras-style ``{column: [value per epoch]}``."""
        return {key: self[key] for key in self.keys()}

    def best(self, monitor: str = "val_loss", mode: str = "auto") -> Record:
        """The record with the best ``monitor`` value.

        Args:
            monitor: A column, e.g. ``"val_loss"`` or ``"val_accuracy"``.
            mode: ``"min"``, ``"max"`` or ``"auto"`` (min for losses and errors, else max).

        Returns:
            A copy of the best epoch's record.

        Raises:
            ArgumentError: ``monitor`` is not recorded, or ``mode`` is unknown.
        """
        mode = _check_mode(mode, monitor)
        candidates = [
            record
            for record in self.records
            if isinstance(record.get(monitor), (int, float)) and not _nan(record[monitor])
        ]
        if not candidates:
            raise ArgumentError(
                f"monitor={monitor!r} is not recorded in this History; "
                f"recorded columns: {', '.join(self.keys()) or 'none (no epoch finished yet)'}"
            )
        pick = min if mode == "min" else max
        return dict(pick(candidates, key=lambda record: record[monitor]))

    def to_csv(self, path: str | os.PathLike[str] | None = None) -> str:
        """The records as CSV text; also written atomically to ``path`` when given.

        Returns:
            The CSV text (header line plus one line per epoch).
        """
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.keys(), lineterminator="\n")
        writer.writeheader()
        for record in self.records:
            writer.writerow(record)
        text = buffer.getvalue()
        if path is not None:
            _io.atomic_write_bytes(path, text.encode(), durable=False)
        return text

    def plot(self, metrics: Sequence[str] | None = None, *, figsize: tuple[float, float] | None = None) -> Any:
        """Loss and metric curves, train vs validation, one panel per quantity.

        Args:
            metrics: Base names to draw (``["loss", "accuracy"]``); default: every recorded one.
            figsize: Figure size in inches.

        Returns:
            The matplotlib Figure. In a notebook it is shown once, as the cell's result
            (the figure is closed so the inline backend does not draw it a second time);
            in a script call ``plt.show()`` or ``fig.savefig(...)``.

        Raises:
            MissingDependencyError: matplotlib is not installed.
            ArgumentError: a requested metric is not recorded.
        """
        plt = _plot.pyplot("History.plot()")
        bases = self._bases()
        if metrics is not None:
            unknown = [name for name in metrics if name not in bases]
            if unknown:
                raise ArgumentError(
                    f"metrics={list(metrics)!r}: {', '.join(unknown)} not recorded; recorded: {', '.join(bases)}"
                )
            bases = list(metrics)
        count = max(len(bases), 1)
        _, axes = plt.subplots(1, count, figsize=figsize or (5 * count, 3.5), squeeze=False)
        epochs = [record.get("epoch", index) + 1 for index, record in enumerate(self.records)]
        for ax, base in zip(axes[0], bases, strict=False):
            for key, label in ((base, "train"), (f"val_{base}", "val")):
                if key in self.keys():
                    points = [(e, v) for e, v in zip(epochs, self[key], strict=True) if isinstance(v, (int, float))]
                    if points:
                        ax.plot(*zip(*points, strict=True), marker="o", label=label)
            ax.set_title(base)
            ax.set_xlabel("epoch")
            _plot.whole_numbers(ax)
            ax.legend()
        return _plot.finish(axes[0][0], None, created=True)

    def _bases(self) -> list[str]:
        bases: dict[str, None] = {}
        for key in self.keys():
            if key in _NOT_PLOTTED:
                continue
            bases[key[4:] if key.startswith("val_") else key] = None
        return list(bases)

    def state_dict(self) -> dict[str, Any]:
        """Plain data for a checkpoint."""
        return {
            "records": [dict(record) for record in self.records],
            "stop_reason": self.stop_reason,
            "hints": [dict(hint) for hint in self.hints],
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> History:
        return cls(
            state.get("records", ()), stop_reason=str(state.get("stop_reason", "")), hints=state.get("hints", ())
        )

    def __repr__(self) -> str:
        if not self.records:
            return f"History(no epochs, stop_reason={self.stop_reason!r})"
        last = ", ".join(f"{key}={_fmt(value)}" for key, value in self.records[-1].items())
        return f"History({len(self.records)} epochs, stop_reason={self.stop_reason!r}, last: {last})"


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _nan(value: float) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _check_mode(mode: str, monitor: str) -> str:
    if mode == "auto":
        return metric_mode(monitor)
    if mode not in ("min", "max"):
        raise ArgumentError(f"mode={mode!r} must be 'min', 'max' or 'auto'")
    return mode
