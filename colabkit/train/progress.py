"""What fit(), evaluate() and predict() show while they run: a table of epochs that stays, and one live bar.

In a notebook the table is one HTML output replaced in place (one display
handle), with notes (hints, the finish estimate) under it; in a terminal or
a log each epoch is one plain line and each note a line. One live bar shows
the current epoch (step, loss, ETA); validation runs in the same bar. A
resumed run's table starts with the epochs of its History. Every output goes
through :mod:`colabkit.display`, so no notebook ever gets escape codes.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

from colabkit import _notify
from colabkit import display as _display

__all__ = ["MEMORY_KEYS", "NOT_SHOWN", "REFRESH_SECONDS", "Bars", "EpochTable"]

#: Progress and log reads happen at most this often (each read waits for the GPU once).
REFRESH_SECONDS = 0.5

#: Record keys of the GPU memory columns: peak reserved this epoch, and the device's total (GB, 2**30 bytes).
MEMORY_KEYS = ("peak_gpu_gb", "gpu_total_gb")
#: Record keys that have their own column (or none) instead of a metric column.
NOT_SHOWN = {"epoch", "lr", "time", "samples_per_sec", "step", "data_wait", *MEMORY_KEYS}


class EpochTable:
    """The rows of finished epochs, shown as an HTML table (notebooks) or aligned text.

    Args:
        epochs: The run's total epochs (rows read "3/10").
        records: Rows to start with (a resumed run's History).
    """

    def __init__(self, epochs: int, records: Sequence[Mapping[str, Any]] = ()) -> None:
        self.epochs = epochs
        self.records: list[dict[str, Any]] = [dict(r) for r in records]
        self.notes: dict[str, str] = {}

    def columns(self) -> list[tuple[str, str]]:
        """``(record key, header)`` pairs: epoch, train metrics, val metrics, lr, time, speed, memory."""
        seen: dict[str, None] = {}
        for record in self.records:
            seen.update(dict.fromkeys(k for k, v in record.items() if k not in NOT_SHOWN and _number(v) is not None))
        train = [k for k in seen if not k.startswith("val_")]
        val = [k for k in seen if k.startswith("val_")]
        columns = [("epoch", "epoch"), *((k, k) for k in train), *((k, k) for k in val)]
        for key, header in (("lr", "lr"), ("time", "time"), ("samples_per_sec", "samples/s")):
            if any(key in r for r in self.records):
                columns.append((key, header))
        if any(MEMORY_KEYS[0] in r for r in self.records):
            columns.append((MEMORY_KEYS[0], "GPU memory"))
        return columns

    def cell(self, record: Mapping[str, Any], key: str) -> str:
        """One value, formatted for people."""
        if key == "epoch":
            epoch = record.get("epoch")
            return f"{epoch + 1}/{self.epochs}" if isinstance(epoch, int) else ""
        value = _number(record.get(key))
        if value is None:
            return ""
        if key == "lr":
            return f"{value:.3g}"
        if key == "time":
            return _display.format_duration(value)
        if key == "samples_per_sec":
            return _display.format_count(value)
        if key == MEMORY_KEYS[0]:
            total = _number(record.get(MEMORY_KEYS[1]))
            gib = 2**30
            return _display.format_memory(value * gib, None if total is None else total * gib)
        return _display.format_value(value)

    def line(self, record: Mapping[str, Any]) -> str:
        """The epoch as one plain line (terminals and logs)."""
        parts = []
        for key, header in self.columns():
            text = self.cell(record, key)
            if not text:
                continue
            if key == "epoch":
                parts.append(f"epoch {text}")
            elif key == "samples_per_sec":
                parts.append(f"{text} samples/s")
            elif key == MEMORY_KEYS[0]:
                parts.append(f"GPU {text}")
            else:
                parts.append(f"{header} {text}")
        return "  ".join(parts)

    def _repr_html_(self) -> str:
        if not self.records and not self.notes:
            return "<div></div>"
        parts = []
        if self.records:
            columns = self.columns()
            head = "".join(f"<th>{html.escape(header)}</th>" for _, header in columns)
            rows = "".join(
                "<tr>" + "".join(f"<td>{html.escape(self.cell(r, key))}</td>" for key, _ in columns) + "</tr>"
                for r in self.records
            )
            parts.append(
                '<table class="colabkit-epochs" style="text-align:right;font-variant-numeric:tabular-nums">'
                f"<thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
            )
        parts.extend(f'<p style="margin:4px 0">{html.escape(note)}</p>' for note in self.notes.values())
        return "".join(parts)

    def __repr__(self) -> str:
        lines = []
        if self.records:
            columns = self.columns()
            grid = [[header for _, header in columns]]
            grid += [[self.cell(r, key) for key, _ in columns] for r in self.records]
            widths = [max(len(row[i]) for row in grid) for i in range(len(columns))]
            lines = ["  ".join(text.rjust(width) for text, width in zip(row, widths, strict=True)) for row in grid]
        lines.extend(self.notes.values())
        return "\n".join(lines)


class Bars:
    """fit()'s table and live bar, or evaluate()'s / predict()'s bar, on the current screen.

    Args:
        enabled: False shows nothing (every method becomes a no-op).
        screen: Where to show (default: :func:`colabkit.display.screen` at creation).
    """

    def __init__(self, enabled: bool, *, screen: _display.Screen | None = None) -> None:
        self.enabled = enabled
        self.screen = screen if screen is not None or not enabled else _display.screen()
        self.table: EpochTable | None = None
        self._handle: _display.Handle | None = None
        self._bar: _display.Bar | None = None
        self._epoch_desc = ""
        self._in_fit = False

    def __enter__(self) -> Bars:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- fit

    def start_fit(self, epochs: int, done: int, *, history: Sequence[Mapping[str, Any]] = ()) -> None:
        """Start the table with the epochs a resumed run already has (``history``: its records)."""
        self._in_fit = True
        if not self.enabled:
            return
        assert self.screen is not None
        self.table = EpochTable(epochs, history)
        if self.screen.notebook:
            self._handle = self.screen.show(self.table)  # first, so the table sits above the bar
        else:
            for record in self.table.records:
                self.screen.line(self.table.line(record))

    def start_epoch(self, epoch: int, epochs: int, total: int | None, done: int) -> None:
        """The live bar restarts for ``epoch`` (0-based), at batch ``done`` after a mid-epoch resume."""
        self._epoch_desc = f"epoch {epoch + 1}/{epochs}"
        self._restart(total, self._epoch_desc, done, unit="batch")

    def steps(self, done: int, postfix: Mapping[str, float]) -> None:
        """The bar at batch ``done``, with the running loss, metrics and speed."""
        if self._bar is not None:
            self._bar.set(done, note=_postfix(postfix))

    def end_epoch(self, record: Mapping[str, Any]) -> None:
        """Add the finished epoch's History record as a row."""
        if self.table is None:
            return
        self.table.records.append(dict(record))
        self._redraw_table(self.table.line(record))

    def note(self, key: str, text: str) -> None:
        """A notice about the run (a hint, the finish estimate): under the table, replacing an older one of ``key``."""
        _notify.logger.info("%s", text)
        if self.table is None:
            if self.enabled and self.screen is not None:
                self.screen.line(f"colabkit: {text}")
            return
        if self.table.notes.get(key) == text:
            return
        self.table.notes[key] = text
        self._redraw_table(f"colabkit: {text}")

    # -- evaluation (inside fit: the epoch's bar; alone: a bar of its own)

    def start_eval(self, desc: str, total: int | None) -> None:
        """A validation or evaluation pass of ``total`` batches starts."""
        label = f"{self._epoch_desc} {desc}" if self._in_fit and self._epoch_desc else desc
        self._restart(total, label, 0, unit="batch")

    def eval_step(self) -> None:
        """One more batch evaluated."""
        if self._bar is not None:
            self._bar.update(1)

    def end_eval(self) -> None:
        """The pass ended; outside fit its bar goes away."""
        if not self._in_fit and self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        """Remove the live bar; the table stays."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # -- helpers

    def _restart(self, total: int | None, desc: str, done: int, *, unit: str) -> None:
        if not self.enabled:
            return
        if self._bar is None:
            self._bar = _display.bar(total, desc=desc, unit=unit, initial=done, on=self.screen)
        else:
            self._bar.restart(total, desc=desc, done=done)

    def _redraw_table(self, line: str) -> None:
        assert self.table is not None and self.screen is not None
        if self._handle is not None:
            self._handle.update(self.table)
        else:
            self.screen.line(line)


def _postfix(values: Mapping[str, float]) -> str:
    parts = []
    for key, value in values.items():
        if key == "samples/s":
            parts.append(f"{_display.format_count(value)} samples/s")
        else:
            parts.append(f"{key} {_display.format_value(value)}")
    return " · ".join(parts)


def _number(value: Any) -> float | None:
    """``value`` as a float if it is a number (NaN included: it shows as "nan"), else None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isinf(value):
        return float(value)
    return None
