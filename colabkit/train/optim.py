"""The optimizer and learning-rate scheduler fit() builds from its arguments."""

from __future__ import annotations

from typing import Any

import torch

from colabkit.errors import ArgumentError

__all__ = ["default_adamw", "make_optimizer", "make_scheduler"]


def default_adamw(params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """fit()'s default optimizer: AdamW, fused into one kernel per step where torch has one.

    The fused kernel does the same update as the per-parameter loop torch uses by default on
    the CPU, in about 15% less time per step of a small MLP (bench/bench_fit.py); it exists for
    CPU and CUDA parameters (torch >= 2.4 on the CPU). Elsewhere, or when torch refuses it (an
    older torch, an unsupported dtype), plain AdamW.
    """
    if all(p.device.type in ("cpu", "cuda") for p in params):
        try:
            return torch.optim.AdamW(params, lr=lr, fused=True)
        except (RuntimeError, TypeError, ValueError):
            pass
    return torch.optim.AdamW(params, lr=lr)


def make_optimizer(optimizer: Any, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """fit()'s ``optimizer`` argument made real: AdamW at ``lr``, an optimizer as given, or a factory's."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ArgumentError("model has no trainable parameters (all requires_grad=False); nothing to fit")
    if optimizer is None:
        return default_adamw(params, lr)
    if isinstance(optimizer, torch.optim.Optimizer):
        own = {id(p) for p in model.parameters()}
        theirs = [p for group in optimizer.param_groups for p in group["params"]]
        if not any(id(p) in own for p in theirs):
            raise ArgumentError(
                "optimizer holds none of model's parameters; create it after the model: "
                "optimizer=torch.optim.AdamW(model.parameters())"
            )
        return optimizer
    if callable(optimizer):
        try:
            made = optimizer(params, lr=lr)
        except TypeError:
            made = optimizer(params)
        if not isinstance(made, torch.optim.Optimizer):
            raise ArgumentError(f"optimizer factory returned {type(made).__name__}, not a torch optimizer")
        return made
    raise ArgumentError(
        f"optimizer={optimizer!r} must be a torch optimizer, a factory such as torch.optim.SGD, or None (AdamW)"
    )


def make_scheduler(scheduler: Any, optimizer: torch.optim.Optimizer) -> tuple[Any, bool]:
    """fit()'s ``scheduler`` argument made real, and whether it steps every optimizer step (else every epoch)."""
    if scheduler is None:
        return None, False
    interval: str | None = None
    if isinstance(scheduler, tuple):
        if len(scheduler) != 2 or scheduler[1] not in ("step", "epoch"):
            raise ArgumentError(f"scheduler={scheduler!r}: the tuple form is (scheduler, 'step' | 'epoch')")
        scheduler, interval = scheduler
    if not hasattr(scheduler, "step") and callable(scheduler):
        scheduler = scheduler(optimizer)
    if not hasattr(scheduler, "step") or not hasattr(scheduler, "state_dict"):
        raise ArgumentError(f"scheduler={scheduler!r} is not an LR scheduler (no step() / state_dict())")
    if getattr(scheduler, "optimizer", optimizer) is not optimizer:
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
