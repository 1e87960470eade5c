"""Metrics: named and user metrics, and the on-device running sums that are read back only when
progress, a save or an epoch's end needs them (the default loss is part of :mod:`colabkit.train.batches`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from colabkit.errors import ArgumentError
from colabkit.train.batches import describe
from colabkit.train.oom import batch_length

__all__ = ["Totals", "check_metrics", "resolve_metrics"]


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


def resolve_metrics(metrics: Any) -> list[tuple[str, Callable[..., Any]]]:
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


def check_metrics(metrics: Sequence[tuple[str, Callable[..., Any]]], output: Any, target: Any) -> None:
    """On the first batch: each metric computes on these outputs and targets, or an error says which does not."""
    for name, fn in metrics:
        try:
            fn(output.detach(), target)
        except Exception as exc:
            raise ArgumentError(
                f"metric {name!r} cannot be computed for outputs {describe(output)} and targets "
                f"{describe(target)} ({str(exc).strip()[:200]}); choose metrics that fit the task, "
                "e.g. metrics=() or metrics=('mae',) for regression"
            ) from exc


class Totals:
    """Sums of one epoch (or one evaluation), read from the device only when drained."""

    def __init__(self, metric_names: Sequence[str]) -> None:
        self.names = list(metric_names)
        self.loss_sum = 0.0
        self.samples = 0
        self.metric_sums = [0.0] * len(self.names)
        self.metric_counts = [0] * len(self.names)
        # Per micro-batch, not yet read: loss tensors, their sample counts, (step, epoch, batch) for
        # errors, and per metric its (sum, count) terms, added after the micro-batch's loss.
        self.losses: list[torch.Tensor] = []
        self.weights: list[int] = []
        self.where: list[tuple[int, int, int]] = []
        self.metric_terms: list[list[Any]] = [[] for _ in self.names]
        self.term_counts: list[list[int]] = [[] for _ in self.names]

    def add(self, loss: torch.Tensor, samples: int, where: tuple[int, int, int]) -> None:
        self.losses.append(loss)
        self.weights.append(samples)
        self.where.append(where)

    def add_metric(self, index: int, value: Any, count: int) -> None:
        self.metric_terms[index].append(value)
        self.term_counts[index].append(count)

    def mark(self) -> int:
        """A point to :meth:`rollback` to (each metric has at most one term per loss)."""
        return len(self.losses)

    def rollback(self, mark: int) -> None:
        """Forget values added after ``mark`` (a failed, retried step)."""
        del self.losses[mark:], self.weights[mark:], self.where[mark:]
        for terms, counts in zip(self.metric_terms, self.term_counts, strict=True):
            del terms[mark:], counts[mark:]

    def drain(self) -> tuple[int, int, int] | None:
        """Fold buffered values into the sums (one device read); returns where a non-finite loss first showed."""
        if not self.losses:
            return None
        parts = [torch.stack(self.losses).detach().float().flatten()]
        device = parts[0].device
        filled = [index for index, terms in enumerate(self.metric_terms) if terms]
        for index in filled:
            terms = self.metric_terms[index]
            stacked = torch.stack([t if isinstance(t, torch.Tensor) else torch.tensor(t) for t in terms])
            parts.append(stacked.float().sum().reshape(1).to(device))
        values = torch.cat(parts).tolist()
        n_losses = len(self.losses)
        bad = None
        for value, weight, where in zip(values[:n_losses], self.weights, self.where, strict=True):
            if bad is None and not math.isfinite(value):
                bad = where
            self.loss_sum += value * weight  # a NaN stays visible in the mean
            self.samples += weight
        for index, value in zip(filled, values[n_losses:], strict=True):
            self.metric_sums[index] += value
            self.metric_counts[index] += sum(self.term_counts[index])
        buffers: list[list[Any]] = [self.losses, self.weights, self.where, *self.metric_terms, *self.term_counts]
        for buffer in buffers:
            buffer.clear()
        return bad

    def means(self, prefix: str) -> dict[str, float]:
        out = {f"{prefix}loss": self.loss_sum / self.samples if self.samples else float("nan")}
        for name, total, count in zip(self.names, self.metric_sums, self.metric_counts, strict=True):
            out[f"{prefix}{name}"] = total / count if count else float("nan")
        return out

    def summed(self, add: Callable[[list[float]], list[float]]) -> Totals:
        """New drained totals whose sums went through ``add`` (e.g. a sum over DDP ranks)."""
        k = len(self.names)
        sums = add([self.loss_sum, float(self.samples), *self.metric_sums, *map(float, self.metric_counts)])
        out = Totals(self.names)
        out.loss_sum, out.samples = sums[0], int(sums[1])
        out.metric_sums, out.metric_counts = list(sums[2 : 2 + k]), [int(c) for c in sums[2 + k :]]
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
