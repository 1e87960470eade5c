"""fit()'s arguments checked and normalised before anything touches the model, the data or the disk."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from colabkit import _notify
from colabkit.errors import ArgumentError
from colabkit.train.batches import check_loss_fn
from colabkit.train.callbacks import EarlyStopping
from colabkit.train.compiling import parse_compile
from colabkit.train.hints import resolve_hints
from colabkit.train.layout import check_channels_last
from colabkit.train.metrics import resolve_metrics

__all__ = [
    "SESSION_MARGIN",
    "FitOptions",
    "check_model",
    "is_int",
    "parse_duration",
    "parse_time_limit",
]

#: time_limit="session" stops this long before the platform's estimated end of session.
SESSION_MARGIN = timedelta(minutes=10)


def parse_duration(value: str | float | timedelta, *, argument: str) -> float:
    """Seconds in ``"2h30m"``, ``"90min"``, ``"45s"``, ``"1.5h"``, a number of seconds or a timedelta.

    Raises:
        ArgumentError: The value is not a positive duration.
    """
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        if re.fullmatch(r"\d+(\.\d+)?", text):
            seconds = float(text)
        else:
            parts = re.findall(r"(\d+(?:\.\d+)?)(d|h|m|s)[a-z]*", text)
            rebuilt = "".join(re.findall(r"\d+(?:\.\d+)?(?:d|h|m|s)[a-z]*", text))
            units = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
            if not parts or rebuilt != text or not _valid_units(text):
                raise ArgumentError(
                    f"{argument}={value!r} is not a duration; use e.g. '2h30m', '90min', '45s' or a number of seconds"
                )
            seconds = sum(float(number) * units[unit] for number, unit in parts)
    else:
        raise ArgumentError(f"{argument}={value!r} is not a duration; use e.g. '2h30m' or a number of seconds")
    if not seconds > 0 or math.isinf(seconds):
        raise ArgumentError(f"{argument}={value!r} must be a positive duration, e.g. '2h30m'")
    return seconds


_UNIT_WORDS = {"d", "day", "days", "h", "hr", "hrs", "hour", "hours", "m", "min", "mins", "minute", "minutes"}
_UNIT_WORDS |= {"s", "sec", "secs", "second", "seconds"}


def _valid_units(text: str) -> bool:
    return all(word in _UNIT_WORDS for word in re.findall(r"[a-z]+", text))


@dataclasses.dataclass
class FitOptions:
    """fit()'s keyword arguments, checked and normalised when made: nothing here has touched the
    model, the data or the disk. Each field is the fit() argument of that name (see :func:`colabkit.fit`).

    ``optimizer``, ``scheduler``, ``device``, ``precision``, ``batch_size`` and ``num_workers`` are
    checked where the model, the device or the data they need is known.
    """

    epochs: int
    max_steps: int | None
    optimizer: Any
    lr: float
    loss_fn: Callable[..., torch.Tensor] | None
    scheduler: Any
    metrics: Any
    device: str | torch.device
    precision: str
    grad_accum: int
    clip_grad_norm: float | None
    batch_size: int | None
    num_workers: int | str
    checkpoint_dir: Any
    resume: bool
    takeover: bool
    save_every: str | int
    keep_last: int
    monitor: str
    early_stopping: Any
    time_limit: Any
    callbacks: Any
    progress: bool
    hints: Any
    seed: int | None
    compile: Any  # after checking: the mode name, or None (see colabkit.train.compiling)
    channels_last: bool | str
    has_val: dataclasses.InitVar[bool] = False

    # Derived from the arguments above in __post_init__.
    metric_fns: list[tuple[str, Callable[..., Any]]] = dataclasses.field(init=False)
    directory: Path | None = dataclasses.field(init=False)
    save_steps: int | None = dataclasses.field(init=False)
    save_seconds: float | None = dataclasses.field(init=False)
    save_epoch: bool = dataclasses.field(init=False)
    callback_list: list[Any] = dataclasses.field(init=False)
    time_limit_seconds: float | None = dataclasses.field(init=False)
    session_time: bool = dataclasses.field(init=False)
    hint_names: frozenset[str] = dataclasses.field(init=False)

    @classmethod
    def of(cls, arguments: dict[str, Any], *, has_val: bool) -> FitOptions:
        """The options among fit()'s ``locals()`` (every field by its name), checked."""
        names = [field.name for field in dataclasses.fields(cls) if field.init]
        return cls(**{name: arguments[name] for name in names}, has_val=has_val)

    def __post_init__(self, has_val: bool) -> None:
        _at_least("epochs", self.epochs, 1, "e.g. epochs=10")
        if self.max_steps is not None:
            _at_least("max_steps", self.max_steps, 1, "or None")
        self.lr = _positive("lr", self.lr, "e.g. lr=1e-3")
        check_loss_fn(self.loss_fn)
        self.metric_fns = resolve_metrics(self.metrics)
        _at_least("grad_accum", self.grad_accum, 1, "(1 = step after every batch), e.g. grad_accum=4")
        if self.clip_grad_norm is not None:
            self.clip_grad_norm = _positive("clip_grad_norm", self.clip_grad_norm, "or None, e.g. 1.0")
        self.directory = None if self.checkpoint_dir is None else Path(self.checkpoint_dir).expanduser()
        self.resume = bool(self.resume)
        self.takeover = bool(self.takeover)
        self.save_steps, self.save_seconds, self.save_epoch = _parse_save_every(self.save_every)
        _at_least("keep_last", self.keep_last, 1, "e.g. keep_last=2")
        if not isinstance(self.monitor, str) or not self.monitor:
            raise ArgumentError(f"monitor={self.monitor!r} must be a record column such as 'val_loss'")
        if not has_val and self.monitor.startswith("val_"):
            self.monitor = self.monitor[4:]  # no validation set: rank by the training value
        self.callback_list = _callbacks(self.callbacks, self.early_stopping, self.monitor)
        self.time_limit_seconds = parse_time_limit(self.time_limit)
        self.session_time = isinstance(self.time_limit, str) and self.time_limit == "session"
        self.progress = bool(self.progress)
        self.hint_names = resolve_hints(self.hints)
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2**32):
            raise ArgumentError(f"seed={self.seed!r} must be None or an integer between 0 and 2**32 - 1, e.g. seed=42")
        self.compile = parse_compile(self.compile)
        self.channels_last = check_channels_last(self.channels_last)


def _at_least(name: str, value: Any, low: int, example: str) -> None:
    if not is_int(value) or value < low:
        raise ArgumentError(f"{name}={value!r} must be an integer >= {low} {example}")


def _positive(name: str, value: Any, example: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ArgumentError(f"{name}={value!r} must be a positive number {example}")
    return float(value)


def _callbacks(callbacks: Any, early_stopping: Any, monitor: str) -> list[Any]:
    """The callbacks, with the EarlyStopping that ``early_stopping`` asks for appended."""
    chosen = list(callbacks) if callbacks is not None else []
    for callback in chosen:
        if isinstance(callback, type):
            raise ArgumentError(
                f"callbacks holds the class {callback.__name__}; pass an instance: {callback.__name__}()"
            )
    if early_stopping is None:
        return chosen
    if isinstance(early_stopping, EarlyStopping):
        return [*chosen, early_stopping]
    if is_int(early_stopping) and early_stopping >= 1:
        return [*chosen, EarlyStopping(monitor, patience=early_stopping)]
    raise ArgumentError(f"early_stopping={early_stopping!r} must be a patience (int >= 1) or EarlyStopping(...)")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_model(model: Any) -> torch.nn.Module:
    if not isinstance(model, torch.nn.Module):
        raise ArgumentError(
            f"model is a {type(model).__name__}, not a torch.nn.Module; pass the network itself, "
            "e.g. model=torch.nn.Sequential(...)"
        )
    return model


def _parse_save_every(value: Any) -> tuple[int | None, float | None, bool]:
    if value == "epoch":
        return None, None, True
    if is_int(value):
        if value < 1:
            raise ArgumentError(f"save_every={value!r} must be >= 1 optimizer steps")
        return int(value), None, False
    if isinstance(value, (str, timedelta)):
        return None, parse_duration(value, argument="save_every"), False
    raise ArgumentError(
        f"save_every={value!r} must be 'epoch', a number of optimizer steps (e.g. 500) or a duration (e.g. '10min')"
    )


def parse_time_limit(value: Any) -> float | None:
    if value is None:
        return None
    if value == "session":
        from colabkit.session import session_time_left

        left = session_time_left()
        if left is None:
            _notify.warn_once(
                "time-limit-session",
                "time_limit='session' has no effect here: this is neither Colab nor Kaggle "
                "(set COLABKIT_SESSION_HOURS to give the session a length)",
            )
            return None
        return max((left - SESSION_MARGIN).total_seconds(), 0.0)
    return parse_duration(value, argument="time_limit")
