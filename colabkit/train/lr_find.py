"""The learning-rate range test: train briefly while the lr grows exponentially, and watch the loss.

It takes the data, model, optimizer and loss exactly as :func:`colabkit.fit`
does (the same batch contract, :mod:`colabkit.train.batches`, and the same
optimizer factory, :func:`colabkit.train.optim.make_optimizer`), so its
suggestion is the ``lr`` to pass to fit().
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from colabkit import _plot
from colabkit import device as _device
from colabkit.errors import ArgumentError
from colabkit.train.batches import LossFn, check_loss_fn, forever, forward, inputs_and_targets
from colabkit.train.optim import make_optimizer
from colabkit.train.options import check_model
from colabkit.train.state import ordered_loader

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["LRFinderResult", "lr_find"]


@dataclasses.dataclass(frozen=True)
class LRFinderResult:
    """The learning-rate range test's curve and its suggestion (see :func:`lr_find`).

    ``float(result)`` is the suggested learning rate.

    Attributes:
        lrs: Learning rate of each step.
        losses: Smoothed (bias-corrected exponential moving average) loss of each step.
        raw_losses: Loss of each step as computed.
        suggestion: The suggested learning rate: where the smoothed loss falls fastest.
        min_loss_lr: The learning rate where the smoothed loss was lowest (one tenth of it
            is a common, more cautious choice).
        diverged: Whether the sweep stopped early because the loss blew up.
    """

    lrs: tuple[float, ...]
    losses: tuple[float, ...]
    raw_losses: tuple[float, ...]
    suggestion: float
    min_loss_lr: float
    diverged: bool

    def __float__(self) -> float:
        return self.suggestion

    def __str__(self) -> str:
        end = "stopped when the loss diverged" if self.diverged else "ran the full sweep"
        return (
            f"lr_find: suggested lr {self.suggestion:.2e} (steepest descent of the smoothed loss); "
            f"lowest loss at lr {self.min_loss_lr:.2e}; {len(self.lrs)} steps, {end}"
        )

    def plot(self, *, ax: Axes | None = None, path: str | Path | None = None) -> Figure:
        """Smoothed loss against learning rate (log scale), the suggestion marked.

        Draws on ``ax`` (default: a new figure) and saves to ``path`` if given; returns the
        matplotlib Figure as :meth:`colabkit.History.plot` and ``DeviceComparison.plot()`` do
        (shown once as a notebook cell's result).

        Raises:
            MissingDependencyError: matplotlib is not installed.
        """
        ax, created = _plot.axes(ax, "LRFinderResult.plot()")
        ax.plot(self.lrs, self.losses, label="smoothed loss")
        ax.plot(self.lrs, self.raw_losses, alpha=0.3, label="raw loss")
        index = min(range(len(self.lrs)), key=lambda i: abs(math.log(self.lrs[i]) - math.log(self.suggestion)))
        ax.scatter(
            [self.lrs[index]], [self.losses[index]], color="red", zorder=3, label=f"suggested {self.suggestion:.1e}"
        )
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("loss")
        ax.set_title("Learning-rate range test")
        finite = [v for v in self.losses if math.isfinite(v)]
        if finite:
            # The divergent tail would squash the interesting part of the curve.
            low, high = min(finite), min(max(finite), 2.5 * finite[0] if finite[0] > 0 else max(finite))
            ax.set_ylim(low - 0.05 * (high - low + 1e-12), high + 0.05 * (high - low + 1e-12))
        ax.legend()
        return _plot.finish(ax, path, created=created)


def _suggest(lrs: Sequence[float], losses: Sequence[float]) -> tuple[float, float]:
    """(steepest-descent lr, lowest-loss lr) of a smoothed curve."""
    lowest = min(range(len(losses)), key=lambda i: losses[i])
    min_loss_lr = lrs[lowest]
    # The first points are dominated by the moving average warming up; the part after the
    # minimum is divergence. The steepest fall lies in between.
    start = max(1, len(losses) // 10)
    if lowest - start < 2:
        return min_loss_lr / 10, min_loss_lr
    logs = [math.log10(lr) for lr in lrs]
    slopes = [(losses[i + 1] - losses[i - 1]) / (logs[i + 1] - logs[i - 1]) for i in range(start, lowest)]
    best = min(range(len(slopes)), key=lambda i: slopes[i])
    return lrs[start + best], min_loss_lr


def lr_find(
    model: nn.Module,
    data: Any,
    *,
    optimizer: torch.optim.Optimizer | Callable[..., torch.optim.Optimizer] | None = None,
    loss_fn: Callable[..., torch.Tensor] | Literal["auto"] = "auto",
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    steps: int = 100,
    smoothing: float = 0.98,
    diverge_factor: float = 4.0,
    device: str | torch.device = "auto",
    progress: bool = True,
) -> LRFinderResult:
    """The learning-rate range test: train briefly while the lr grows exponentially, watch the loss.

    The lr goes from ``start_lr`` to ``end_lr`` over ``steps`` batches; the loss is
    smoothed with a bias-corrected moving average, and the sweep stops once it exceeds
    ``diverge_factor`` times its best value (or is not finite). Afterwards the model's
    weights, buffers, train/eval mode and device, and the optimizer's state and learning
    rates are exactly as before, so training can start right away.

    Args:
        model: The model.
        data: What :func:`colabkit.fit` takes: a Dataset or DataLoader of ``(inputs, targets)``
            batches (or dicts with a ``"labels"`` key), or an ``(inputs, targets)`` pair of tensors;
            it is cycled if shorter than ``steps``.
        optimizer: The optimizer you will train with (its state is restored afterwards), a
            factory as :func:`colabkit.fit` takes (``torch.optim.SGD``, a ``functools.partial``),
            or None for AdamW, fit()'s default.
        loss_fn: The loss, as in :func:`colabkit.fit`; ``"auto"``: fit()'s default, cross-entropy
            for integer labels.
        start_lr: First learning rate.
        end_lr: Last learning rate.
        steps: Batches in the sweep.
        smoothing: Moving-average factor of the loss (0 = none, closer to 1 = smoother).
        diverge_factor: Stop when the smoothed loss exceeds this multiple of the lowest one.
        device: Where to run; ``"auto"``: where the model is if that is a GPU, else
            :func:`colabkit.get_device`.
        progress: Show a progress bar.

    Returns:
        An :class:`LRFinderResult`; ``.suggestion`` (or ``float(result)``) is the lr to use,
        ``.plot()`` draws the curve.

    Raises:
        ArgumentError: An option is out of range or the data cannot be used.

    Example:
        >>> result = colabkit.lr_find(model, train_loader)  # doctest: +SKIP
        >>> result.plot()  # doctest: +SKIP
        >>> history = colabkit.fit(model, train_loader, lr=result.suggestion)  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    if not (0 < start_lr < end_lr) or not math.isfinite(end_lr):
        raise ArgumentError(f"start_lr={start_lr!r}, end_lr={end_lr!r}: need 0 < start_lr < end_lr, e.g. 1e-7 and 10")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 5:
        raise ArgumentError(f"steps={steps!r} is too few for a curve; use at least 5 (100 is typical)")
    if not 0 <= smoothing < 1:
        raise ArgumentError(f"smoothing={smoothing!r} must be in [0, 1), e.g. 0.98")
    if not diverge_factor > 1:
        raise ArgumentError(f"diverge_factor={diverge_factor!r} must be above 1, e.g. 4")
    model = check_model(model)
    criterion = LossFn(check_loss_fn(None if loss_fn == "auto" else loss_fn))
    first = next(iter(model.parameters()), None)
    if first is None:
        raise ArgumentError("model has no parameters, so there is no learning rate to find")
    home = first.device
    # "auto": a model already on an accelerator stays there; a CPU model goes to the best device.
    if device != "auto":
        target = _device.get_device(device)
    elif home.type != "cpu":
        target = home
    else:
        target = _device.get_device()
    loader = ordered_loader(data, argument="data", batch_size=None, num_workers=0, pin_memory=False)
    batches = forever(loader)
    was_training = model.training
    # Copies, not references: the sweep changes the tensors in place.
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(optimizer.state_dict()) if isinstance(optimizer, torch.optim.Optimizer) else None
    # fit()'s factory and checks: with optimizer=None this is fit()'s AdamW, so the suggestion is
    # the lr to pass to fit() as it is.
    opt = make_optimizer(optimizer, model, start_lr)

    lrs: list[float] = []
    raw: list[float] = []
    smooth: list[float] = []
    diverged = False
    average = 0.0
    best = math.inf
    ratio = (end_lr / start_lr) ** (1 / (steps - 1))
    try:
        model.to(target)
        if saved_opt is not None and target != home:
            opt.load_state_dict(saved_opt)  # moves the optimizer's state to the parameters' new device
        model.train()
        for index in tqdm(range(steps), desc="lr_find", disable=not progress, leave=False):
            lr = start_lr * ratio**index
            for group in opt.param_groups:
                group["lr"] = lr
            inputs, targets = inputs_and_targets(_device.to_device(next(batches), target))
            _, loss = forward(model, inputs, targets, criterion)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            # One sync per step is the point here: each step's loss decides whether to go on.
            value = float(loss.detach())
            lrs.append(lr)
            raw.append(value)
            average = smoothing * average + (1 - smoothing) * value
            smoothed = average / (1 - smoothing ** (index + 1))
            smooth.append(smoothed)
            if not math.isfinite(smoothed) or smoothed > diverge_factor * best:
                diverged = True
                break
            best = min(best, smoothed)
    finally:
        opt.zero_grad(set_to_none=True)
        model.to(home)
        model.load_state_dict(saved_model)
        model.train(was_training)
        if saved_opt is not None:
            opt.load_state_dict(saved_opt)  # also puts back each group's lr

    finite = [(lr, s, r) for lr, s, r in zip(lrs, smooth, raw, strict=True) if math.isfinite(s)]
    if len(finite) < 2:
        raise ArgumentError(
            f"the loss diverged at once (start_lr={start_lr!r}); start lower, e.g. start_lr={start_lr / 100:g}"
        )
    suggestion, min_loss_lr = _suggest([f[0] for f in finite], [f[1] for f in finite])
    return LRFinderResult(
        lrs=tuple(lrs),
        losses=tuple(smooth),
        raw_losses=tuple(raw),
        suggestion=suggestion,
        min_loss_lr=min_loss_lr,
        diverged=diverged,
    )
