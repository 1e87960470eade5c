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
from colabkit.train.callbacks import EarlyStopping
from colabkit.train.hints import resolve_hints
from colabkit.train.metrics import resolve_metrics

__all__ = [
    "SESSION_MARGIN",
    "FitOptions",
    "check_loss_fn",
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
    """fit()'s arguments after checking: nothing here has touched the model, the data or the disk."""

    model: torch.nn.Module
    epochs: int
    max_steps: int | None
    lr: float
    loss_fn: Callable[..., torch.Tensor] | None
    metrics: list[tuple[str, Callable[..., Any]]]
    grad_accum: int
    clip_grad_norm: float | None
    checkpoint_dir: Path | None
    resume: bool
    save_steps: int | None
    save_seconds: float | None
    save_epoch: bool
    keep_last: int
    monitor: str
    callbacks: list[Any]
    time_limit: float | None
    session_time: bool
    progress: bool
    hints: frozenset[str]
    seed: int | None
    compile: bool
    channels_last: bool

    @classmethod
    def check(
        cls,
        *,
        model: Any,
        epochs: Any,
        max_steps: Any,
        lr: Any,
        loss_fn: Any,
        metrics: Any,
        grad_accum: Any,
        clip_grad_norm: Any,
        checkpoint_dir: Any,
        resume: Any,
        save_every: Any,
        keep_last: Any,
        monitor: Any,
        early_stopping: Any,
        time_limit: Any,
        callbacks: Any,
        progress: Any,
        hints: Any,
        seed: Any,
        compile: Any,
        channels_last: Any,
        has_val: bool,
    ) -> FitOptions:
        model = check_model(model)
        if not is_int(epochs) or epochs < 1:
            raise ArgumentError(f"epochs={epochs!r} must be an integer >= 1, e.g. epochs=10")
        if max_steps is not None and (not is_int(max_steps) or max_steps < 1):
            raise ArgumentError(f"max_steps={max_steps!r} must be None or an integer >= 1")
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
            raise ArgumentError(f"lr={lr!r} must be a positive number, e.g. lr=1e-3")
        check_loss_fn(loss_fn)
        if not is_int(grad_accum) or grad_accum < 1:
            raise ArgumentError(
                f"grad_accum={grad_accum!r} must be an integer >= 1 (1 = step after every batch), e.g. grad_accum=4"
            )
        if clip_grad_norm is not None and (
            not isinstance(clip_grad_norm, (int, float)) or isinstance(clip_grad_norm, bool) or not clip_grad_norm > 0
        ):
            raise ArgumentError(f"clip_grad_norm={clip_grad_norm!r} must be None or a positive number, e.g. 1.0")
        save_steps, save_seconds, save_epoch = _parse_save_every(save_every)
        if not is_int(keep_last) or keep_last < 1:
            raise ArgumentError(f"keep_last={keep_last!r} must be an integer >= 1")
        if not isinstance(monitor, str) or not monitor:
            raise ArgumentError(f"monitor={monitor!r} must be a record column such as 'val_loss'")
        if seed is not None and (not is_int(seed) or not 0 <= seed < 2**32):
            raise ArgumentError(f"seed={seed!r} must be None or an integer between 0 and 2**32 - 1, e.g. seed=42")
        metric_fns = resolve_metrics(metrics)
        if not has_val and monitor.startswith("val_"):
            monitor = monitor[4:]  # no validation set: rank by the training value
        the_callbacks = list(callbacks) if callbacks is not None else []
        for callback in the_callbacks:
            if isinstance(callback, type):
                raise ArgumentError(
                    f"callbacks holds the class {callback.__name__}; pass an instance: {callback.__name__}()"
                )
        if early_stopping is not None:
            if isinstance(early_stopping, EarlyStopping):
                the_callbacks.append(early_stopping)
            elif is_int(early_stopping) and early_stopping >= 1:
                the_callbacks.append(EarlyStopping(monitor, patience=early_stopping))
            else:
                raise ArgumentError(
                    f"early_stopping={early_stopping!r} must be a patience (int >= 1) or EarlyStopping(...)"
                )
        return cls(
            model=model,
            epochs=int(epochs),
            max_steps=max_steps,
            lr=float(lr),
            loss_fn=loss_fn,
            metrics=metric_fns,
            grad_accum=int(grad_accum),
            clip_grad_norm=None if clip_grad_norm is None else float(clip_grad_norm),
            checkpoint_dir=None if checkpoint_dir is None else Path(checkpoint_dir).expanduser(),
            resume=bool(resume),
            save_steps=save_steps,
            save_seconds=save_seconds,
            save_epoch=save_epoch,
            keep_last=int(keep_last),
            monitor=monitor,
            callbacks=the_callbacks,
            time_limit=parse_time_limit(time_limit),
            session_time=isinstance(time_limit, str) and time_limit == "session",
            progress=bool(progress),
            hints=resolve_hints(hints),
            seed=seed,
            compile=bool(compile),
            channels_last=bool(channels_last),
        )


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_loss_fn(loss_fn: Any) -> Any:
    if loss_fn is not None and not callable(loss_fn):
        raise ArgumentError(f"loss_fn={loss_fn!r} must be callable, e.g. loss_fn=torch.nn.CrossEntropyLoss()")
    return loss_fn


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
