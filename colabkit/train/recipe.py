"""What a run was trained with, and what a rerun that asks for something else gets.

fit() saves a *recipe* in every checkpoint: a small dict of primitives built by
:func:`describe` from what it was called with (optimizer class and its settings,
scheduler class and its settings, batch size, ``grad_accum``, precision, dataset
length, parameter shapes). At resume :func:`compare` sets the saved recipe
against the current one and decides, per setting, what happens:

=========================  ==========  ===================================================
setting                    decision    what a rerun with a new value gets
=========================  ==========  ===================================================
``lr`` (base lr per group)  new         written into the restored param groups (``lr``,
                                       ``initial_lr``) and the scheduler's ``base_lrs``;
                                       a scheduler keeps its position, scaled to the new
                                       base (no scheduler: exactly the new lr)
weight decay, betas,       new         written into the restored param groups
momentum, eps, other
optimizer settings
optimizer class            new         the new optimizer starts with empty state (the old
                                       one's moments do not fit it); weights, position and
                                       the schedule's progress resume
number of param groups     refuse      the saved optimizer state cannot be mapped: start
                                       over (``resume=False`` or a new ``checkpoint_dir``)
scheduler class (also      new         the new scheduler starts at its beginning from the
added or removed)                      resume point, at its own starting lr
scheduler settings         checkpoint  the saved scheduler state carries them and wins;
(step_size, gamma, T_max,              start over to use the new ones
milestones, total_steps...)
batch size                 new         the new batches from here on; inside an epoch the
                                       position is carried over in samples
``grad_accum``             new         the effective batch changes from the next step on
precision                  new         the new autocast dtype; fp16's loss scale is
                                       restored only when both runs use fp16
dataset length             new         the new data from here on; inside an epoch this one
                                       epoch's order differs from the interrupted run's
parameter shapes           refuse      another model's checkpoint: start over
=========================  ==========  ===================================================

The module is pure: it reads the objects it is given and writes only into the
optimizer and scheduler handed to :func:`apply`; no files, no clock.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = [
    "CHECKPOINT",
    "NEW",
    "REFUSE",
    "Change",
    "Plan",
    "apply",
    "compare",
    "describe",
    "effective",
    "group_settings",
    "samples_to_batches",
]

#: The current call's value applies.
NEW = "new"
#: The checkpoint's value stays; starting over is the way to the new one.
CHECKPOINT = "checkpoint"
#: The checkpoint cannot resume under the new value: an error.
REFUSE = "refuse"

VERSION = 1

START_OVER = "start over with resume=False or a new checkpoint_dir"

# Optimizer group keys that pick an implementation, not the mathematics: never reported.
_IMPLEMENTATION_KEYS = frozenset({"params", "foreach", "fused", "capturable", "differentiable", "initial_lr"})
# Scheduler state that is progress, not a setting.
_SCHEDULER_PROGRESS = frozenset(
    {"base_lrs", "last_epoch", "verbose", "best", "num_bad_epochs", "cooldown_counter", "mode_worse"}
)
_SKIP = object()


def _plain(value: Any) -> Any:
    """``value`` as primitives (lists for tuples, floats for 0-d tensors), or ``_SKIP``."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else _SKIP
    if isinstance(value, Mapping):
        items = {str(key): _plain(item) for key, item in value.items()}
        return _SKIP if any(item is _SKIP for item in items.values()) else items
    if isinstance(value, (list, tuple)):
        parts = [_plain(item) for item in value]
        return _SKIP if any(item is _SKIP for item in parts) else parts
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        try:
            return _plain(value.item())
        except (TypeError, ValueError):
            return _SKIP
    return _SKIP


def _class_name(obj: Any) -> str | None:
    if obj is None:
        return None
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _short(name: Any) -> str:
    return "none" if name is None else str(name).rsplit(".", 1)[-1]


def group_settings(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Each param group's settings as live values, ``base_lr`` included (``initial_lr``, else ``lr``).

    Take them before a checkpoint is restored into the optimizer: :func:`apply`
    writes the ones that changed back.
    """
    groups = []
    for group in optimizer.param_groups:
        settings = {key: value for key, value in group.items() if key != "params"}
        settings["base_lr"] = group.get("initial_lr", group["lr"])
        groups.append(settings)
    return groups


def describe(
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    batch_size: int | None,
    grad_accum: int,
    precision: str,
    dataset_length: int | None,
    model: torch.nn.Module,
) -> dict[str, Any]:
    """The recipe of a run as primitives (safe for ``weights_only`` loading), before any restore."""
    groups = []
    for settings in group_settings(optimizer):
        plain = {}
        for key, value in settings.items():
            if key in _IMPLEMENTATION_KEYS or key == "lr":
                continue  # ``lr`` moves with a schedule; ``base_lr`` is the setting
            converted = _plain(value)
            if converted is not _SKIP:
                plain[key] = converted
        groups.append(plain)
    scheduler_settings: dict[str, Any] = {}
    if scheduler is not None and callable(getattr(scheduler, "state_dict", None)):
        for key, value in scheduler.state_dict().items():
            if key.startswith("_") or key in _SCHEDULER_PROGRESS:
                continue
            converted = _plain(value)
            if converted is not _SKIP:
                scheduler_settings[key] = converted
    return {
        "version": VERSION,
        "optimizer": _class_name(optimizer),
        "groups": groups,
        "scheduler": _class_name(scheduler),
        "scheduler_settings": scheduler_settings,
        "batch_size": batch_size,
        "grad_accum": int(grad_accum),
        "precision": str(precision),
        "dataset_length": dataset_length,
        "parameters": {name: list(param.shape) for name, param in model.named_parameters()},
    }


@dataclasses.dataclass(frozen=True)
class Change:
    """One setting that differs between the checkpoint and this call, and what happens."""

    setting: str
    saved: Any
    current: Any
    decision: str
    note: str

    def message(self) -> str:
        return (
            f"{self.setting} was {_show(self.saved)} when the checkpoint was saved and is "
            f"{_show(self.current)} now: {self.note}"
        )


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list) and all(isinstance(v, float) for v in value):
        return "(" + ", ".join(f"{v:g}" for v in value) + ")"
    return repr(value) if isinstance(value, str) else str(value)


@dataclasses.dataclass
class Plan:
    """What resume does with the saved states, after :func:`compare`.

    Attributes:
        changes: Every difference with its decision, in the order of the table above.
        restore_optimizer: Load the saved optimizer state (False: the optimizer changed class).
        restore_scheduler: Load the saved scheduler state (False: it changed class or was added).
        restore_scaler: Load the saved fp16 loss scale (False: precision changed).
    """

    changes: list[Change]
    restore_optimizer: bool = True
    restore_scheduler: bool = True
    restore_scaler: bool = True

    @property
    def refused(self) -> list[Change]:
        return [change for change in self.changes if change.decision == REFUSE]

    def get(self, setting: str) -> Change | None:
        return next((change for change in self.changes if change.setting == setting), None)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0) or (math.isnan(a) and math.isnan(float(b)))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


def compare(saved: Mapping[str, Any], current: Mapping[str, Any], *, mid_epoch: bool = False) -> Plan:
    """Set a checkpoint's recipe against this call's and decide per setting (see the module table).

    Args:
        saved: The recipe stored in the checkpoint (:func:`describe` of the earlier run).
        current: :func:`describe` of this call, taken before anything was restored.
        mid_epoch: The checkpoint was taken inside an epoch (notes say what that means).
    """
    changes: list[Change] = []
    plan = Plan(changes)

    def differ(key: str) -> bool:
        return key in saved and not _same(saved.get(key), current.get(key))

    optimizer_changed = differ("optimizer")
    if optimizer_changed:
        plan.restore_optimizer = False
        changes.append(
            Change(
                "the optimizer",
                _short(saved["optimizer"]),
                _short(current["optimizer"]),
                NEW,
                f"{_short(current['optimizer'])} starts with empty state ({_short(saved['optimizer'])}'s "
                "moments and buffers do not carry over); weights and progress resume. "
                f"To train with it from the beginning, {START_OVER}",
            )
        )
    saved_groups: Sequence[Mapping[str, Any]] = saved.get("groups", [])
    current_groups: Sequence[Mapping[str, Any]] = current.get("groups", [])
    if len(saved_groups) != len(current_groups):
        if optimizer_changed:
            plan.restore_scheduler = False  # its per-group state has the old group count
        else:
            changes.append(
                Change(
                    "the number of optimizer param groups",
                    len(saved_groups),
                    len(current_groups),
                    REFUSE,
                    f"the saved optimizer state cannot be mapped onto the new groups; {START_OVER}",
                )
            )
    else:
        many = len(current_groups) > 1
        for index, (old, new) in enumerate(zip(saved_groups, current_groups, strict=True)):
            where = f" (param group {index})" if many else ""
            if "base_lr" in old and "base_lr" in new and not _same(old["base_lr"], new["base_lr"]):
                changes.append(
                    Change(
                        f"lr{where}",
                        old["base_lr"],
                        new["base_lr"],
                        NEW,
                        "the new lr applies from here on"
                        + (
                            "; the scheduler keeps its position, scaled to the new base lr"
                            if current.get("scheduler")
                            else ""
                        ),
                    )
                )
            if optimizer_changed:
                continue  # the new optimizer has its own settings anyway
            for key in sorted(set(old) | set(new)):
                if key == "base_lr" or key not in old or key not in new or _same(old[key], new[key]):
                    continue
                changes.append(Change(f"{key}{where}", old[key], new[key], NEW, "the new value applies from here on"))

    if "scheduler" in saved and saved.get("scheduler") != current.get("scheduler"):
        plan.restore_scheduler = False
        if current.get("scheduler") is None:
            note = "the schedule is dropped; training goes on at the optimizer's lr"
        else:
            note = (
                f"{_short(current['scheduler'])} starts at its beginning from this point "
                f"(at its own starting lr); to run it over the whole training, {START_OVER}"
            )
        changes.append(Change("the scheduler", _short(saved["scheduler"]), _short(current["scheduler"]), NEW, note))
    elif plan.restore_scheduler:
        old_settings = saved.get("scheduler_settings", {})
        new_settings = current.get("scheduler_settings", {})
        for key in sorted(set(old_settings) & set(new_settings)):
            if not _same(old_settings[key], new_settings[key]):
                changes.append(
                    Change(
                        f"the scheduler's {key}",
                        old_settings[key],
                        new_settings[key],
                        CHECKPOINT,
                        f"the checkpoint's value wins (the saved scheduler state carries it); to use the new "
                        f"value, {START_OVER}",
                    )
                )

    if differ("batch_size"):
        changes.append(
            Change(
                "batch_size",
                saved["batch_size"],
                current["batch_size"],
                NEW,
                "the new batch size applies from here on"
                + ("; this epoch goes on from the same sample position" if mid_epoch else ""),
            )
        )
    if differ("grad_accum"):
        changes.append(
            Change(
                "grad_accum",
                saved["grad_accum"],
                current["grad_accum"],
                NEW,
                "the new value applies from the next optimizer step; the effective batch size changes",
            )
        )
    if differ("precision"):
        plan.restore_scaler = False
        changes.append(
            Change(
                "precision",
                saved["precision"],
                current["precision"],
                NEW,
                "the new precision applies from here on"
                + ("; fp16's loss scale starts afresh" if current.get("precision") == "fp16" else ""),
            )
        )
    if differ("dataset_length"):
        changes.append(
            Change(
                "the training set's length",
                saved["dataset_length"],
                current["dataset_length"],
                NEW,
                "the new data is used from here on"
                + (
                    "; the interrupted epoch goes on at the checkpoint's position but not in its order "
                    "(a few samples may repeat or be skipped in this one epoch)"
                    if mid_epoch
                    else ""
                ),
            )
        )
    if differ("parameters"):
        old_params: Mapping[str, Any] = saved["parameters"]
        new_params: Mapping[str, Any] = current.get("parameters", {})
        problems = [f"{name!r} is missing" for name in old_params if name not in new_params]
        problems += [f"{name!r} is new" for name in new_params if name not in old_params]
        problems += [
            f"{name!r} is {old_params[name]} there but {new_params[name]} here"
            for name in old_params
            if name in new_params and old_params[name] != new_params[name]
        ]
        changes.append(
            Change(
                "the model's parameters",
                f"{len(old_params)} tensors",
                f"{len(new_params)} tensors",
                REFUSE,
                f"another model's checkpoint ({'; '.join(problems[:3])}); {START_OVER}",
            )
        )
    return plan


def apply(
    plan: Plan,
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    fresh: Sequence[Mapping[str, Any]],
    saved: Mapping[str, Any],
) -> None:
    """Write this call's values into the restored optimizer and scheduler where :func:`compare` said "new".

    Args:
        plan: :func:`compare`'s result.
        optimizer: The optimizer, after the checkpoint was restored into it (or not, per ``plan``).
        scheduler: The scheduler, likewise (or None).
        fresh: :func:`group_settings` of the optimizer taken before the restore.
        saved: The checkpoint's recipe.
    """
    groups = optimizer.param_groups
    if len(groups) != len(fresh):
        return
    saved_groups: Sequence[Mapping[str, Any]] = saved.get("groups", [])
    scheduler_restored = scheduler is not None and plan.restore_scheduler
    last_lrs = getattr(scheduler, "_last_lr", None) if scheduler_restored else None
    base_lrs = getattr(scheduler, "base_lrs", None) if scheduler_restored else None
    for index, (group, new) in enumerate(zip(groups, fresh, strict=True)):
        if plan.restore_optimizer and not plan.restore_scheduler:
            # A new scheduler starts at its beginning: its own starting lr and base, as built.
            for key in ("lr", "initial_lr", "max_lr", "min_lr"):
                if key in new:
                    group[key] = new[key]
        elif plan.restore_optimizer or (scheduler_restored and last_lrs is not None):
            # The schedule's position, scaled from the checkpoint's base lr to this call's.
            old_base = saved_groups[index].get("base_lr") if index < len(saved_groups) else None
            new_base = float(new["base_lr"])
            if plan.restore_optimizer:
                position_lr = float(group["lr"])
            else:
                assert last_lrs is not None
                position_lr = float(last_lrs[index])
            if isinstance(old_base, (int, float)) and old_base > 0:
                lr = position_lr * new_base / float(old_base)
            else:
                lr = new_base
            if plan.restore_optimizer and isinstance(old_base, (int, float)) and _same(float(old_base), new_base):
                lr = position_lr  # unchanged: leave the restored value exactly as saved
            _set_lr(group, lr)
            if "initial_lr" in group:
                group["initial_lr"] = new.get("initial_lr", new_base)
            if base_lrs is not None and index < len(base_lrs):
                base_lrs[index] = new_base
            if last_lrs is not None and index < len(last_lrs):
                last_lrs[index] = lr
        if plan.restore_optimizer:
            for key, value in new.items():
                if key in ("lr", "base_lr") or key in _IMPLEMENTATION_KEYS:
                    continue
                if key in group and not _same(_plain(group[key]), _plain(value)):
                    group[key] = value


def effective(saved: Mapping[str, Any], current: Mapping[str, Any], plan: Plan) -> dict[str, Any]:
    """The recipe a resumed run goes on with: this call's, except where the checkpoint's value won.

    Saved in the run's next checkpoints, so a later rerun compares against what really trains.
    """
    result = dict(current)
    if any(change.decision == CHECKPOINT for change in plan.changes):
        result["scheduler_settings"] = saved.get("scheduler_settings", {})
    return result


def _set_lr(group: dict[str, Any], lr: float) -> None:
    if isinstance(group["lr"], torch.Tensor):
        group["lr"].fill_(lr)  # a tensor lr (capturable/fused optimizers) stays a tensor
    else:
        group["lr"] = lr


def samples_to_batches(batches: int, saved_batch_size: int | None, batch_size: int | None) -> int:
    """A position of ``batches`` batches of ``saved_batch_size`` in batches of ``batch_size``.

    Rounded down, so no sample of the epoch is left out (fewer than one batch repeats).
    """
    if not batches or not saved_batch_size or not batch_size or saved_batch_size == batch_size:
        return batches
    return (batches * saved_batch_size) // batch_size
