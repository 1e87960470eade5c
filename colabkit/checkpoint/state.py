"""The state inside a checkpoint: check it will load, copy it to RAM, put it back into objects.

:func:`sanitize` refuses what ``torch.load(weights_only=True)`` could not read
back; :func:`snapshot` copies a state to CPU memory so training can go on while
it is written; :func:`unwrap_model` and :func:`strip_wrapper_prefixes` make DDP /
``torch.compile`` models and their state dicts interchangeable; :func:`find_weights`,
:func:`weights_problems` and :func:`load_weights` are the one place that finds a
model's weights in a checkpoint and says why they do not fit; :func:`restore_state`
loads a whole checkpoint into model, optimizer, scheduler and scaler.
"""

from __future__ import annotations

import collections
import copy as copy_module
import sys
from collections.abc import Mapping
from typing import Any

import torch

from colabkit import _io, _notify
from colabkit.errors import ArgumentError, CheckpointMismatchError

__all__ = [
    "MODEL_KEY",
    "OPTIMIZER_KEY",
    "SCALER_KEY",
    "SCHEDULER_KEY",
    "SNAPSHOT_MAX_BYTES",
    "WRAPPER_PREFIXES",
    "clean_metrics",
    "find_weights",
    "load_weights",
    "prepare",
    "ram_available",
    "restore_state",
    "sanitize",
    "snapshot",
    "snapshot_fits",
    "storage_bytes",
    "strip_wrapper_prefixes",
    "unwrap_model",
    "weights_problems",
]

# Keys restore_state() feeds into objects; the rest is handed back to the caller.
MODEL_KEY = "model_state_dict"
OPTIMIZER_KEY = "optimizer_state_dict"
SCHEDULER_KEY = "scheduler_state_dict"
SCALER_KEY = "scaler_state_dict"

#: Keys under which tutorials and trainers store the model's weights, most specific first.
WEIGHT_KEYS = (MODEL_KEY, "model_state", "state_dict", "model", "weights", "net")

#: Prefixes that wrappers add to every key: DataParallel / DDP and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


# --------------------------------------------------------------------------- models and weights


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model inside DDP / DataParallel / ``torch.compile`` wrappers (any nesting).

    Example:
        >>> net = torch.nn.Linear(2, 2)
        >>> unwrap_model(torch.nn.DataParallel(net)) is net
        True
    """
    for _ in range(16):  # guards against a module that wraps itself
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, torch.nn.Module):
            model = inner
            continue
        inner = getattr(model, "module", None)
        if isinstance(inner, torch.nn.Module) and _is_data_parallel(model):
            model = inner
            continue
        break
    return model


def _is_data_parallel(model: torch.nn.Module) -> bool:
    if isinstance(model, torch.nn.DataParallel):
        return True
    try:
        from torch.nn.parallel import DistributedDataParallel
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return isinstance(model, DistributedDataParallel)


def strip_wrapper_prefixes(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """Drop ``module.`` / ``_orig_mod.`` when every key carries it (DDP / compile state dicts).

    ``_metadata`` (per-module versions ``load_state_dict`` reads) is kept, re-keyed.
    """
    keys = list(state_dict)
    prefixes: list[str] = []
    changed = True
    while changed and keys:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(isinstance(k, str) and k.startswith(prefix) for k in keys):
                keys = [k[len(prefix) :] for k in keys]
                prefixes.append(prefix)
                changed = True
    if not prefixes:
        return state_dict
    full = "".join(prefixes)
    stripped: collections.OrderedDict[str, Any] = collections.OrderedDict(
        (k[len(full) :], v) for k, v in state_dict.items()
    )
    metadata = getattr(state_dict, "_metadata", None)
    if isinstance(metadata, Mapping):
        new_meta: dict[str, Any] = {}
        for key, value in metadata.items():
            if key.startswith(full):
                new_meta[key[len(full) :]] = value
            elif full.startswith(key + ".") or key == "":
                new_meta.setdefault("", value)
        stripped._metadata = new_meta  # type: ignore[attr-defined]
    return stripped


def find_weights(state: Any) -> tuple[str | None, Mapping[str, Any]] | None:
    """Where a checkpoint of any common layout keeps the model's weights.

    Returns:
        ``(key, weights)``; ``key`` is None for a bare ``model.state_dict()`` file.
        None when ``state`` holds no weights colabkit recognises.
    """
    if not isinstance(state, Mapping):
        return None
    for key in WEIGHT_KEYS:
        inner = state.get(key)
        if isinstance(inner, Mapping) and inner and all(isinstance(k, str) for k in inner):
            return key, inner
    if state and all(isinstance(v, torch.Tensor) for v in state.values()):
        return None, state
    return None


def weights_problems(model: torch.nn.Module, weights: Mapping[str, Any]) -> list[str]:
    """Why ``weights`` do not fit ``model``: missing and unexpected keys, other shapes; [] when they fit.

    Both sides are normalised first (wrappers unwrapped, wrapper prefixes stripped).
    """
    own = unwrap_model(model).state_dict()
    saved = strip_wrapper_prefixes(weights)
    problems = []
    for label, names in (
        ("missing", sorted(set(own) - set(saved))),
        ("unexpected", sorted(set(saved) - set(own))),
    ):
        if names:
            problems.append(f"{label} keys {names[:6]}{' ...' if len(names) > 6 else ''}")
    for key, value in own.items():
        other = saved.get(key)
        if isinstance(value, torch.Tensor) and isinstance(other, torch.Tensor) and value.shape != other.shape:
            problems.append(f"size mismatch for {key!r}: {list(other.shape)} saved, {list(value.shape)} in the model")
    return problems


def load_weights(
    model: torch.nn.Module,
    weights: Mapping[str, Any],
    *,
    what: str = "the checkpoint's weights",
    fix: str = "build the same model architecture that was saved",
) -> None:
    """Load ``weights`` into ``model`` (wrappers and prefixes normalised), or change nothing.

    Raises:
        CheckpointMismatchError: ``"{what} do not fit {model}: {problems}; {fix}"``.
    """
    target = unwrap_model(model)
    problems = weights_problems(target, weights)
    if not problems:
        try:
            target.load_state_dict(strip_wrapper_prefixes(weights))
            return
        except RuntimeError as exc:
            problems = [str(exc).strip()[:600]]
    raise CheckpointMismatchError(f"{what} do not fit {type(target).__name__}: {'; '.join(problems[:4])}; {fix}")


def restore_state(
    state: Mapping[str, Any],
    *,
    model: torch.nn.Module | None = None,
    optimizer: Any = None,
    scheduler: Any = None,
    scaler: Any = None,
) -> dict[str, Any]:
    """Load a checkpoint dict into objects in place; returns the keys it did not consume.

    ``model`` may be wrapped by DDP or ``torch.compile`` and the saved keys may
    carry ``module.`` / ``_orig_mod.`` prefixes: both sides are normalised. A
    bare ``model.state_dict()`` file is accepted as the model's weights.

    Raises:
        CheckpointMismatchError: The saved weights or optimizer state do not fit.
    """
    rest = dict(state)
    if model is not None:
        found = find_weights(rest)
        if found is None:
            raise CheckpointMismatchError(
                f"the checkpoint has no {MODEL_KEY!r} entry (it has {sorted(map(str, rest))[:8]}); "
                "it was not saved from a model, or pass model=None and read the dict yourself"
            )
        key, weights = found
        rest = {k: v for k, v in rest.items() if k != key} if key is not None else {}
        load_weights(model, weights)
    for key, obj, what in (
        (OPTIMIZER_KEY, optimizer, "optimizer"),
        (SCHEDULER_KEY, scheduler, "scheduler"),
        (SCALER_KEY, scaler, "scaler"),
    ):
        if obj is None:
            continue
        if rest.get(key) is None:
            rest.pop(key, None)
            _notify.warn(f"the checkpoint holds no {key!r}; the {what} keeps its current state")
            continue
        try:
            own = _implementation_flags(obj) if key == OPTIMIZER_KEY else []
            obj.load_state_dict(rest.pop(key))
            for group, flags in zip(getattr(obj, "param_groups", ()), own, strict=False):
                group.update(flags)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointMismatchError(
                f"the checkpoint's {key} does not fit this {what} ({type(obj).__name__}): {exc} -- "
                f"create the {what} for the same parameters and settings that were saved"
            ) from exc
    return rest


#: Optimizer settings that say how this torch runs the update, not what the update is. The
#: optimizer built in this process keeps its own: a checkpoint from a newer torch may say
#: ``fused=True`` where this torch has no fused kernel for the device.
IMPLEMENTATION_FLAGS = ("fused", "foreach")


def _implementation_flags(optimizer: Any) -> list[dict[str, Any]]:
    return [
        {flag: group[flag] for flag in IMPLEMENTATION_FLAGS if flag in group}
        for group in getattr(optimizer, "param_groups", ())
    ]


# --------------------------------------------------------------------------- before saving

#: Largest state copied to RAM so a save returns before it reaches the disk (also capped
#: at 30% of available RAM); larger states are written before save() returns.
SNAPSHOT_MAX_BYTES = 4 * 1024**3


def prepare(
    state: Mapping[str, Any], *, step: int, metrics: Mapping[str, Any] | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """What ``save()`` writes, and the metrics for its manifest.

    The payload has wrapper prefixes stripped, ``step`` and ``metrics`` added, and is
    checked by :func:`sanitize`.

    Raises:
        ArgumentError: ``step``, ``state`` or ``metrics`` is unusable.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ArgumentError(f"step must be an int >= 0, got {step!r}")
    if not isinstance(state, Mapping):
        raise ArgumentError(f"state must be a dict, got {type(state).__name__}; pass e.g. {{'model_state_dict': ...}}")
    clean = clean_metrics(metrics)
    payload = dict(state)
    if isinstance(payload.get(MODEL_KEY), Mapping):
        payload[MODEL_KEY] = strip_wrapper_prefixes(payload[MODEL_KEY])
    payload.setdefault("step", step)
    if clean:
        payload.setdefault("metrics", clean)
    return dict(sanitize(payload)), clean


def snapshot_fits(nbytes: int) -> bool:
    """Whether a RAM copy of a state of ``nbytes`` may sit in memory while it is written."""
    available = ram_available()
    limit = SNAPSHOT_MAX_BYTES if available is None else min(SNAPSHOT_MAX_BYTES, int(available * 0.3))
    if nbytes <= limit:
        return True
    _notify.say_once(
        "ckpt-no-snapshot",
        f"checkpoints of {_io.human_bytes(nbytes)} are too large to copy to RAM first, so each save "
        "waits for the write to local disk",
    )
    return False


_LEAF_TYPES: tuple[type, ...] = (
    type(None),
    bool,
    int,
    float,
    complex,
    str,
    bytes,
    bytearray,
    torch.dtype,
    torch.device,
    torch.Size,
    torch.Tensor,
)


def _numpy() -> Any:
    """numpy when something already imported it (then values may be numpy types), else None."""
    return sys.modules.get("numpy")


def sanitize(obj: Any, where: str = "") -> Any:
    """Check ``obj`` loads under weights_only; numpy scalars become Python numbers.

    Returns ``obj`` itself when nothing changed, so state dicts keep their identity
    (and ``_metadata``).

    Raises:
        ArgumentError: ``obj`` holds something ``torch.load(weights_only=True)`` refuses.
    """
    if isinstance(obj, _LEAF_TYPES):
        return obj
    np = _numpy()
    if np is not None and isinstance(obj, np.generic):
        return obj.item()
    kind = type(obj)
    if kind is dict or kind is collections.OrderedDict:
        out: dict[Any, Any] | None = None
        for key, value in obj.items():
            if not isinstance(key, (str, int, float, bool, type(None))):
                raise ArgumentError(
                    f"state{where} has a key of type {type(key).__name__} ({key!r}); "
                    "use str or int keys so the checkpoint loads with weights_only=True"
                )
            new = sanitize(value, f"{where}[{key!r}]")
            if new is not value and out is None:
                out = kind(obj)
                if hasattr(obj, "_metadata"):
                    setattr(out, "_metadata", obj._metadata)  # noqa: B010 - keeps state-dict versions
            if out is not None:
                out[key] = new
        return obj if out is None else out
    if kind is list or kind is tuple or kind is set:
        items = list(obj)
        new_items = [sanitize(item, f"{where}[{i}]") for i, item in enumerate(items)]
        if all(a is b for a, b in zip(items, new_items, strict=True)):
            return obj
        return kind(new_items)
    if np is not None and isinstance(obj, np.ndarray):
        hint = "torch.from_numpy(array) or array.tolist()"
    elif isinstance(obj, torch.nn.Module):
        hint = "module.state_dict()"
    elif hasattr(obj, "state_dict"):
        hint = "obj.state_dict()"
    else:
        hint = "tensors, numbers, strings, lists and dicts"
    raise ArgumentError(
        f"state{where} is a {kind.__module__}.{kind.__qualname__}, which torch.load(weights_only=True) "
        f"refuses to read back, so the checkpoint could never be restored; store {hint} instead"
    )


def clean_metrics(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    """``save(metrics=...)`` as plain numbers and strings for the manifest.

    Raises:
        ArgumentError: ``metrics`` is not a dict of numbers or strings.
    """
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise ArgumentError(
            f"metrics must be a dict of name -> number, got {type(metrics).__name__}; "
            "pass e.g. metrics={'val_loss': 0.3}"
        )
    clean: dict[str, Any] = {}
    for name, value in metrics.items():
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ArgumentError(f"metrics[{name!r}] is a tensor of shape {tuple(value.shape)}; pass one number")
            value = value.item()
        np = _numpy()
        if np is not None and isinstance(value, np.generic):
            value = value.item()
        if not isinstance(value, (int, float, str, bool, type(None))):
            raise ArgumentError(f"metrics[{name!r}] is a {type(value).__name__}; metrics must be numbers or strings")
        clean[str(name)] = value
    return clean


def storage_bytes(obj: Any, seen: set[int] | None = None) -> int:
    """Roughly how many bytes torch.save will write (tensor storages, once each)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        try:
            storage = obj.untyped_storage()
            key = storage.data_ptr()
            if key in seen:
                return 0
            seen.add(key)
            return int(storage.nbytes())
        except (RuntimeError, NotImplementedError):
            return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(storage_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple, set)):
        return sum(storage_bytes(v, seen) for v in obj)
    return 0


def snapshot(
    obj: Any,
    memo: dict[tuple[Any, ...], torch.Tensor],
    buffers: dict[tuple[Any, ...], torch.Tensor],
    reuse: Mapping[tuple[Any, ...], torch.Tensor],
    where: tuple[Any, ...] = (),
) -> Any:
    """A private copy of a sanitised state: tensors copied to CPU, containers rebuilt.

    The caller keeps training (and mutating its tensors and history lists) while
    the copy is written in the background. Views of one storage (tied weights)
    stay shared so the file does not grow. ``reuse`` holds the previous save's
    CPU tensors by position: copying into them avoids faulting in fresh pages
    (half the cost of a copy); ``buffers`` collects this save's for the next one.
    """
    if isinstance(obj, torch.Tensor):
        key = (
            obj.untyped_storage().data_ptr(),
            obj.device,
            obj.dtype,
            obj.storage_offset(),
            tuple(obj.shape),
            obj.stride(),
        )
        copy = memo.get(key)
        if copy is None:
            old = reuse.get(where)
            source = obj.detach()
            if (
                old is not None
                and old.shape == source.shape
                and old.dtype == source.dtype
                and old.is_contiguous()
                and type(source) is torch.Tensor
            ):
                copy = old.copy_(source)
            else:
                copy = source.to("cpu", copy=True)
            memo[key] = buffers[where] = copy
        return copy
    kind = type(obj)
    if kind is dict or kind is collections.OrderedDict:
        out = kind((key, snapshot(value, memo, buffers, reuse, (*where, key))) for key, value in obj.items())
        if hasattr(obj, "_metadata"):
            setattr(out, "_metadata", copy_module.deepcopy(obj._metadata))  # noqa: B010
        return out
    if kind is list or kind is tuple or kind is set:
        return kind(snapshot(item, memo, buffers, reuse, (*where, i)) for i, item in enumerate(obj))
    if kind is bytearray:
        return bytearray(obj)
    return obj  # immutable leaves: numbers, strings, bytes, dtypes, devices, sizes


def ram_available() -> int | None:
    """Bytes of RAM the kernel says are available (None when unknown)."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
