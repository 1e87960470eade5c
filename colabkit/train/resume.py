"""Resuming fit(): finding, checking and restoring the newest checkpoint, and what a save writes.

The only module of :mod:`colabkit.train` that uses :mod:`colabkit.checkpoint`. A checkpoint holds
model, optimizer, scheduler and scaler states plus ``"fit"``: the run state
(:class:`~colabkit.train.runstate.RunState`, saved and restored whole), whose recipe is what a
rerun is compared against (:func:`restore_weights`, :mod:`colabkit.train.recipe`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from colabkit import _io, _notify
from colabkit import device as _device
from colabkit.checkpoint import CheckpointManager, load_checkpoint, restore_state, weights_problems
from colabkit.checkpoint.compile_cache import CompileCache
from colabkit.errors import CheckpointMismatchError
from colabkit.train import distributed as _dist
from colabkit.train import recipe as recipe_module
from colabkit.train.history import metric_mode
from colabkit.train.options import FitOptions
from colabkit.train.runstate import RunState

__all__ = [
    "check_compatible",
    "checkpoint",
    "describe_run",
    "find_checkpoint",
    "open_compile_cache",
    "open_manager",
    "restore_run",
    "restore_weights",
]


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
        manager.acquire()  # the writer's lease now, not at the first save: a second run is refused before any work
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


def restore_run(
    options: FitOptions,
    manager: CheckpointManager | None,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    train: Any,
    precision: str,
    dist: _dist.DistInfo,
    say: Callable[[str], None],
) -> RunState:
    """Where the run starts: the newest valid checkpoint, checked and restored as the recipe
    comparison decides (model, optimizer, scheduler and scaler in place), else a fresh state.

    The run seed is the checkpoint's, else ``seed=``'s, else derived from torch's initial seed;
    ``train`` (the :class:`~colabkit.train.datapath.Batches`) gets it.
    """
    o = options
    # This call's recipe, saved with every checkpoint (a rerun compares against it).
    recipe = describe_run(
        model=model, optimizer=optimizer, scheduler=scheduler, train=train, grad_accum=o.grad_accum, precision=precision
    )
    checkpoint, path = find_checkpoint(o, manager)
    fit_state = checkpoint.get("fit", {})
    if checkpoint:
        say(f"resuming from {path}")
        check_compatible(checkpoint, model, o.directory)
        recipe = restore_weights(
            checkpoint,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            directory=o.directory,
            recipe=recipe,
            is_main=dist.is_main,
        )
        if not fit_state:
            say("the checkpoint was not written by fit(): starting at epoch 1 from its weights")
    metric_names = [name for name, _ in o.metric_fns]
    if fit_state:
        state = RunState.from_checkpoint(
            fit_state,
            metric_names=metric_names,
            recipe=recipe,
            callbacks=o.callback_list,
            rank=dist.rank,
            world_size=dist.world_size,
        )
        if state.backoff.chunks > 1:
            say(f"resuming with {state.backoff.chunks} micro-batches per batch (after an earlier out-of-memory)")
        if o.seed is not None and o.seed != state.seed:
            say(f"resuming with the checkpoint's seed {state.seed} (seed={o.seed} applies to new runs)")
    else:
        state = RunState(metric_names, recipe, o.callback_list)
        if o.seed is not None:
            state.seed = _device.seed_everything(o.seed)
        else:
            state.seed = int(_dist.broadcast_object(torch.initial_seed() % 2**32))
    train.set_seed(state.seed)
    return state


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
    return recipe_module.describe(
        optimizer=optimizer,
        scheduler=scheduler,
        batch_size=train.batch_size,
        grad_accum=grad_accum,
        precision=precision,
        dataset_length=train.samples,
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
    if not isinstance(saved, Mapping):
        # Saved by a CheckpointManager outside fit() (fit() always saves its recipe): weights only.
        saved = None
    mid_epoch = bool(fit_state.get("position", {}).get("batch"))
    plan = recipe_module.Plan([]) if saved is None else recipe_module.compare(saved, recipe, mid_epoch=mid_epoch)
    for change in plan.refused:
        raise CheckpointMismatchError(
            f"checkpoint_dir={str(directory)!r}: {change.message()}; pass a new checkpoint_dir or resume=False"
        )
    fresh = recipe_module.group_settings(optimizer)
    try:
        restore_state(
            checkpoint,
            model=model,
            optimizer=optimizer if plan.restore_optimizer else None,
            scheduler=scheduler if plan.restore_scheduler else None,
            scaler=scaler if plan.restore_scaler else None,
        )
    except CheckpointMismatchError as exc:
        raise CheckpointMismatchError(
            f"checkpoint_dir={str(directory)!r}: {exc}; pass a new checkpoint_dir or resume=False"
        ) from exc
    if saved is None:
        return recipe
    recipe_module.apply(plan, optimizer=optimizer, scheduler=scheduler, fresh=fresh, saved=saved)
    if is_main:
        for change in plan.changes:
            if change.decision == recipe_module.CHECKPOINT:
                _notify.warn(change.message())
            else:
                _notify.say(change.message())
    return recipe_module.effective(saved, recipe, plan)


def checkpoint(
    fit_state: dict[str, Any], *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any
) -> dict[str, Any]:
    """The checkpoint fit() writes: model, optimizer, scheduler and scaler states, and the run state
    (:meth:`~colabkit.train.runstate.RunState.state_dict`) as ``"fit"``."""
    state: dict[str, Any] = {
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
        "epoch": fit_state["position"]["epoch"],
        "fit": fit_state,
    }
    if scheduler is not None:
        state["scheduler_state_dict"] = scheduler.state_dict()
    if scaler is not None:
        state["scaler_state_dict"] = scaler.state_dict()
    return state
