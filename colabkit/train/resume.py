"""Resuming fit(): finding, checking and restoring the newest checkpoint, and what a save writes.

The only module of :mod:`colabkit.train` that uses :mod:`colabkit.checkpoint`. A checkpoint holds
model, optimizer, scheduler and scaler states plus ``"fit"``: the position (epoch, batches done in
the epoch, optimizer steps), the run seed, the partial epoch's sums, the History, callback states
and every rank's RNG state. :func:`read_fit_state` turns that back into a :class:`Resumed`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from colabkit import _notify
from colabkit.checkpoint import CheckpointManager, load_checkpoint, restore_state, weights_problems
from colabkit.errors import CheckpointMismatchError
from colabkit.train import distributed as _dist
from colabkit.train.history import History, metric_mode
from colabkit.train.options import FitOptions
from colabkit.train.state import TrainPosition, capture_rng_state, restore_rng_state

__all__ = [
    "CHECKPOINT_VERSION",
    "Resumed",
    "capture_rngs",
    "check_compatible",
    "find_checkpoint",
    "open_manager",
    "read_fit_state",
    "restore_callbacks",
    "restore_rng",
    "restore_weights",
    "state_to_save",
]

CHECKPOINT_VERSION = 1


def open_manager(options: FitOptions, *, is_main: bool) -> CheckpointManager | None:
    """Rank 0's CheckpointManager for ``checkpoint_dir`` (None without one, and on other ranks)."""
    if options.directory is None or not is_main:
        return None
    return CheckpointManager(
        options.directory,
        keep_last=options.keep_last,
        keep_best=1,
        monitor=options.monitor,
        mode=metric_mode(options.monitor),  # type: ignore[arg-type]
    )


def find_checkpoint(options: FitOptions, manager: CheckpointManager | None) -> tuple[dict[str, Any], str | None]:
    """The newest valid checkpoint and its path (rank 0 looks, every rank reads it), or ``({}, None)``."""
    if options.directory is None:
        return {}, None
    _dist.barrier()  # rank 0 has cleaned up leftovers before anyone reads
    if not options.resume:
        return {}, None
    latest = manager.latest() if manager is not None else None
    path = _dist.broadcast_object(None if latest is None else str(latest))
    if path is None:
        return {}, None
    return (manager.load(path) if manager is not None else load_checkpoint(path)), path


def check_compatible(checkpoint: Mapping[str, Any], model: torch.nn.Module, directory: Path | None) -> None:
    """Refuse a checkpoint that fit() did not write or that holds another model's weights."""
    saved = checkpoint.get("model_state_dict")
    if not isinstance(saved, Mapping):
        raise CheckpointMismatchError(
            f"checkpoint_dir={str(directory)!r} holds a checkpoint that fit() did not write "
            "(no model_state_dict); use another checkpoint_dir or resume=False"
        )
    problems = weights_problems(model, saved)
    if problems:
        raise CheckpointMismatchError(
            f"checkpoint_dir={str(directory)!r} holds checkpoints of another model "
            f"({'; '.join(problems[:3])}); pass a new checkpoint_dir for this model, or resume=False to "
            "start over (old checkpoints there are then rotated away)"
        )


def restore_weights(
    checkpoint: dict[str, Any], *, model: Any, optimizer: Any, scheduler: Any, scaler: Any, directory: Path | None
) -> None:
    """Model, optimizer, scheduler and scaler states, in place."""
    try:
        restore_state(checkpoint, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
    except CheckpointMismatchError as exc:
        raise CheckpointMismatchError(
            f"checkpoint_dir={str(directory)!r}: {exc}; pass a new checkpoint_dir or resume=False"
        ) from exc


@dataclasses.dataclass
class Resumed:
    """Where a checkpointed run stood, for this rank."""

    position: TrainPosition
    history: History
    seed: int
    chunks: int
    totals: dict[str, Any]
    epoch_seconds: float
    rng: Any  # restored after skipping the finished batches, right before the first new one
    epoch_rng: Any  # the RNG at the epoch's start, for a sampler that draws from it
    callbacks: list[dict[str, Any]]


def read_fit_state(
    fit_state: Mapping[str, Any], *, rank: int, world_size: int, epoch_length: int | None, grad_accum: int
) -> Resumed:
    """The ``"fit"`` entry of a checkpoint, warning where this run differs from the saved one."""
    rngs = fit_state.get("rng", [])
    if len(rngs) != world_size:
        _notify.warn(
            f"the checkpoint was written by {len(rngs)} process(es), this run has {world_size}; "
            "training continues, but random numbers will not repeat exactly"
        )
    epoch_rngs = fit_state.get("epoch_rng") or []
    resumed = Resumed(
        position=TrainPosition.from_state_dict(fit_state["position"]),
        history=History.from_state_dict(fit_state.get("history", {})),
        seed=int(fit_state["seed"]),
        chunks=int(fit_state.get("chunks", 1)),
        totals=fit_state["totals"],
        epoch_seconds=float(fit_state.get("epoch_seconds", 0.0)),
        rng=rngs[min(rank, len(rngs) - 1)] if rngs else None,
        epoch_rng=epoch_rngs[min(rank, len(epoch_rngs) - 1)] if epoch_rngs else None,
        callbacks=list(fit_state.get("callbacks", [])),
    )
    resumed.history.stop_reason = ""
    saved_length = int(fit_state.get("epoch_length", -1))
    length = -1 if epoch_length is None else epoch_length
    if resumed.position.batch and saved_length != length:
        _notify.warn(
            f"the checkpoint was saved with {saved_length} batches per epoch, this run has {length} "
            f"(dataset or batch_size changed?); continuing at batch {resumed.position.batch}, but not exactly as before"
        )
    if int(fit_state.get("grad_accum", grad_accum)) != grad_accum:
        _notify.warn(
            f"grad_accum was {fit_state['grad_accum']} when the checkpoint was saved and is {grad_accum} "
            "now; the effective batch size changes from here on"
        )
    return resumed


def restore_callbacks(callbacks: Sequence[Any], states: Sequence[Mapping[str, Any]]) -> None:
    for callback, state in zip(callbacks, states, strict=False):
        loader = getattr(callback, "load_state_dict", None)
        if callable(loader) and state:
            loader(state)


def capture_rngs() -> list[Any]:
    """Every rank's RNG states (python, numpy, torch, CUDA), gathered on every rank."""
    return _dist.gather_objects(capture_rng_state())


def restore_rng(state: Any) -> None:
    restore_rng_state(state)


def state_to_save(
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    position: TrainPosition,
    seed: int,
    chunks: int,
    grad_accum: int,
    epoch_length: int | None,
    world_size: int,
    rngs: list[Any],
    epoch_rng: Any,
    totals: dict[str, Any],
    epoch_seconds: float,
    history: History,
    callbacks: Sequence[Any],
) -> dict[str, Any]:
    """The checkpoint fit() writes at a step boundary: what :func:`read_fit_state` reads back."""
    fit_state = {
        "version": CHECKPOINT_VERSION,
        "position": position.state_dict(),
        "seed": seed,
        "chunks": chunks,
        "grad_accum": grad_accum,
        "epoch_length": -1 if epoch_length is None else epoch_length,
        "world_size": world_size,
        "rng": rngs,
        "epoch_rng": epoch_rng,
        "totals": totals,
        "epoch_seconds": epoch_seconds,
        "history": history.state_dict(),
        "callbacks": [_callback_state(cb) for cb in callbacks],
    }
    state: dict[str, Any] = {
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
        "epoch": position.epoch,
        "fit": fit_state,
    }
    if scheduler is not None:
        state["scheduler_state_dict"] = scheduler.state_dict()
    if scaler is not None:
        state["scaler_state_dict"] = scaler.state_dict()
    return state


def _callback_state(callback: Any) -> dict[str, Any]:
    method = getattr(callback, "state_dict", None)
    return dict(method()) if callable(method) else {}
