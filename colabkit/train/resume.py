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

from colabkit import _io, _notify
from colabkit.checkpoint import CheckpointManager, load_checkpoint, restore_state, weights_problems
from colabkit.checkpoint.compile_cache import CompileCache
from colabkit.errors import CheckpointMismatchError
from colabkit.train import distributed as _dist
from colabkit.train import recipe as recipe_module
from colabkit.train.history import History, metric_mode
from colabkit.train.options import FitOptions
from colabkit.train.state import TrainPosition, capture_rng_state, restore_rng_state

__all__ = [
    "CHECKPOINT_VERSION",
    "Resumed",
    "capture_rngs",
    "check_compatible",
    "find_checkpoint",
    "open_compile_cache",
    "open_manager",
    "read_fit_state",
    "restore_callbacks",
    "restore_rng",
    "restore_weights",
    "state_to_save",
]

CHECKPOINT_VERSION = 1


def open_manager(options: FitOptions, *, is_main: bool, model: torch.nn.Module) -> CheckpointManager | None:
    """Rank 0's CheckpointManager for ``checkpoint_dir`` (None without one, and on other ranks).

    Opening it takes the folder's lease (one writer per folder) and checks, before any
    training, that the folder is writable and its disk can hold a checkpoint.
    """
    if options.directory is None or not is_main:
        return None
    manager = CheckpointManager(
        options.directory,
        keep_last=options.keep_last,
        keep_best=1,
        monitor=options.monitor,
        mode=metric_mode(options.monitor),  # type: ignore[arg-type]
        takeover=options.takeover,
    )
    try:
        _check_room(manager, model)
    except BaseException:
        manager.close()
        raise
    return manager


def open_compile_cache(options: FitOptions, *, is_main: bool) -> CompileCache | None:
    """The compile cache beside ``checkpoint_dir``'s checkpoints (None without one, or when not compiling).

    Every rank reads it; rank 0 writes it.
    """
    if options.directory is None or options.compile is None:
        return None
    return CompileCache.beside(options.directory, writes=is_main)


def _check_room(manager: CheckpointManager, model: torch.nn.Module) -> None:
    """Refuse to train when the disk cannot take one more checkpoint (the newest one's size, or a guess)."""
    saved = manager.checkpoints()
    if saved:
        needed, what = saved[-1].size, "a checkpoint the size of the last one"
    else:
        weights = sum(t.numel() * t.element_size() for t in model.state_dict().values() if isinstance(t, torch.Tensor))
        # Weights plus an optimizer's state (Adam keeps two moments): about three times the weights.
        needed, what = 3 * weights, "a checkpoint of this model (about 3x its weights, with the optimizer state)"
    _io.ensure_free_space(
        manager.local_dir,
        needed,
        what=what,
        fix="nothing was trained or changed; free some space (old checkpoints, datasets) or pass a checkpoint_dir "
        "on a larger disk",
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


def describe_run(
    *, model: torch.nn.Module, optimizer: Any, scheduler: Any, train: Any, grad_accum: int, precision: str
) -> dict[str, Any]:
    """This call's recipe (see :mod:`colabkit.train.recipe`), taken before anything is restored."""
    sampler = getattr(train, "batch_sampler", None)
    batch_size = getattr(sampler, "batch_size", None) or getattr(getattr(train, "loader", None), "batch_size", None)
    try:
        length: int | None = len(train.dataset)
    except TypeError:
        length = None
    return recipe_module.describe(
        optimizer=optimizer,
        scheduler=scheduler,
        batch_size=batch_size,
        grad_accum=grad_accum,
        precision=precision,
        dataset_length=length,
        model=model,
    )


def restore_weights(
    checkpoint: dict[str, Any],
    *,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    scaler: Any,
    directory: Path | None,
    recipe: dict[str, Any],
    is_main: bool,
) -> dict[str, Any]:
    """Model, optimizer, scheduler and scaler states, in place, as the recipe comparison decides.

    ``recipe`` is this call's (:func:`describe_run`). Settings that differ from the
    checkpoint's get the behaviour documented in fit(): most apply, scheduler settings
    keep the checkpoint's values (warned), another model is refused. Returns the recipe
    the run goes on with, to be saved in its checkpoints.
    """
    fit_state = checkpoint.get("fit") or {}
    saved = fit_state.get("recipe")
    plan = None
    if isinstance(saved, Mapping):
        mid_epoch = bool(fit_state.get("position", {}).get("batch"))
        plan = recipe_module.compare(saved, recipe, mid_epoch=mid_epoch)
        for change in plan.refused:
            raise CheckpointMismatchError(
                f"checkpoint_dir={str(directory)!r}: {change.message()}; pass a new checkpoint_dir or resume=False"
            )
    fresh = recipe_module.group_settings(optimizer)
    keep = plan or recipe_module.Plan([])
    try:
        restore_state(
            checkpoint,
            model=model,
            optimizer=optimizer if keep.restore_optimizer else None,
            scheduler=scheduler if keep.restore_scheduler else None,
            scaler=scaler if keep.restore_scaler else None,
        )
    except CheckpointMismatchError as exc:
        raise CheckpointMismatchError(
            f"checkpoint_dir={str(directory)!r}: {exc}; pass a new checkpoint_dir or resume=False"
        ) from exc
    if plan is None or not isinstance(saved, Mapping):
        return recipe
    recipe_module.apply(plan, optimizer=optimizer, scheduler=scheduler, fresh=fresh, saved=saved)
    if is_main:
        for change in plan.changes:
            if change.decision == recipe_module.CHECKPOINT:
                _notify.warn(change.message())
            else:
                _notify.say(change.message())
    return recipe_module.effective(saved, recipe, plan)


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
    fit_state: Mapping[str, Any],
    *,
    rank: int,
    world_size: int,
    epoch_length: int | None,
    grad_accum: int,
    batch_size: int | None = None,
) -> Resumed:
    """The ``"fit"`` entry of a checkpoint, warning where this run differs from the saved one.

    With a recipe in the checkpoint the differences were reported by :func:`restore_weights`;
    a new ``batch_size`` moves a mid-epoch position to the same sample.
    """
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
    saved_recipe = fit_state.get("recipe")
    if isinstance(saved_recipe, Mapping):
        position = resumed.position
        position.batch = recipe_module.samples_to_batches(position.batch, saved_recipe.get("batch_size"), batch_size)
        return resumed
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
    recipe: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The checkpoint fit() writes at a step boundary: what :func:`read_fit_state` reads back."""
    fit_state = {
        "version": CHECKPOINT_VERSION,
        "recipe": recipe,
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
