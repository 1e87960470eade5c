"""fit(), evaluate() and predict(): the training loop, readable top to bottom.

One optimizer step, in order: take ``grad_accum`` batches from the loader;
for each, move it to the device, cut it into micro-batches if an earlier
out-of-memory error asked for that, run forward and loss under autocast,
backward (through the GradScaler for fp16); clip, step, zero the gradients,
step a per-step scheduler. Then, at this step boundary only: callbacks,
progress (at most every 0.5 s), the stop checks (signal, callback,
``max_steps``, ``time_limit``) and the save checks. Nothing in a step reads a
value back from the GPU: losses and metrics stay on the device in a list and
are read in one go when progress, a save or the epoch's end needs them.

Resume: the checkpoint holds model, optimizer, scheduler and scaler states,
the position (epoch, batches done in the epoch, optimizer steps), the run
seed, the partial epoch's sums, the History, callback states and every RNG
state. The data order of an epoch depends only on ``(seed, epoch)`` (see
:mod:`colabkit.train.state`), so the loader skips the finished batches
without loading them; the RNG states are restored after that, right before
the first new batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from colabkit import _notify
from colabkit import device as _device
from colabkit.errors import (
    ArgumentError,
    CheckpointMismatchError,
    ColabkitError,
    NonFiniteLossError,
)
from colabkit.train import distributed as _dist
from colabkit.train.callbacks import Callback, EarlyStopping, FitContext
from colabkit.train.history import History, metric_mode
from colabkit.train.oom import Backoff, batch_length, is_out_of_memory, split_batch
from colabkit.train.precision import Precision, resolve_precision
from colabkit.train.state import TrainPosition, default_workers, make_resumable

__all__ = ["evaluate", "fit", "parse_duration", "predict"]

#: The clock every time decision reads (progress, time_limit, time-based saves): the seam tests replace.
_clock: Callable[[], float] = time.monotonic

#: Progress and log reads happen at most this often (each read waits for the GPU once).
REFRESH_SECONDS = 0.5
#: Without a progress bar, losses are still checked for NaN this often.
QUIET_CHECK_SECONDS = 2.0
#: Buffered per-step values before they are summed on the device (bounds memory, no read).
MAX_BUFFER = 512
#: With DDP, ranks agree on signals / time limits every this many optimizer steps.
AGREE_EVERY = 8
#: time_limit="session" stops this long before the platform's estimated end of session.
SESSION_MARGIN = timedelta(minutes=10)

_TARGET_KEYS = ("labels", "label", "targets", "target", "y")
_CHECKPOINT_VERSION = 1


# --------------------------------------------------------------------------- public API


def fit(
    model: torch.nn.Module,
    train: Any,
    val: Any = None,
    *,
    epochs: int = 1,
    max_steps: int | None = None,
    optimizer: Any = None,
    lr: float = 1e-3,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    scheduler: Any = None,
    metrics: Sequence[str | Callable[..., Any]] = ("accuracy",),
    device: str | torch.device = "auto",
    precision: str = "auto",
    grad_accum: int = 1,
    clip_grad_norm: float | None = None,
    batch_size: int | None = None,
    num_workers: int | str = "auto",
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    save_every: str | int = "epoch",
    keep_last: int = 2,
    monitor: str = "val_loss",
    early_stopping: int | EarlyStopping | None = None,
    time_limit: str | float | timedelta | None = None,
    callbacks: Iterable[Any] = (),
    progress: bool = True,
    seed: int | None = None,
    compile: bool = False,
    channels_last: bool = False,
) -> History:
    """Train ``model`` on ``train``; resumes by itself from ``checkpoint_dir``.

    Rerunning the same cell after a disconnect continues exactly where the
    last checkpoint left off (mid-epoch included). SIGTERM and a notebook
    interrupt save at the next step boundary and return the History so far;
    a second interrupt stops at once.

    Args:
        model: The ``torch.nn.Module`` to train (moved to ``device``).
        train: A Dataset or DataLoader of ``(inputs, targets)`` batches (or dicts with a
            ``"labels"``/``"target"``/``"y"`` key). A DataLoader keeps its options;
            colabkit swaps in a resumable sampler.
        val: Validation Dataset or DataLoader, evaluated after every epoch.
        epochs: Number of epochs.
        max_steps: Stop after this many optimizer steps in total (across resumes).
        optimizer: An optimizer for ``model``'s parameters, or a factory called with the
            parameters (e.g. ``torch.optim.SGD`` gets ``lr=lr``); default AdamW at ``lr``.
        lr: Learning rate of the default optimizer or of a factory.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``; default cross-entropy for integer labels.
        scheduler: An LR scheduler, a factory ``f(optimizer)``, or ``(scheduler, "step" | "epoch")``.
            Without the tuple, OneCycleLR, CyclicLR and LambdaLR step every optimizer step, others
            every epoch (ReduceLROnPlateau with ``monitor``).
        metrics: Names (``"accuracy"``, ``"top5_accuracy"``, ``"mae"``, ``"mse"``) or callables
            ``f(outputs, targets) -> batch mean``.
        device: ``"auto"`` (best working accelerator) or a device.
        precision: ``"auto"`` (bf16 on Ampere+, fp16 with GradScaler on T4/P100, fp32 on CPU),
            ``"fp32"``, ``"fp16"`` or ``"bf16"``.
        grad_accum: Batches whose gradients add up before each optimizer step.
        clip_grad_norm: Clip the gradients' global norm to this value.
        batch_size: Batch size when ``train``/``val`` are Datasets (default 32).
        num_workers: DataLoader workers for Datasets (``"auto"``: 0 for in-memory tensors, else up to 4).
        checkpoint_dir: Folder for checkpoints (and ``history.csv``); enables resume.
        resume: Continue from the newest valid checkpoint in ``checkpoint_dir``.
        save_every: ``"epoch"``, a number of optimizer steps, or a duration such as ``"10min"``.
        keep_last: Checkpoints to keep (the best one by ``monitor`` is kept as well).
        monitor: Record column that ranks checkpoints and drives ReduceLROnPlateau
            (``"loss"`` is used when there is no ``val``).
        early_stopping: Patience in epochs, or an :class:`EarlyStopping`.
        time_limit: Stop cleanly, with a checkpoint, before this much time passes in this call:
            ``"2h30m"``, seconds, a timedelta, or ``"session"`` (the runtime's remaining
            session time minus 10 minutes).
        callbacks: :class:`Callback` objects (or anything with some of its methods).
        progress: Show tqdm progress bars and notices; False prints nothing.
        seed: Seed for python, numpy and torch, data order and augmentation; saved in the
            checkpoint (without it, one is derived from torch's initial seed).
        compile: Run the model through ``torch.compile``.
        channels_last: Use channels-last memory format for the model and 4-D inputs.

    Returns:
        The :class:`History` of all epochs, including those before a resume.

    Raises:
        ArgumentError: An argument is unusable (detected before the first step where possible).
        CheckpointMismatchError: ``checkpoint_dir`` holds another model's checkpoints.
        NonFiniteLossError: The loss became NaN or infinite.
        OutOfMemoryBackoffError: Out of memory even with a micro-batch of one sample.

    Example:
        >>> history = colabkit.fit(model, train_set, val_set, epochs=10,
        ...                        checkpoint_dir="/content/drive/MyDrive/run1")  # doctest: +SKIP
        >>> history.plot()  # doctest: +SKIP
    """
    options = _Options.check(
        model=model,
        epochs=epochs,
        max_steps=max_steps,
        lr=lr,
        loss_fn=loss_fn,
        metrics=metrics,
        grad_accum=grad_accum,
        clip_grad_norm=clip_grad_norm,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        save_every=save_every,
        keep_last=keep_last,
        monitor=monitor,
        early_stopping=early_stopping,
        time_limit=time_limit,
        callbacks=callbacks,
        progress=progress,
        seed=seed,
        compile=compile,
        channels_last=channels_last,
        has_val=val is not None,
    )
    trainer = _Trainer(
        options,
        model=model,
        train=train,
        val=val,
        optimizer=optimizer,
        scheduler=scheduler,
        device=device,
        precision=precision,
        batch_size=batch_size,
        num_workers=num_workers,
    )
    return trainer.run()


def evaluate(
    model: torch.nn.Module,
    data: Any,
    *,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    metrics: Sequence[str | Callable[..., Any]] = ("accuracy",),
    device: str | torch.device = "auto",
    precision: str = "auto",
    batch_size: int | None = None,
    num_workers: int | str = "auto",
    progress: bool = True,
) -> dict[str, float]:
    """Loss and metrics of ``model`` on ``data``, without gradients.

    Args:
        model: The model (put in eval mode for the call, then back).
        data: A Dataset or DataLoader of ``(inputs, targets)``.
        loss_fn: As in :func:`fit`; default cross-entropy for integer labels.
        metrics: As in :func:`fit`.
        device: ``"auto"`` keeps the model where its parameters are.
        precision: As in :func:`fit`.
        batch_size: For a Dataset (default 32).
        num_workers: For a Dataset.
        progress: Show a progress bar.

    Returns:
        ``{"loss": ..., "accuracy": ...}``.

    Example:
        >>> colabkit.evaluate(model, test_set)  # doctest: +SKIP
        {'loss': 0.31, 'accuracy': 0.91}
    """
    model = _check_model(model)
    metric_fns = _resolve_metrics(metrics)
    if loss_fn is not None and not callable(loss_fn):
        raise ArgumentError(f"loss_fn={loss_fn!r} must be callable, e.g. loss_fn=torch.nn.CrossEntropyLoss()")
    where = _model_device(model, device)
    policy = resolve_precision(precision, where)
    model.to(where)
    loader = _eval_loader(data, batch_size=batch_size, num_workers=num_workers, argument="data", where=where)
    losses = _LossFn(loss_fn)
    with _eval_mode(model), _Bars(progress) as bars:
        totals = _run_eval(model, loader, where, policy, losses, metric_fns, bars, "evaluate")
    assert totals is not None  # no stop condition given
    return totals.means("")


def predict(
    model: torch.nn.Module,
    data: Any,
    *,
    device: str | torch.device = "auto",
    precision: str = "auto",
    batch_size: int | None = None,
    num_workers: int | str = "auto",
    progress: bool = True,
) -> Any:
    """``model``'s outputs for every sample of ``data``, concatenated on the CPU.

    Batches may be inputs alone or ``(inputs, targets)`` (targets are ignored).

    Args:
        model: The model (eval mode for the call).
        data: A Dataset, DataLoader or tensor of inputs.
        device: ``"auto"`` keeps the model where its parameters are.
        precision: As in :func:`fit`.
        batch_size: For a Dataset or tensor (default 32).
        num_workers: For a Dataset.
        progress: Show a progress bar.

    Returns:
        A tensor (or a tuple / dict of tensors, matching what the model returns).

    Example:
        >>> logits = colabkit.predict(model, test_set)  # doctest: +SKIP
        >>> labels = logits.argmax(1)  # doctest: +SKIP
    """
    model = _check_model(model)
    where = _model_device(model, device)
    policy = resolve_precision(precision, where)
    model.to(where)
    if isinstance(data, torch.Tensor):
        data = torch.utils.data.TensorDataset(data)
    loader = _eval_loader(data, batch_size=batch_size, num_workers=num_workers, argument="data", where=where)
    outputs: list[Any] = []
    with _eval_mode(model), torch.no_grad(), _Bars(progress) as bars:
        bars.start_eval("predict", _safe_len(loader))
        for batch in loader:
            batch = _device.to_device(batch, where) if where.type != "cpu" else batch
            inputs = _inputs_only(batch)
            with policy.autocast():
                out = _call(model, inputs)
            outputs.append(_detach_to_cpu(out))
            bars.eval_step()
        bars.end_eval()
    if not outputs:
        raise ArgumentError("data is empty (0 batches); nothing to predict")
    return _concat(outputs)


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


# --------------------------------------------------------------------------- options


@dataclasses.dataclass
class _Options:
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
    progress: bool
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
        seed: Any,
        compile: Any,
        channels_last: Any,
        has_val: bool,
    ) -> _Options:
        model = _check_model(model)
        if not _is_int(epochs) or epochs < 1:
            raise ArgumentError(f"epochs={epochs!r} must be an integer >= 1, e.g. epochs=10")
        if max_steps is not None and (not _is_int(max_steps) or max_steps < 1):
            raise ArgumentError(f"max_steps={max_steps!r} must be None or an integer >= 1")
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr > 0:
            raise ArgumentError(f"lr={lr!r} must be a positive number, e.g. lr=1e-3")
        if loss_fn is not None and not callable(loss_fn):
            raise ArgumentError(f"loss_fn={loss_fn!r} must be callable, e.g. loss_fn=torch.nn.CrossEntropyLoss()")
        if not _is_int(grad_accum) or grad_accum < 1:
            raise ArgumentError(
                f"grad_accum={grad_accum!r} must be an integer >= 1 (1 = step after every batch), e.g. grad_accum=4"
            )
        if clip_grad_norm is not None and (
            not isinstance(clip_grad_norm, (int, float)) or isinstance(clip_grad_norm, bool) or not clip_grad_norm > 0
        ):
            raise ArgumentError(f"clip_grad_norm={clip_grad_norm!r} must be None or a positive number, e.g. 1.0")
        save_steps, save_seconds, save_epoch = _parse_save_every(save_every)
        if not _is_int(keep_last) or keep_last < 1:
            raise ArgumentError(f"keep_last={keep_last!r} must be an integer >= 1")
        if not isinstance(monitor, str) or not monitor:
            raise ArgumentError(f"monitor={monitor!r} must be a record column such as 'val_loss'")
        if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**32):
            raise ArgumentError(f"seed={seed!r} must be None or an integer between 0 and 2**32 - 1, e.g. seed=42")
        metric_fns = _resolve_metrics(metrics)
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
            elif _is_int(early_stopping) and early_stopping >= 1:
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
            time_limit=_parse_time_limit(time_limit),
            progress=bool(progress),
            seed=seed,
            compile=bool(compile),
            channels_last=bool(channels_last),
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_model(model: Any) -> torch.nn.Module:
    if not isinstance(model, torch.nn.Module):
        raise ArgumentError(
            f"model is a {type(model).__name__}, not a torch.nn.Module; pass the network itself, "
            "e.g. model=torch.nn.Sequential(...)"
        )
    return model


def _parse_save_every(value: Any) -> tuple[int | None, float | None, bool]:
    if value == "epoch":
        return None, None, True
    if _is_int(value):
        if value < 1:
            raise ArgumentError(f"save_every={value!r} must be >= 1 optimizer steps")
        return int(value), None, False
    if isinstance(value, (str, timedelta)):
        return None, parse_duration(value, argument="save_every"), False
    raise ArgumentError(
        f"save_every={value!r} must be 'epoch', a number of optimizer steps (e.g. 500) or a duration (e.g. '10min')"
    )


def _parse_time_limit(value: Any) -> float | None:
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


# --------------------------------------------------------------------------- losses and metrics


class _LossFn:
    """The user's loss, or cross-entropy chosen on the first batch, with the first-batch checks."""

    def __init__(self, fn: Callable[..., torch.Tensor] | None) -> None:
        self.fn = fn
        self.checked = False

    def __call__(self, output: Any, target: Any) -> torch.Tensor:
        if self.fn is not None:
            return self.fn(output, target)
        return F.cross_entropy(output, target.long() if target.dtype != torch.long else target)

    def check(self, output: Any, target: Any) -> None:
        """Explain bad labels / losses in words before they turn into an opaque error or a silent bug."""
        if self.fn is None:
            _check_cross_entropy_inputs(output, target)
        try:
            loss = self(output, target)
        except (RuntimeError, ValueError, IndexError, TypeError) as exc:
            name = "loss_fn" if self.fn is not None else "the default cross-entropy loss"
            raise ArgumentError(
                f"{name} failed on the first batch (outputs {_describe(output)}, targets {_describe(target)}): "
                f"{str(exc).strip()[:300]} -- check the labels' dtype and shape, or pass a matching loss_fn"
            ) from exc
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ArgumentError(f"loss_fn returned {_describe(loss)}, not a scalar; reduce it, e.g. return loss.mean()")
        if not loss.requires_grad and torch.is_grad_enabled():
            raise ArgumentError(
                "the loss does not depend on any trainable parameter (requires_grad=False); "
                "check that loss_fn uses the model's outputs and that the parameters are not frozen"
            )
        self.checked = True


def _check_cross_entropy_inputs(output: Any, target: Any) -> None:
    if not isinstance(output, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise ArgumentError(
            f"the default cross-entropy loss needs tensor outputs and labels, got {_describe(output)} and "
            f"{_describe(target)}; pass loss_fn=..."
        )
    if target.is_floating_point():
        raise ArgumentError(
            f"labels are {_describe(target)} but loss_fn=None means cross-entropy, which needs integer class "
            "indices (torch.long); convert the labels with .long(), or for regression pass "
            "loss_fn=torch.nn.MSELoss() (binary / multi-label: torch.nn.BCEWithLogitsLoss())"
        )
    if output.dim() < 2 or target.dim() != output.dim() - 1 or target.shape[0] != output.shape[0]:
        raise ArgumentError(
            f"labels {_describe(target)} do not fit outputs {_describe(output)} for cross-entropy: expected one "
            "class index per sample (labels of shape [batch] for outputs [batch, classes]); "
            "pass a matching loss_fn or fix the dataset's labels"
        )
    low, high = (int(v) for v in torch.stack([target.min(), target.max()]).tolist())
    classes = output.shape[1]
    if low < 0 or high >= classes:
        raise ArgumentError(
            f"labels range from {low} to {high} but the model outputs {classes} classes "
            f"(valid labels: 0..{classes - 1}); make the last layer's size the number of classes, or relabel"
        )


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).replace('torch.', '')} tensor of shape {list(value.shape)}"
    return f"a {type(value).__name__}"


def _accuracy(output: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, int]:
    # One score per class, or one logit per sample (binary).
    predicted = output.argmax(-1) if output.dim() == target.dim() + 1 else (output > 0).to(target.dtype)
    return (predicted == target).sum(), target.numel()


def _top5(output: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, int]:
    top = output.topk(min(5, output.shape[-1]), dim=-1).indices
    return (top == target.unsqueeze(-1)).any(-1).sum(), target.numel()


def _mae(output: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, int]:
    return (output.float() - target.float()).abs().sum(), target.numel()


def _mse(output: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, int]:
    return (output.float() - target.float()).square().sum(), target.numel()


_METRICS: dict[str, Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, int]]] = {
    "accuracy": _accuracy,
    "acc": _accuracy,
    "top5_accuracy": _top5,
    "top5": _top5,
    "mae": _mae,
    "mse": _mse,
}


class _UserMetric:
    """A user metric ``f(outputs, targets) -> batch mean``, turned into (sum, count)."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def __call__(self, output: Any, target: Any) -> tuple[Any, int]:
        count = batch_length(target) or 1
        value = self.fn(output, target)
        if isinstance(value, torch.Tensor):
            return value.detach().float() * count, count
        return torch.tensor(float(value) * count), count


def _resolve_metrics(metrics: Any) -> list[tuple[str, Callable[..., Any]]]:
    if metrics is None:
        return []
    if isinstance(metrics, str) or callable(metrics):
        metrics = [metrics]
    resolved = []
    for metric in metrics:
        if isinstance(metric, str):
            fn = _METRICS.get(metric.lower())
            if fn is None:
                raise ArgumentError(
                    f"metrics: {metric!r} is unknown; use {', '.join(sorted(set(_METRICS) - {'acc', 'top5'}))} "
                    "or a function f(outputs, targets) -> batch mean"
                )
            name = {"acc": "accuracy", "top5": "top5_accuracy"}.get(metric.lower(), metric.lower())
            resolved.append((name, fn))
        elif callable(metric):
            resolved.append((getattr(metric, "__name__", "metric"), _UserMetric(metric)))
        else:
            raise ArgumentError(f"metrics: {metric!r} is neither a metric name nor a function")
    names = [name for name, _ in resolved]
    if len(set(names)) != len(names):
        raise ArgumentError(f"metrics={names!r} names a metric twice")
    return resolved


# --------------------------------------------------------------------------- batches


def _split(batch: Any) -> tuple[Any, Any]:
    """(inputs, targets) of a training batch."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return (batch[0] if len(batch) == 2 else tuple(batch[:-1])), batch[-1]
    if isinstance(batch, Mapping):
        for key in _TARGET_KEYS:
            if key in batch:
                return {k: v for k, v in batch.items() if k != key}, batch[key]
        raise ArgumentError(
            f"a batch is a dict with keys {sorted(batch)} but none of {', '.join(_TARGET_KEYS)} holds the targets; "
            "name the label key 'labels' or pass a dataset of (inputs, targets)"
        )
    raise ArgumentError(
        f"a batch is {_describe(batch)}; training and evaluation need (inputs, targets) pairs "
        "(or dicts with a 'labels' key)"
    )


def _inputs_only(batch: Any) -> Any:
    if isinstance(batch, (tuple, list)):
        if len(batch) == 1:
            return batch[0]
        return _split(batch)[0]
    if isinstance(batch, Mapping):
        return {k: v for k, v in batch.items() if k not in _TARGET_KEYS}
    return batch


def _call(model: Any, inputs: Any) -> Any:
    if isinstance(inputs, tuple):
        return model(*inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


def _channels_last(inputs: Any) -> Any:
    if isinstance(inputs, torch.Tensor) and inputs.dim() == 4:
        return inputs.contiguous(memory_format=torch.channels_last)
    if isinstance(inputs, tuple):
        return tuple(_channels_last(x) for x in inputs)
    return inputs


def _detach_to_cpu(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.detach().to("cpu")
    if isinstance(out, Mapping):
        return {k: _detach_to_cpu(v) for k, v in out.items()}
    if isinstance(out, (tuple, list)):
        return type(out)(_detach_to_cpu(v) for v in out)
    return out


def _concat(outputs: list[Any]) -> Any:
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outputs)
    if isinstance(first, Mapping):
        return {k: _concat([o[k] for o in outputs]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(_concat([o[i] for o in outputs]) for i in range(len(first)))
    return outputs


def _safe_len(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


def _model_device(model: torch.nn.Module, device: str | torch.device) -> torch.device:
    if device == "auto":
        for parameter in model.parameters():
            return parameter.device
        return _device.get_device()
    return _device.get_device(device)


def _eval_loader(
    data: Any, *, batch_size: int | None, num_workers: int | str, argument: str, where: torch.device
) -> Any:
    if isinstance(data, torch.utils.data.DataLoader):
        return data
    if not isinstance(data, (torch.utils.data.Dataset, torch.utils.data.IterableDataset)) and not (
        hasattr(data, "__getitem__") and hasattr(data, "__len__")
    ):
        raise ArgumentError(f"{argument} is a {type(data).__name__}; pass a torch Dataset or DataLoader")
    map_style = isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset)
    if map_style and len(data) == 0:
        raise ArgumentError(f"{argument} is empty (0 samples); check the dataset's path or filtering")
    size = 32 if batch_size is None else batch_size
    if not _is_int(size) or size < 1:
        raise ArgumentError(f"batch_size={batch_size!r} must be a positive integer")
    if num_workers == "auto":
        workers = default_workers(data)
    elif _is_int(num_workers) and num_workers >= 0:  # type: ignore[operator]
        workers = int(num_workers)
    else:
        raise ArgumentError(f"num_workers={num_workers!r} must be 'auto' or an integer >= 0")
    return torch.utils.data.DataLoader(
        data,
        batch_size=size,
        shuffle=False,
        num_workers=workers,
        pin_memory=where.type == "cuda",
        generator=torch.Generator().manual_seed(0),  # do not draw worker seeds from the global RNG
    )


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------- running sums


class _Totals:
    """Sums of one epoch (or one evaluation), read from the device only when drained."""

    def __init__(self, metric_names: Sequence[str]) -> None:
        self.names = list(metric_names)
        self.loss_sum = 0.0
        self.samples = 0
        self.metric_sums = [0.0] * len(self.names)
        self.metric_counts = [0] * len(self.names)
        # Per micro-batch, not yet read: loss tensors, their sample counts, (step, epoch, batch) for errors.
        self.losses: list[torch.Tensor] = []
        self.weights: list[int] = []
        self.where: list[tuple[int, int, int]] = []
        self.metric_terms: list[list[Any]] = [[] for _ in self.names]
        self.pending_counts = [0] * len(self.names)

    def add(self, loss: torch.Tensor, samples: int, where: tuple[int, int, int]) -> None:
        self.losses.append(loss)
        self.weights.append(samples)
        self.where.append(where)

    def mark(self) -> tuple[int, list[int]]:
        return len(self.losses), [len(t) for t in self.metric_terms]

    def rollback(self, mark: tuple[int, list[int]]) -> None:
        """Forget values added after ``mark`` (a failed, retried step)."""
        size, metric_sizes = mark
        del self.losses[size:], self.weights[size:], self.where[size:]
        for terms, keep in zip(self.metric_terms, metric_sizes, strict=True):
            del terms[keep:]

    def drain(self, *, read: bool = True) -> tuple[int, int, int] | None:
        """Fold buffered values into the sums (one device read); returns where a non-finite loss first showed."""
        if not self.losses:
            return None
        parts = [torch.stack(self.losses).detach().float().flatten()]
        counts = []
        for index, terms in enumerate(self.metric_terms):
            if terms:
                parts.append(
                    torch.stack([t if isinstance(t, torch.Tensor) else torch.tensor(t) for t in terms])
                    .float()
                    .sum()
                    .reshape(1)
                    .to(parts[0].device)
                )
            counts.append(index if terms else -1)
        values = torch.cat(parts).tolist()
        n_losses = len(self.losses)
        losses, rest = values[:n_losses], values[n_losses:]
        bad = None
        for value, weight, where in zip(losses, self.weights, self.where, strict=True):
            if bad is None and not math.isfinite(value):
                bad = where
            self.loss_sum += value * weight  # a NaN stays visible in the mean
            self.samples += weight
        position = 0
        for index in counts:
            if index >= 0:
                self.metric_sums[index] += rest[position]
                self.metric_counts[index] += self.pending_counts[index]
                self.pending_counts[index] = 0
                position += 1
        self.losses.clear()
        self.weights.clear()
        self.where.clear()
        for terms in self.metric_terms:
            terms.clear()
        return bad

    def add_metric(self, index: int, value: Any, count: int) -> None:
        self.metric_terms[index].append(value)
        self.pending_counts[index] += count

    def means(self, prefix: str) -> dict[str, float]:
        out = {f"{prefix}loss": self.loss_sum / self.samples if self.samples else float("nan")}
        for name, total, count in zip(self.names, self.metric_sums, self.metric_counts, strict=True):
            out[f"{prefix}{name}"] = total / count if count else float("nan")
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "loss_sum": self.loss_sum,
            "samples": self.samples,
            "metric_sums": list(self.metric_sums),
            "metric_counts": list(self.metric_counts),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.loss_sum = float(state["loss_sum"])
        self.samples = int(state["samples"])
        if len(state["metric_sums"]) == len(self.names):
            self.metric_sums = [float(v) for v in state["metric_sums"]]
            self.metric_counts = [int(v) for v in state["metric_counts"]]


# --------------------------------------------------------------------------- progress


class _Bars:
    """tqdm.auto bars for epochs and steps, updated only when the loop reads values (throttled)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.epoch_bar: Any = None
        self.step_bar: Any = None
        self.eval_bar: Any = None
        self._shown = 0

    def __enter__(self) -> _Bars:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _tqdm(self, **kwargs: Any) -> Any:
        from tqdm.auto import tqdm

        kwargs.setdefault("mininterval", 0)  # the loop itself throttles step updates
        return tqdm(dynamic_ncols=True, **kwargs)

    def start_fit(self, epochs: int, done: int) -> None:
        if self.enabled:
            self.epoch_bar = self._tqdm(total=epochs, initial=done, desc="epochs", unit="epoch")

    def start_epoch(self, epoch: int, epochs: int, total: int | None, done: int) -> None:
        if self.enabled:
            self.step_bar = self._tqdm(
                total=total, initial=done, desc=f"epoch {epoch + 1}/{epochs}", unit="step", leave=False
            )
            self._shown = done

    def steps(self, done: int, postfix: Mapping[str, float]) -> None:
        if self.step_bar is not None:
            self.step_bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
            self.step_bar.update(done - self._shown)
            self._shown = done

    def end_epoch(self, record: Mapping[str, Any]) -> None:
        if self.step_bar is not None:
            self.step_bar.close()
            self.step_bar = None
        if self.epoch_bar is not None:
            shown = {k: f"{v:.4g}" for k, v in record.items() if k not in ("epoch", "time") and isinstance(v, float)}
            self.epoch_bar.set_postfix(shown, refresh=False)
            self.epoch_bar.update(1)

    def start_eval(self, desc: str, total: int | None) -> None:
        if self.enabled:
            self.eval_bar = self._tqdm(total=total, desc=desc, unit="batch", leave=False, mininterval=REFRESH_SECONDS)

    def eval_step(self) -> None:
        if self.eval_bar is not None:
            self.eval_bar.update(1)

    def end_eval(self) -> None:
        if self.eval_bar is not None:
            self.eval_bar.close()
            self.eval_bar = None

    def close(self) -> None:
        for bar in (self.eval_bar, self.step_bar, self.epoch_bar):
            if bar is not None:
                bar.close()
        self.eval_bar = self.step_bar = self.epoch_bar = None


def _run_eval(
    model: Any,
    loader: Any,
    where: torch.device,
    policy: Precision,
    loss_fn: _LossFn,
    metrics: Sequence[tuple[str, Callable[..., Any]]],
    bars: _Bars,
    desc: str,
    stop: Callable[[], bool] | None = None,
) -> _Totals | None:
    """Loss and metric sums over ``loader`` without gradients (shared by evaluate() and fit()'s validation).

    Returns None when ``stop()`` turned true before the end (an interrupt during validation).
    """
    totals = _Totals([name for name, _ in metrics])
    bars.start_eval(desc, _safe_len(loader))
    with torch.no_grad():
        for batch in loader:
            if stop is not None and stop():
                bars.end_eval()
                return None
            batch = _device.to_device(batch, where) if where.type != "cpu" else batch
            inputs, target = _split(batch)
            with policy.autocast():
                output = _call(model, inputs)
                if not loss_fn.checked:
                    loss_fn.check(output, target)
                loss = loss_fn(output, target)
            samples = batch_length(target) or 1
            totals.add(loss.detach(), samples, (0, 0, 0))
            for index, (_, fn) in enumerate(metrics):
                value, count = fn(output.detach(), target)
                totals.add_metric(index, value, count)
            if len(totals.losses) >= MAX_BUFFER:
                totals.drain()
            bars.eval_step()
    totals.drain()
    bars.end_eval()
    return totals


# --------------------------------------------------------------------------- the trainer


class _Trainer:
    """One fit() call: set up, resume, train epoch by epoch, save, report."""

    def __init__(
        self,
        options: _Options,
        *,
        model: torch.nn.Module,
        train: Any,
        val: Any,
        optimizer: Any,
        scheduler: Any,
        device: str | torch.device,
        precision: str,
        batch_size: int | None,
        num_workers: int | str,
    ) -> None:
        self.o = options
        self.model = model
        chosen = _device.get_device(None if device == "auto" else device)
        self.dist, self.device = _dist.setup(chosen)
        self.is_main = self.dist.is_main
        self.policy = resolve_precision(precision, self.device)
        self.quiet = not (options.progress and self.is_main)
        self.loss_fn = _LossFn(options.loss_fn)
        self.metric_fns = options.metrics
        self.metric_names = [name for name, _ in options.metrics]
        self.history = History()
        self.pos = TrainPosition()
        self.backoff = Backoff()
        self.totals = _Totals(self.metric_names)
        self.manager: Any = None
        self._saved_step = -1
        self._epoch_rng: Any = None

        # 1. Data first, so a bad dataset fails before anything is created, loaded or moved.
        #    The run seed is only known after looking for a checkpoint; it is filled in at step 4.
        self.train = make_resumable(
            train,
            argument="train",
            batch_size=batch_size,
            shuffle=True,
            num_workers=num_workers,
            pin_memory=self.device.type == "cuda",
            seed=0,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        self.val = None if val is None else self._val_loader(val, batch_size, num_workers)
        self.epoch_length = len(self.train) if self.train.has_length() else None
        if self.epoch_length == 0:
            raise ArgumentError("train gives 0 batches per epoch (batch_size larger than the dataset with drop_last?)")

        # 2. Model, optimizer, scheduler and scaler on the device.
        model.to(self.device)
        if options.channels_last:
            model.to(memory_format=torch.channels_last)
        self.optimizer = self._make_optimizer(optimizer)
        self.scheduler, self.per_step_scheduler = self._make_scheduler(scheduler)
        self.scaler = self.policy.make_scaler()

        # 3. The newest valid checkpoint (rank 0 looks, every rank reads it): checked, then restored.
        checkpoint = self._find_checkpoint()
        fit_state = checkpoint.get("fit", {}) if checkpoint else {}
        if checkpoint:
            self._check_compatible(checkpoint)
            self._restore(checkpoint, fit_state)

        # 4. Seed: the checkpoint's, else the argument's, else derived from torch's initial seed.
        if fit_state:
            self.seed = int(fit_state["seed"])
            if options.seed is not None and options.seed != self.seed:
                self._say(f"resuming with the checkpoint's seed {self.seed} (seed={options.seed} applies to new runs)")
        elif options.seed is not None:
            self.seed = _device.seed_everything(options.seed)
        else:
            self.seed = int(_dist.broadcast_object(torch.initial_seed() % 2**32))
        self.train.set_seed(self.seed)

        # 5. What runs the forward pass: DDP and/or torch.compile around the model.
        self.forward_model: Any = _dist.wrap_model(model, self.dist, self.device)
        if options.compile:
            self.forward_model = torch.compile(self.forward_model)

        self.ctx = FitContext(
            model=model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            history=self.history,
            epochs=options.epochs,
            checkpoint_dir=options.checkpoint_dir,
            is_main=self.is_main,
            monitored=self._monitored(),
        )
        self.step_callbacks = [cb for cb in options.callbacks if _overrides(cb, "on_step_end")]
        if fit_state:
            for callback, state in zip(options.callbacks, fit_state.get("callbacks", []), strict=False):
                loader = getattr(callback, "load_state_dict", None)
                if callable(loader) and state:
                    loader(state)

    # -- setup helpers

    def _say(self, message: str) -> None:
        _notify.logger.info(message)
        if not self.quiet:
            _notify.say(message)

    def _find_checkpoint(self) -> dict[str, Any]:
        o = self.o
        if o.checkpoint_dir is None:
            return {}
        from colabkit.checkpoint import CheckpointManager

        if self.is_main:
            self.manager = CheckpointManager(
                o.checkpoint_dir,
                keep_last=o.keep_last,
                keep_best=1,
                monitor=o.monitor,
                mode=metric_mode(o.monitor),  # type: ignore[arg-type]
            )
        _dist.barrier()  # rank 0 has cleaned up leftovers before anyone reads
        if not o.resume:
            return {}
        latest = self.manager.latest() if self.is_main else None
        path = _dist.broadcast_object(None if latest is None else str(latest))
        if path is None:
            return {}
        if self.is_main:
            checkpoint = self.manager.load(path)
        else:
            from colabkit.checkpoint import load_checkpoint

            checkpoint = load_checkpoint(path)
        self._say(f"resuming from {path}")
        return checkpoint

    def _check_compatible(self, checkpoint: Mapping[str, Any]) -> None:
        saved = checkpoint.get("model_state_dict")
        if not isinstance(saved, Mapping):
            raise CheckpointMismatchError(
                f"checkpoint_dir={str(self.o.checkpoint_dir)!r} holds a checkpoint that fit() did not write "
                "(no model_state_dict); use another checkpoint_dir or resume=False"
            )
        own = self.model.state_dict()
        problems = []
        for key, value in own.items():
            other = saved.get(key)
            if other is None:
                problems.append(f"{key!r} is missing")
            elif isinstance(value, torch.Tensor) and isinstance(other, torch.Tensor) and value.shape != other.shape:
                problems.append(f"{key!r} is {list(other.shape)} there but {list(value.shape)} here")
        extra = [key for key in saved if key not in own]
        if extra:
            problems.append(f"{len(extra)} unknown entries such as {extra[0]!r}")
        if problems:
            raise CheckpointMismatchError(
                f"checkpoint_dir={str(self.o.checkpoint_dir)!r} holds checkpoints of another model "
                f"({'; '.join(problems[:3])}); pass a new checkpoint_dir for this model, or resume=False to "
                "start over (old checkpoints there are then rotated away)"
            )

    def _make_optimizer(self, optimizer: Any) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ArgumentError("model has no trainable parameters (all requires_grad=False); nothing to fit")
        if optimizer is None:
            return torch.optim.AdamW(params, lr=self.o.lr)
        if isinstance(optimizer, torch.optim.Optimizer):
            own = {id(p) for p in self.model.parameters()}
            theirs = [p for group in optimizer.param_groups for p in group["params"]]
            if not any(id(p) in own for p in theirs):
                raise ArgumentError(
                    "optimizer holds none of model's parameters; create it after the model: "
                    "optimizer=torch.optim.AdamW(model.parameters())"
                )
            return optimizer
        if callable(optimizer):
            try:
                made = optimizer(params, lr=self.o.lr)
            except TypeError:
                made = optimizer(params)
            if not isinstance(made, torch.optim.Optimizer):
                raise ArgumentError(f"optimizer factory returned {type(made).__name__}, not a torch optimizer")
            return made
        raise ArgumentError(
            f"optimizer={optimizer!r} must be a torch optimizer, a factory such as torch.optim.SGD, or None (AdamW)"
        )

    def _make_scheduler(self, scheduler: Any) -> tuple[Any, bool]:
        if scheduler is None:
            return None, False
        interval: str | None = None
        if isinstance(scheduler, tuple):
            if len(scheduler) != 2 or scheduler[1] not in ("step", "epoch"):
                raise ArgumentError(f"scheduler={scheduler!r}: the tuple form is (scheduler, 'step' | 'epoch')")
            scheduler, interval = scheduler
        if not hasattr(scheduler, "step") and callable(scheduler):
            scheduler = scheduler(self.optimizer)
        if not hasattr(scheduler, "step") or not hasattr(scheduler, "state_dict"):
            raise ArgumentError(f"scheduler={scheduler!r} is not an LR scheduler (no step() / state_dict())")
        if getattr(scheduler, "optimizer", self.optimizer) is not self.optimizer:
            raise ArgumentError(
                "scheduler was made for another optimizer; pass a factory instead, e.g. "
                "scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 10)"
            )
        if interval is None:
            per_step = (
                torch.optim.lr_scheduler.OneCycleLR,
                torch.optim.lr_scheduler.CyclicLR,
                torch.optim.lr_scheduler.LambdaLR,
            )
            interval = "step" if isinstance(scheduler, per_step) else "epoch"
        return scheduler, interval == "step"

    def _restore(self, checkpoint: dict[str, Any], fit_state: Mapping[str, Any]) -> None:
        from colabkit.checkpoint import restore_state

        try:
            restore_state(
                checkpoint, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler
            )
        except CheckpointMismatchError as exc:
            raise CheckpointMismatchError(
                f"checkpoint_dir={str(self.o.checkpoint_dir)!r}: {exc}; pass a new checkpoint_dir or resume=False"
            ) from exc
        if not fit_state:
            self._say("the checkpoint was not written by fit(): starting at epoch 1 from its weights")
            return
        self.pos = TrainPosition.from_state_dict(fit_state["position"])
        self.history = History.from_state_dict(fit_state.get("history", {}))
        self.history.stop_reason = ""
        self.backoff.chunks = int(fit_state.get("chunks", 1))
        self.totals.load_state_dict(fit_state["totals"])
        self._elapsed_before = float(fit_state.get("epoch_seconds", 0.0))
        rngs = fit_state.get("rng", [])
        rank = self.dist.rank
        if len(rngs) != self.dist.world_size:
            _notify.warn(
                f"the checkpoint was written by {len(rngs)} process(es), this run has {self.dist.world_size}; "
                "training continues, but random numbers will not repeat exactly"
            )
        self._pending_rng = rngs[min(rank, len(rngs) - 1)] if rngs else None
        epoch_rngs = fit_state.get("epoch_rng") or []
        self._epoch_rng = epoch_rngs[min(rank, len(epoch_rngs) - 1)] if epoch_rngs else None
        saved_length = int(fit_state.get("epoch_length", -1))
        length = -1 if self.epoch_length is None else self.epoch_length
        if self.pos.batch and saved_length != length:
            _notify.warn(
                f"the checkpoint was saved with {saved_length} batches per epoch, this run has {length} "
                f"(dataset or batch_size changed?); continuing at batch {self.pos.batch}, but not exactly as before"
            )
        if int(fit_state.get("grad_accum", self.o.grad_accum)) != self.o.grad_accum:
            _notify.warn(
                f"grad_accum was {fit_state['grad_accum']} when the checkpoint was saved and is {self.o.grad_accum} "
                "now; the effective batch size changes from here on"
            )
        if self.backoff.chunks > 1:
            self._say(f"resuming with {self.backoff.chunks} micro-batches per batch (after an earlier out-of-memory)")

    def _val_loader(self, val: Any, batch_size: int | None, num_workers: int | str) -> Any:
        if self.dist.enabled and not isinstance(val, torch.utils.data.DataLoader):
            # Each rank validates its share; the sums are added up across ranks.
            return make_resumable(
                val,
                argument="val",
                batch_size=batch_size,
                shuffle=False,
                num_workers=num_workers,
                pin_memory=self.device.type == "cuda",
                seed=0,  # validation order is fixed; only worker augmentation uses it
                rank=self.dist.rank,
                world_size=self.dist.world_size,
            ).loader
        return _eval_loader(val, batch_size=batch_size, num_workers=num_workers, argument="val", where=self.device)

    def _monitored(self) -> tuple[str, ...]:
        names = ["loss", *self.metric_names]
        if self.val is not None:
            names += [f"val_{name}" for name in names]
        return (*names, "lr")

    # -- the run

    _pending_rng: Any = None
    _elapsed_before = 0.0

    def run(self) -> History:
        o = self.o
        from colabkit._signals import save_on_signal

        self._start = _clock()
        self._deadline = None if o.time_limit is None else self._start + o.time_limit
        self._last_save_time = self._start
        self._save_cost = 5.0 if o.checkpoint_dir is not None else 0.0  # seconds; measured at each save
        self._step_cost = 0.0
        self._val_cost = 0.0
        stop_reason = ""
        try:
            with save_on_signal() as signal_flag, _Bars(not self.quiet) as bars:
                self.signal_flag = signal_flag
                self.bars = bars
                if self._finished():
                    self._say(f"training already finished (epoch {self.pos.epoch}/{o.epochs}, step {self.pos.step})")
                    self.history.stop_reason = self._done_reason()
                    return self.history
                self.model.train()
                for callback in o.callbacks:
                    _hook(callback, "on_fit_start", self.ctx)
                bars.start_fit(o.epochs, self.pos.epoch)
                while not stop_reason and self.pos.epoch < o.epochs:
                    stop_reason = self._train_epoch()
                stop_reason = stop_reason or "completed"
                self._save(final=True)
                self.history.stop_reason = stop_reason
                for callback in o.callbacks:
                    _hook(callback, "on_fit_end", self.ctx)
                if stop_reason == "interrupted":
                    self._say(
                        f"stopped by {signal_flag.signal} at step {self.pos.step}; "
                        + ("checkpoint saved, rerun to continue" if self.manager else "returning the history so far")
                    )
                elif stop_reason == "time_limit":
                    self._say(f"time_limit reached at step {self.pos.step}; checkpoint saved, rerun to continue")
        finally:
            if self.manager is not None:
                self.manager.close()
            _dist.barrier()
        return self.history

    def _finished(self) -> bool:
        done_epochs = self.pos.epoch >= self.o.epochs
        done_steps = self.o.max_steps is not None and self.pos.step >= self.o.max_steps
        return done_epochs or done_steps

    def _done_reason(self) -> str:
        return "max_steps" if self.o.max_steps is not None and self.pos.step >= self.o.max_steps else "completed"

    def _train_epoch(self) -> str:
        """One epoch (or its remainder after a resume). Returns a stop reason, or "" to go on."""
        o, pos = self.o, self.pos
        epoch = pos.epoch
        self.ctx.epoch, self.ctx.batch = epoch, pos.batch
        resumed_inside = pos.batch > 0
        if self.train.needs_epoch_rng:
            from colabkit.checkpoint import capture_rng_state, restore_rng_state

            if resumed_inside and self._epoch_rng is not None:
                restore_rng_state(self._epoch_rng)  # the unknown sampler draws this epoch's order again
            self._epoch_rng = _dist.gather_objects(capture_rng_state())
        iterator = self.train.epoch(epoch, skip=pos.batch)
        if self._pending_rng is not None:
            from colabkit.checkpoint import restore_rng_state

            restore_rng_state(self._pending_rng)  # after skipping, right before the first new batch
            self._pending_rng = None
        if not resumed_inside:
            self.totals = _Totals(self.metric_names)
            self._elapsed_before = 0.0
        self._epoch_start = self._last_step_end = _clock()
        self._next_read = self._epoch_start + (REFRESH_SECONDS if not self.quiet else QUIET_CHECK_SECONDS)
        self.bars.start_epoch(epoch, o.epochs, self.epoch_length, pos.batch)
        for callback in o.callbacks:
            _hook(callback, "on_epoch_start", self.ctx)

        accum = o.grad_accum
        length = self.epoch_length
        group: list[Any] = []
        stop_reason = ""
        for batch in iterator:
            group.append(batch)
            pos.batch += 1
            if len(group) < accum and pos.batch != length:
                continue
            self._optimizer_step(group)
            group = []
            stop_reason = self._after_step(epoch_ends=pos.batch == length)
            if stop_reason:
                break
        else:
            if group:  # a loader without len() ended inside a group
                self._optimizer_step(group)
                stop_reason = self._after_step(epoch_ends=True)
        if stop_reason and pos.batch != length:
            self._save()
            return stop_reason
        return self._end_epoch() or stop_reason

    # -- one optimizer step

    def _optimizer_step(self, group: list[Any]) -> None:
        """Forward and backward over ``group``'s batches, then one optimizer step; retried smaller on OOM."""
        while True:
            mark = self.totals.mark()
            failed_size = 0
            try:
                samples = self._accumulate(group)
            except Exception as exc:
                if not is_out_of_memory(exc):
                    self.optimizer.zero_grad(set_to_none=True)
                    raise
                failed_size = batch_length(group[0]) or 1
            if not failed_size:
                break
            # Outside the except block: the traceback and the tensors it holds are gone.
            self.optimizer.zero_grad(set_to_none=True)
            self.totals.rollback(mark)
            self.backoff.handle(failed_size, step=self.pos.step + 1, quiet=self.quiet)

        if self.o.clip_grad_norm is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.o.clip_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.per_step_scheduler:
            self.scheduler.step()
        self.pos.step += 1
        self.pos.samples += samples

    def _accumulate(self, group: list[Any]) -> int:
        """Forward and backward of every batch in ``group``; returns the number of samples."""
        model, totals, pos = self.forward_model, self.totals, self.pos
        total = 0
        chunks = self.backoff.chunks
        scale_group = 1.0 / len(group)
        where = (pos.step + 1, pos.epoch, pos.batch)
        last = len(group) - 1
        for index, batch in enumerate(group):
            if self.device.type != "cpu":
                batch = _device.to_device(batch, self.device)
            inputs, target = _split(batch)
            if self.o.channels_last:
                inputs = _channels_last(inputs)
            samples = batch_length(target) or batch_length(inputs) or 1
            pieces = [((inputs, target), samples)] if chunks == 1 else split_batch((inputs, target), chunks, samples)
            for number, ((piece_inputs, piece_target), size) in enumerate(pieces):
                weight = scale_group * size / samples
                if self.dist.enabled and not (index == last and number == len(pieces) - 1):
                    with model.no_sync():  # gradients are all-reduced once, with the group's last backward
                        output, loss = self._forward_backward(model, piece_inputs, piece_target, weight)
                else:
                    output, loss = self._forward_backward(model, piece_inputs, piece_target, weight)
                totals.add(loss.detach(), size, where)
                if self.metric_fns:
                    detached = output.detach()
                    for metric_index, (_, fn) in enumerate(self.metric_fns):
                        value, count = fn(detached, piece_target)
                        totals.add_metric(metric_index, value, count)
            total += samples
        return total

    def _forward_backward(self, model: Any, inputs: Any, target: Any, weight: float) -> tuple[Any, torch.Tensor]:
        """Forward and loss under autocast (fp16/bf16), then backward of ``loss * weight``."""
        if self.policy.dtype is None:
            output = _call(model, inputs)
        else:
            with self.policy.autocast():
                output = _call(model, inputs)
        if not self.loss_fn.checked:
            self._first_batch_checks(output, target)
        if self.policy.dtype is None:
            loss = self.loss_fn(output, target)
        else:
            with self.policy.autocast():
                loss = self.loss_fn(output, target)
        scaled = loss * weight if weight != 1.0 else loss
        if self.scaler is not None:
            scaled = self.scaler.scale(scaled)
        scaled.backward()
        return output, loss

    def _first_batch_checks(self, output: Any, target: Any) -> None:
        try:
            self.loss_fn.check(output, target)
            for name, fn in self.metric_fns:
                try:
                    fn(output.detach(), target)
                except Exception as exc:
                    raise ArgumentError(
                        f"metric {name!r} cannot be computed for outputs {_describe(output)} and targets "
                        f"{_describe(target)} ({str(exc).strip()[:200]}); choose metrics that fit the task, "
                        "e.g. metrics=() or metrics=('mae',) for regression"
                    ) from exc
        except ColabkitError:
            self.optimizer.zero_grad(set_to_none=True)
            raise

    # -- at each step boundary

    def _after_step(self, *, epoch_ends: bool) -> str:
        """Callbacks, progress, stop and save decisions after an optimizer step. Returns a stop reason."""
        o, pos = self.o, self.pos
        now = _clock()
        if self.step_callbacks:
            self.ctx.step, self.ctx.batch, self.ctx.loss = pos.step, pos.batch, self.totals.losses[-1]
            for callback in self.step_callbacks:
                callback.on_step_end(self.ctx)
        if now >= self._next_read or len(self.totals.losses) >= MAX_BUFFER:
            self._read(now)

        # Local wishes first; with DDP all ranks must agree, so they vote every few steps.
        reason = ""
        if self.signal_flag.requested:
            reason = "interrupted"
        elif self.ctx.stop_requested:
            reason = self.ctx.stop_reason
        elif self._deadline is not None and now + self._reserve() >= self._deadline:
            reason = "time_limit"
        timed_save = o.save_seconds is not None and now - self._last_save_time >= o.save_seconds
        if self.dist.enabled:
            if pos.step % AGREE_EVERY and not epoch_ends:
                reason, timed_save = "", False
            else:
                stop, timed_save = _dist.any_flags([bool(reason), timed_save], self.device)
                reason = (reason or "interrupted") if stop else ""
        if o.max_steps is not None and pos.step >= o.max_steps:
            reason = reason or "max_steps"

        save_due = (o.save_steps is not None and pos.step % o.save_steps == 0) or timed_save
        if epoch_ends:
            # The epoch's end saves (after validation) instead: one checkpoint, with the epoch's metrics.
            self._stop_after_epoch = reason
            self._save_after_epoch = save_due
        elif save_due and not reason:
            self._save()
        # A slowly decaying maximum of the step time: what the next step may cost.
        self._step_cost = max(self._step_cost * 0.9, now - self._last_step_end)
        self._last_step_end = now
        return reason

    _stop_after_epoch = ""
    _save_after_epoch = False

    def _reserve(self) -> float:
        """Seconds to keep free before time_limit: two more steps, a validation and a save, with margin."""
        return 2 * self._step_cost + 1.5 * self._save_cost + self._val_cost

    def _read(self, now: float) -> None:
        """Read buffered losses and metrics from the device: NaN check, progress."""
        bad = self.totals.drain()
        if bad is not None:
            self._non_finite(bad)
        interval = REFRESH_SECONDS if not self.quiet else QUIET_CHECK_SECONDS
        self._next_read = now + interval
        if not self.quiet:
            means = self.totals.means("")
            seconds = self._elapsed_before + now - self._epoch_start
            postfix = {key: value for key, value in means.items() if not math.isnan(value)}
            if seconds > 0:
                postfix["samples/s"] = self.totals.samples / seconds
            self.bars.steps(self.pos.batch, postfix)

    def _non_finite(self, where: tuple[int, int, int]) -> None:
        step, epoch, batch = where
        last = (
            f"the last checkpoint (step {self._saved_step}) is intact"
            if self._saved_step >= 0
            else "no checkpoint was saved"
        )
        raise NonFiniteLossError(
            f"the loss became NaN or infinite at optimizer step {step} (epoch {epoch + 1}, batch {batch}); {last}. "
            f"Try a lower learning rate (lr={self.o.lr:g} now), clip_grad_norm=1.0, precision='fp32' "
            f"(now {self.policy.name}), and check the inputs for NaN or extreme values"
        )

    # -- epoch end

    def _end_epoch(self) -> str:
        o, pos = self.o, self.pos
        bad = self.totals.drain()
        if bad is not None:
            self._non_finite(bad)
        train_totals = self.totals
        sums = [
            train_totals.loss_sum,
            float(train_totals.samples),
            *train_totals.metric_sums,
            *map(float, train_totals.metric_counts),
        ]
        sums = _dist.all_sum(sums, self.device)
        train_totals = _Totals(self.metric_names)
        k = len(self.metric_names)
        train_totals.loss_sum, train_totals.samples = sums[0], int(sums[1])
        train_totals.metric_sums, train_totals.metric_counts = sums[2 : 2 + k], [int(c) for c in sums[2 + k :]]
        record: dict[str, Any] = {"epoch": pos.epoch, **train_totals.means("")}
        seconds = self._elapsed_before + _clock() - self._epoch_start
        if self.val is not None:
            started = _clock()
            validation = self._validate()
            if validation is None:
                # Interrupted while validating: save as "every batch done, epoch not closed", so
                # the rerun skips straight to this epoch's validation and the History stays whole.
                self._save()
                return "interrupted"
            record.update(validation)
            self._val_cost = _clock() - started
        record["lr"] = float(self.optimizer.param_groups[0]["lr"])
        record["time"] = round(seconds, 3)
        record["samples_per_sec"] = round(train_totals.samples / seconds, 1) if seconds > 0 else float("nan")
        self.history.append(record)
        self.bars.end_epoch(record)
        pos.epoch += 1
        pos.batch = 0
        if self.scheduler is not None and not self.per_step_scheduler:
            if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                self.scheduler.step(record.get(o.monitor, record["loss"]))
            else:
                self.scheduler.step()
        self.ctx.logs, self.ctx.epoch, self.ctx.step = record, pos.epoch - 1, pos.step
        for callback in o.callbacks:
            _hook(callback, "on_epoch_end", self.ctx)
        reason = self._stop_after_epoch or self.ctx.stop_reason
        if self.dist.enabled:
            reason = (reason or "callback") if _dist.any_flags([bool(reason)], self.device)[0] else ""
        if self.is_main and o.checkpoint_dir is not None:
            self.history.to_csv(o.checkpoint_dir / "history.csv")
        if o.save_epoch or self._save_after_epoch or reason or pos.epoch >= o.epochs:
            self._save(metrics=record)
        self._stop_after_epoch, self._save_after_epoch = "", False
        self.totals = _Totals(self.metric_names)
        self._elapsed_before = 0.0
        return reason

    def _validate(self) -> dict[str, float] | None:
        """Validation metrics (summed over ranks), or None if a signal arrived meanwhile (single process)."""
        # With DDP every rank must finish the same collectives, so validation runs to its end there.
        stop = None if self.dist.enabled else (lambda: self.signal_flag.requested)
        with _eval_mode(self.model):
            totals = _run_eval(
                self.forward_model,
                self.val,
                self.device,
                self.policy,
                self.loss_fn,
                self.metric_fns,
                self.bars,
                "validate",
                stop,
            )
        if totals is None:
            return None
        k = len(self.metric_names)
        sums = _dist.all_sum(
            [totals.loss_sum, float(totals.samples), *totals.metric_sums, *map(float, totals.metric_counts)],
            self.device,
        )
        totals.loss_sum, totals.samples = sums[0], int(sums[1])
        totals.metric_sums, totals.metric_counts = sums[2 : 2 + k], [int(c) for c in sums[2 + k :]]
        return totals.means("val_")

    # -- saving

    def _save(self, *, metrics: Mapping[str, Any] | None = None, final: bool = False) -> None:
        """Checkpoint at this step boundary (rank 0 writes; every rank contributes its RNG state)."""
        if self.o.checkpoint_dir is None or self.pos.step == self._saved_step:
            return
        if final and self.pos.step == 0:
            return
        from colabkit.checkpoint import capture_rng_state

        bad = self.totals.drain()  # never save a model that a NaN step already spoiled
        if bad is not None:
            self._non_finite(bad)
        started = _clock()
        rngs = _dist.gather_objects(capture_rng_state())
        if self.is_main:
            state = self._state(rngs)
            clean = {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float)) and math.isfinite(v)}
            self.manager.save(state, step=self.pos.step, metrics=clean or None)
        self._saved_step = self.pos.step
        self._last_save_time = _clock()
        self._save_cost = self._last_save_time - started

    def _state(self, rngs: list[Any]) -> dict[str, Any]:
        seconds = self._elapsed_before + (_clock() - self._epoch_start if self.pos.batch else 0.0)
        fit_state = {
            "version": _CHECKPOINT_VERSION,
            "position": self.pos.state_dict(),
            "seed": self.seed,
            "chunks": self.backoff.chunks,
            "grad_accum": self.o.grad_accum,
            "epoch_length": -1 if self.epoch_length is None else self.epoch_length,
            "world_size": self.dist.world_size,
            "rng": rngs,
            "epoch_rng": self._epoch_rng if self.train.needs_epoch_rng and self.pos.batch else None,
            "totals": self.totals.state_dict(),
            "epoch_seconds": seconds,
            "history": self.history.state_dict(),
            "callbacks": [_callback_state(cb) for cb in self.o.callbacks],
        }
        state: dict[str, Any] = {
            "model_state_dict": self.model.state_dict(),
            "optimizer_state_dict": self.optimizer.state_dict(),
            "epoch": self.pos.epoch,
            "fit": fit_state,
        }
        if self.scheduler is not None:
            state["scheduler_state_dict"] = self.scheduler.state_dict()
        if self.scaler is not None:
            state["scaler_state_dict"] = self.scaler.state_dict()
        return state


def _overrides(callback: Any, name: str) -> bool:
    method = getattr(type(callback), name, None)
    return method is not None and method is not getattr(Callback, name)


def _hook(callback: Any, name: str, ctx: FitContext) -> None:
    method = getattr(callback, name, None)
    if callable(method):
        method(ctx)


def _callback_state(callback: Any) -> dict[str, Any]:
    method = getattr(callback, "state_dict", None)
    return dict(method()) if callable(method) else {}
