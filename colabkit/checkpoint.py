"""Checkpoints that survive disconnects: atomic, verified, rotated, safe to load, mirrored.

Layout of a checkpoint folder (flat files, no symlinks, no hard links: Drive has none)::

    step-000000120-1f3a9c0d.pt     the data: one torch.save() file
    step-000000120.json            its manifest (sha256, size, step, metrics, versions)

A checkpoint exists only once its manifest does. Saving goes: copy the state
to RAM (the only part the caller waits for), then in the background serialise
to a temporary name in the same folder, fsync, hash, rename to the data name,
fsync the folder and write the manifest atomically, last. The data name carries a random token, so
saving a step again never overwrites the committed file: the manifest is
swapped in one rename and only then is the old data deleted. A kill at any
instant therefore leaves every committed checkpoint intact.

With ``mirror=`` (or a ``directory`` on Google Drive, which is then staged on
fast local disk first) each committed checkpoint is copied by a background
thread: temporary name in the target folder, re-read and hash check, rename,
manifest. Failures are retried (errno 5 and 107 included) and reported loudly.

Loading always uses ``torch.load(weights_only=True)`` after checking the
sha256, and never falls back to unsafe unpickling. Everything colabkit itself
stores (RNG states included) is tensors and primitives, so nothing needs
allow-listing.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import copy as copy_module
import dataclasses
import errno
import functools
import hashlib
import json
import math
import os
import pickle
import random
import re
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal, TypeVar

import torch

from colabkit import _io, _notify
from colabkit.errors import (
    ArgumentError,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
)

__all__ = [
    "CheckpointInfo",
    "CheckpointManager",
    "capture_rng_state",
    "load_checkpoint",
    "restore_rng_state",
    "restore_state",
    "unwrap_model",
]

T = TypeVar("T")

#: ``format`` field of every manifest.
FORMAT = "colabkit.checkpoint"
FORMAT_VERSION = 1

_DATA_RE = re.compile(r"^step-(\d{9,})-([0-9a-f]{8})\.pt$")
_MANIFEST_RE = re.compile(r"^step-(\d{9,})\.json$")
_TEMP_PID_RE = re.compile(re.escape(_io.TEMP_MARK) + r"(\d+)-")

#: Leftovers of a writer that may still be alive are kept this long before cleanup.
STALE_SECONDS = 600.0

#: Largest state copied to RAM so a save returns before it reaches the disk (also capped
#: at 30% of available RAM); larger states are written before save() returns.
SNAPSHOT_MAX_BYTES = 4 * 1024**3

#: First torch release whose weights_only unpickler is fixed for CVE-2026-24747.
SAFE_TORCH = (2, 10)

# Keys restore() feeds into objects; the rest is handed back to the caller.
MODEL_KEY = "model_state_dict"
OPTIMIZER_KEY = "optimizer_state_dict"
SCHEDULER_KEY = "scheduler_state_dict"
SCALER_KEY = "scaler_state_dict"

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


# --------------------------------------------------------------------------- seams


def _torch_version() -> str:
    """The installed torch version (a seam: tests pretend to be older)."""
    return str(torch.__version__)


def _now_ns() -> int:
    """Wall clock for manifests; comparable across runtimes, unlike a monotonic clock."""
    return time.time_ns()


def _is_drive_path(path: Path) -> bool:
    """Whether ``path`` lies on Google Drive (colabkit.drive decides)."""
    from colabkit.drive import is_drive_path

    return is_drive_path(path)


def _mirror_retry(fn: Callable[[], T]) -> T:
    """Run one mirror step with Drive's retry policy (remount on errno 107 when available)."""
    from colabkit.drive import drive_retry

    return drive_retry(fn, retries=3)


def _auto_staging(directory: Path) -> Path:
    """Fast local folder that stages checkpoints bound for ``directory``."""
    from colabkit.runtime import runtime

    key = hashlib.sha1(str(directory.absolute()).encode(), usedforsecurity=False).hexdigest()[:12]
    return runtime().data_dir / ".colabkit-checkpoints" / f"{directory.name}-{key}"


# --------------------------------------------------------------------------- safety


def _warn_old_torch() -> None:
    match = re.match(r"(\d+)\.(\d+)", _torch_version())
    if match is None:
        return
    if (int(match.group(1)), int(match.group(2))) < SAFE_TORCH:
        _notify.warn_once(
            "torch-cve-2026-24747",
            f"torch {_torch_version()} is older than 2.10: its weights_only loader can be made to run code "
            "by a crafted checkpoint (CVE-2026-24747); only load checkpoints you made yourself, or upgrade "
            "with: pip install -U torch",
        )


def load_checkpoint(path: str | os.PathLike[str], *, map_location: Any = "cpu") -> dict[str, Any]:
    """Load one checkpoint file safely: hash checked when it has a manifest, never unpickled unsafely.

    Accepts colabkit checkpoints and plain ``torch.save`` files (the PyTorch tutorial
    format, or a bare ``model.state_dict()``); a folder means its newest valid checkpoint.

    Args:
        path: A checkpoint file or a checkpoint folder.
        map_location: Passed to ``torch.load``; ``"cpu"`` avoids surprises on GPU-less machines.

    Returns:
        The saved dict.

    Raises:
        CheckpointNotFoundError: ``path`` does not exist (or the folder holds no valid checkpoint).
        CheckpointError: The file is corrupt, does not match its manifest, or holds objects
            other than tensors and primitives (refused, never executed).

    Example:
        >>> state = load_checkpoint("checkpoints/step-000000100-1f3a9c0d.pt")  # doctest: +SKIP
        >>> model.load_state_dict(state["model_state_dict"])  # doctest: +SKIP
    """
    target = Path(path).expanduser()
    if target.is_dir():
        store = _Store(target)
        for info in store.ordered(store.scan(report=True)):
            try:
                return store.load(info, map_location)
            except CheckpointError as exc:
                _notify.warn(f"skipping checkpoint {info.path}: {exc}")
        raise CheckpointNotFoundError(
            f"no valid checkpoint in {target}; pass the path of a checkpoint file or save one first"
        )
    if not target.exists():
        raise CheckpointNotFoundError(f"checkpoint {str(target)!r} does not exist; check the path")
    match = _DATA_RE.match(target.name)
    if match is not None:
        store = _Store(target.parent)
        found = store.read_manifest(int(match.group(1)), report=True)
        if found is not None and found.path.name == target.name:
            return store.load(found, map_location)
    return _torch_load(target, map_location)


def _torch_load(path: Path, map_location: Any) -> dict[str, Any]:
    _warn_old_torch()
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refused to load {path}: it contains objects other than tensors and primitives, and loading "
            "those can run arbitrary code. colabkit never loads such files unsafely. If you made this file "
            "yourself and trust it, allow the listed classes with torch.serialization.add_safe_globals([...]) "
            f"and retry. Details: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, Mapping):
        raise CheckpointError(
            f"checkpoint {path} holds a {type(state).__name__}, not a dict; colabkit checkpoints are dicts "
            "(save a dict such as {'model_state_dict': model.state_dict()})"
        )
    return dict(state)


# --------------------------------------------------------------------------- state preparation


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model inside DDP / DataParallel / ``torch.compile`` wrappers (any nesting).

    Example:
        >>> net = torch.nn.Linear(2, 2)
        >>> unwrap_model(torch.nn.DataParallel(net)) is net
        True
    """
    seen = 0
    while seen < 16:  # guards against a module that wraps itself
        seen += 1
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


def _strip_wrapper_prefixes(state_dict: Mapping[str, Any]) -> Mapping[str, Any]:
    """Drop ``module.`` / ``_orig_mod.`` when every key carries it (DDP / compile state dicts)."""
    keys = list(state_dict)
    prefixes: list[str] = []
    changed = True
    while changed and keys:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
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
        # load_state_dict reads per-module versions from here, keyed by module path.
        new_meta: dict[str, Any] = {}
        for key, value in metadata.items():
            if key.startswith(full):
                new_meta[key[len(full) :]] = value
            elif full.startswith(key + ".") or key == "":
                new_meta.setdefault("", value)
        stripped._metadata = new_meta  # type: ignore[attr-defined]
    return stripped


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


def _import_numpy() -> Any:
    try:
        import numpy
    except ImportError:
        return None
    return numpy


def _sanitize(obj: Any, where: str) -> Any:
    """Check ``obj`` loads under weights_only; numpy scalars become Python numbers.

    Returns ``obj`` itself when nothing changed, so state dicts keep their identity
    (and ``_metadata``).
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
            new = _sanitize(value, f"{where}[{key!r}]")
            if new is not value and out is None:
                out = kind(obj)
                if hasattr(obj, "_metadata"):
                    setattr(out, "_metadata", obj._metadata)  # noqa: B010 - keeps state-dict versions
            if out is not None:
                out[key] = new
        return obj if out is None else out
    if kind is list or kind is tuple or kind is set:
        items = list(obj)
        new_items = [_sanitize(item, f"{where}[{i}]") for i, item in enumerate(items)]
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


def _storage_bytes(obj: Any, seen: set[int] | None = None) -> int:
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
        return sum(_storage_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple, set)):
        return sum(_storage_bytes(v, seen) for v in obj)
    return 0


def _snapshot(
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
        out = kind((key, _snapshot(value, memo, buffers, reuse, (*where, key))) for key, value in obj.items())
        if hasattr(obj, "_metadata"):
            setattr(out, "_metadata", copy_module.deepcopy(obj._metadata))  # noqa: B010
        return out
    if kind is list or kind is tuple or kind is set:
        return kind(_snapshot(item, memo, buffers, reuse, (*where, i)) for i, item in enumerate(obj))
    if kind is bytearray:
        return bytearray(obj)
    return obj  # immutable leaves: numbers, strings, bytes, dtypes, devices, sizes


def _ram_available() -> int | None:
    """Bytes of RAM the kernel says are available (a seam; None when unknown)."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _clean_metrics(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
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


# --------------------------------------------------------------------------- RNG


def capture_rng_state() -> dict[str, Any]:
    """Every global RNG state, as tensors and primitives only (loads with weights_only=True).

    Covers python ``random``, numpy's legacy global generator (when numpy is
    importable), torch CPU, and each CUDA device once CUDA is initialised
    (capturing never initialises CUDA itself, which would break fork-based launchers).

    Example:
        >>> state = capture_rng_state()
        >>> a = torch.rand(1); restore_rng_state(state); torch.equal(a, torch.rand(1))
        True
    """
    version, internal, gauss_next = random.getstate()
    out: dict[str, Any] = {
        "python": {"version": int(version), "state": [int(x) for x in internal], "gauss_next": gauss_next},
        "torch": torch.get_rng_state(),
    }
    np = _import_numpy()
    if np is not None:
        name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        out["numpy"] = {
            "bit_generator": str(name),
            "state": torch.from_numpy(np.asarray(keys).astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = list(torch.cuda.get_rng_state_all())
    return out


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Put back RNG states made by :func:`capture_rng_state` (missing parts are left alone).

    Raises:
        ArgumentError: ``state`` is not such a dict.
    """
    if not isinstance(state, Mapping):
        raise ArgumentError(f"restore_rng_state() needs the dict capture_rng_state() made, got {type(state).__name__}")
    py = state.get("python")
    if py is not None:
        random.setstate((int(py["version"]), tuple(int(x) for x in py["state"]), py["gauss_next"]))
    if state.get("torch") is not None:
        torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8).cpu())
    npstate = state.get("numpy")
    if npstate is not None:
        np = _import_numpy()
        if np is None:
            _notify.warn_once("rng-numpy-missing", "the checkpoint holds a numpy RNG state but numpy is not installed")
        else:
            keys = torch.as_tensor(npstate["state"]).cpu().numpy().astype(np.uint32)
            np.random.set_state(
                (
                    str(npstate["bit_generator"]),
                    keys,
                    int(npstate["pos"]),
                    int(npstate["has_gauss"]),
                    float(npstate["cached_gaussian"]),
                )
            )
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if len(cuda) != count:
            _notify.warn(
                f"the checkpoint holds RNG states for {len(cuda)} CUDA devices but {count} are visible; "
                "restoring the first ones, so random numbers will not repeat exactly"
            )
        for index, rng in enumerate(list(cuda)[:count]):
            torch.cuda.set_rng_state(torch.as_tensor(rng, dtype=torch.uint8).cpu(), index)


# --------------------------------------------------------------------------- restore


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
        if MODEL_KEY in rest:
            weights = rest.pop(MODEL_KEY)
        elif "state_dict" in rest and isinstance(rest["state_dict"], Mapping):
            weights = rest.pop("state_dict")  # Lightning-style files
        elif rest and all(isinstance(v, torch.Tensor) for v in rest.values()):
            weights, rest = rest, {}  # torch.save(model.state_dict(), path)
        else:
            raise CheckpointMismatchError(
                f"the checkpoint has no {MODEL_KEY!r} entry (it has {sorted(map(str, rest))[:8]}); "
                "it was not saved from a model, or pass model=None and read the dict yourself"
            )
        target = unwrap_model(model)
        try:
            target.load_state_dict(_strip_wrapper_prefixes(weights))
        except RuntimeError as exc:
            raise CheckpointMismatchError(
                f"the checkpoint's weights do not fit {type(target).__name__}: {str(exc).strip()[:600]} -- "
                "build the same model architecture that was saved"
            ) from exc
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
            obj.load_state_dict(rest.pop(key))
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointMismatchError(
                f"the checkpoint's {key} does not fit this {what} ({type(obj).__name__}): {exc} -- "
                f"create the {what} for the same parameters and settings that were saved"
            ) from exc
    return rest


# --------------------------------------------------------------------------- one folder


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """One committed checkpoint, as its manifest describes it.

    Attributes:
        step: The training step it was saved at.
        path: The data file (``torch.load(path)`` works on it).
        manifest: The manifest file next to it.
        size: Bytes of the data file.
        sha256: Hex digest of the data file.
        created_ns: When it was saved (wall clock, ns); orders "newest".
        metrics: The metrics passed to ``save``.
        epoch: ``state["epoch"]`` when it was an int.
        mtime_ns: The data file's mtime recorded at commit (lets ``latest()`` skip re-hashing).
    """

    step: int
    path: Path
    manifest: Path
    size: int
    sha256: str
    created_ns: int
    metrics: dict[str, Any]
    epoch: int | None
    mtime_ns: int | None = None


def _manifest_name(step: int) -> str:
    return f"step-{step:09d}.json"


class _Store:
    """One folder of checkpoints: scan, verify, commit, rotate, clean."""

    def __init__(self, root: Path) -> None:
        self.root = root
        # path -> (size, mtime_ns, sha256) already hashed in this process.
        self._verified: dict[str, tuple[int, int, str]] = {}

    def __repr__(self) -> str:
        return f"_Store({str(self.root)!r})"

    # -- reading

    def read_manifest(self, step: int, *, report: bool) -> CheckpointInfo | None:
        path = self.root / _manifest_name(step)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            data = json.loads(raw)
            if data.get("format") != FORMAT:
                raise ValueError(f"format is {data.get('format')!r}")
            entry = data["files"][0]
            name = str(entry["name"])
            if not _DATA_RE.match(name) or int(data["step"]) != step:
                raise ValueError("names a file that is not this step's")
            epoch = data.get("epoch")
            return CheckpointInfo(
                step=step,
                path=self.root / name,
                manifest=path,
                size=int(entry["size"]),
                sha256=str(entry["sha256"]),
                created_ns=int(data["created_ns"]),
                metrics=dict(data.get("metrics") or {}),
                epoch=epoch if isinstance(epoch, int) else None,
                mtime_ns=int(entry["mtime_ns"]) if entry.get("mtime_ns") is not None else None,
            )
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            if report:
                _notify.warn_once(f"ckpt-manifest:{path}", f"skipping checkpoint manifest {path}: unreadable ({exc})")
            return None

    def scan(self, *, report: bool) -> list[CheckpointInfo]:
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        infos = []
        for name in names:
            match = _MANIFEST_RE.match(name)
            if match:
                info = self.read_manifest(int(match.group(1)), report=report)
                if info is not None:
                    infos.append(info)
        return infos

    @staticmethod
    def ordered(infos: Iterable[CheckpointInfo]) -> list[CheckpointInfo]:
        """Newest first: by save time, then step."""
        return sorted(infos, key=lambda i: (i.created_ns, i.step), reverse=True)

    def problem(self, info: CheckpointInfo, *, full: bool = False, rehash: bool = True) -> str | None:
        """Why ``info`` is unusable, or None when it checks out.

        The cheap check trusts a data file whose size and mtime still equal what
        the manifest recorded right after the commit (the hash was computed then);
        otherwise, or with ``full``, the file is hashed again. ``rehash=False``
        (rotation's bookkeeping) never reads data: a changed mtime alone passes.
        """
        try:
            st = os.stat(info.path)
        except FileNotFoundError:
            return f"its data file {info.path.name} is missing"
        if st.st_size != info.size:
            return f"its data file is {st.st_size} bytes, the manifest says {info.size} (truncated or replaced)"
        key = str(info.path)
        known = self._verified.get(key)
        if not full:
            if info.mtime_ns is not None and st.st_mtime_ns == info.mtime_ns:
                return None
            if known == (st.st_size, st.st_mtime_ns, info.sha256) or not rehash:
                return None
        digest = _io.hash_file(info.path)
        if digest != info.sha256:
            self._verified.pop(key, None)
            return "its sha256 does not match the manifest (corrupted)"
        self._verified[key] = (st.st_size, st.st_mtime_ns, digest)
        return None

    def load(self, info: CheckpointInfo, map_location: Any) -> dict[str, Any]:
        """Hash-check then safely load; raises CheckpointError on any problem."""
        reason = self.problem(info, full=True)
        if reason is not None:
            raise CheckpointError(f"checkpoint {info.path} is unusable: {reason}")
        return _torch_load(info.path, map_location)

    # -- writing

    def write_manifest(self, info: CheckpointInfo, extra: Mapping[str, Any]) -> None:
        body = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "step": info.step,
            "epoch": info.epoch,
            "created_ns": info.created_ns,
            "metrics": info.metrics,
            "files": [{"name": info.path.name, "size": info.size, "sha256": info.sha256, "mtime_ns": info.mtime_ns}],
            **extra,
        }
        data = json.dumps(body, indent=1, sort_keys=True).encode()
        _io.atomic_write_bytes(self.root / _manifest_name(info.step), data)

    def remove(self, info: CheckpointInfo) -> None:
        """Delete a checkpoint: manifest first, so it is invisible before its data goes."""
        with contextlib.suppress(FileNotFoundError):
            info.manifest.unlink()
        with contextlib.suppress(FileNotFoundError):
            info.path.unlink()
        self._verified.pop(str(info.path), None)

    def cleanup(self, *, busy: Iterable[Path] = ()) -> list[str]:
        """Remove our own leftovers: temporaries of dead writers and unreferenced data files."""
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        referenced = {info.path.name for info in self.scan(report=False)}
        busy_names = {p.name for p in busy}
        now = time.time()
        removed = []
        for name in names:
            path = self.root / name
            if _io.is_temp_name(name):
                base = name[1:].split(_io.TEMP_MARK, 1)[0]
                if not (_DATA_RE.match(base) or _MANIFEST_RE.match(base)):
                    continue  # someone else's temporary: not ours to delete
                # Only a name whose writer is known to be dead goes at once; others wait until stale.
                owner_gone = _TEMP_PID_RE.search(name) is not None and not _io.temp_owner_alive(name)
            elif _DATA_RE.match(name) and name not in referenced and name not in busy_names:
                owner_gone = False
            else:
                continue
            try:
                st = path.lstat()
            except FileNotFoundError:
                continue
            if path.is_symlink() or not path.is_file():
                continue  # never follow or delete links or folders (nothing we write is one)
            if owner_gone or now - st.st_mtime > STALE_SECONDS:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                removed.append(name)
        return removed


def _keep(
    infos: list[CheckpointInfo], keep_last: int | None, keep_best: int, monitor: str | None, mode: str
) -> set[tuple[int, str]]:
    """Identities (step, sha256) that rotation keeps."""
    ordered = _Store.ordered(infos)
    keep = ordered if keep_last is None else ordered[:keep_last]
    kept = {(i.step, i.sha256) for i in keep}
    if keep_best and monitor:
        for info in _rank_best(infos, monitor, mode)[:keep_best]:
            kept.add((info.step, info.sha256))
    return kept


def _metric(info: CheckpointInfo, monitor: str) -> float | None:
    value = info.metrics.get(monitor)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _rank_best(infos: Iterable[CheckpointInfo], monitor: str, mode: str) -> list[CheckpointInfo]:
    scored = [(m, i) for i in infos if (m := _metric(i, monitor)) is not None]
    sign = 1.0 if mode == "min" else -1.0
    # Best first; among equals the newest.
    scored.sort(key=lambda pair: (sign * pair[0], -pair[1].created_ns))
    return [i for _, i in scored]


# --------------------------------------------------------------------------- background work


class _Lane:
    """A queue served by one thread that exists only while there is work."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._jobs: collections.deque[Callable[[], None]] = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._last: threading.Thread | None = None

    def submit(self, job: Callable[[], None]) -> None:
        with self._cond:
            self._jobs.append(job)
            if self._thread is not None:
                return  # the running thread picks it up
            thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread = thread
            try:
                _start_thread(thread)
                return
            except RuntimeError:
                # Python 3.12+ refuses new threads once the interpreter is shutting down
                # (atexit flush): do the work in this thread instead of dropping it.
                self._thread = threading.current_thread()
        self._run(inline=True)

    def pending(self) -> int:
        with self._cond:
            return len(self._jobs) + (self._thread is not None)

    def _run(self, *, inline: bool = False) -> None:
        while True:
            with self._cond:
                if not self._jobs:
                    # An inline runner is some caller's thread: nobody may join() it.
                    self._last = None if inline else self._thread
                    self._thread = None
                    self._cond.notify_all()
                    return
                job = self._jobs.popleft()
            try:
                job()
            except BaseException as exc:  # jobs report their own errors; never let the lane die silently
                if inline and not isinstance(exc, Exception):
                    # Ctrl-C in the caller's own thread: give the lane back, then let it through.
                    with self._cond:
                        self._last = self._thread = None
                        self._cond.notify_all()
                    raise
                _notify.logger.exception("colabkit: background checkpoint job failed")

    def join(self) -> None:
        with self._cond:
            if self._thread is threading.current_thread():
                return
            while self._thread is not None:
                self._cond.wait()
            last = self._last
        if last is not None and last is not threading.current_thread():
            last.join()


def _start_thread(thread: threading.Thread) -> None:
    """Start a lane's thread (a seam: tests make it fail as at interpreter shutdown)."""
    thread.start()


class _Writer:
    """File object handed to torch.save: every write goes through the fault-injection seam."""

    def __init__(self, handle: IO[bytes]) -> None:
        self._handle = handle

    def write(self, data: bytes) -> int:
        _io.ops.write(self._handle, data)
        return len(data)

    def flush(self) -> None:
        self._handle.flush()


_LIVE: weakref.WeakSet[CheckpointManager] = weakref.WeakSet()
_ATEXIT = threading.Lock()
_atexit_registered = False


def _flush_all_at_exit() -> None:
    for manager in list(_LIVE):
        try:
            manager.close()
        except Exception as exc:
            _notify.say(f"checkpoints in {manager.directory} may be incomplete at exit: {exc}")


def _forget_in_child() -> None:
    # A forked child (a DataLoader worker, say) has none of the parent's threads:
    # its copies of the managers must not wait for them or write for them.
    for manager in list(_LIVE):
        manager._detach_after_fork()
    _LIVE.clear()


def _register(manager: CheckpointManager) -> None:
    global _atexit_registered
    with _ATEXIT:
        if not _atexit_registered:
            atexit.register(_flush_all_at_exit)
            if hasattr(os, "register_at_fork"):
                os.register_at_fork(after_in_child=_forget_in_child)
            _atexit_registered = True
        _LIVE.add(manager)
    # end_session() waits for pending commits and Drive copies before flushing Drive.
    from colabkit.session import register_waiter

    register_waiter(manager.wait)


# --------------------------------------------------------------------------- the manager


class CheckpointManager:
    """Atomic, verified, rotated checkpoints, optionally mirrored to Drive in the background.

    Args:
        directory: Where checkpoints live. On Google Drive they are written to fast
            local disk first (``staging_dir``) and copied to ``directory`` in the background.
        keep_last: How many newest checkpoints to keep (``None``: all).
        keep_best: How many best checkpoints by ``monitor`` to keep as well.
        monitor: Metric name (a key of ``save(metrics=...)``) that ranks checkpoints.
        mode: ``"min"`` or ``"max"``: whether smaller or larger ``monitor`` is better.
        mirror: Extra folder (or list of folders) every checkpoint is copied to in the
            background, e.g. a Drive folder while ``directory`` is local.
        staging_dir: Local folder for staging when ``directory`` is on Drive; ``"auto"``
            picks one on the runtime's local disk, ``None`` writes to Drive directly.

    Raises:
        ArgumentError: An option has an unusable value.

    Example:
        >>> with CheckpointManager("ckpt", keep_last=2, mirror="/content/drive/MyDrive/run1") as ckpt:
        ...     state = ckpt.restore(model, optimizer)  # {} when there is nothing yet  # doctest: +SKIP
        ...     ckpt.save({"model_state_dict": model.state_dict(), "epoch": 3}, step=300)  # doctest: +SKIP
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        keep_last: int | None = 2,
        keep_best: int = 0,
        monitor: str | None = None,
        mode: Literal["min", "max"] = "min",
        mirror: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | None = None,
        staging_dir: str | os.PathLike[str] | None = "auto",
    ) -> None:
        if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
            raise ArgumentError(f"keep_last must be an int >= 1 or None (keep all), got {keep_last!r}")
        if isinstance(keep_best, bool) or not isinstance(keep_best, int) or keep_best < 0:
            raise ArgumentError(f"keep_best must be an int >= 0, got {keep_best!r}")
        if mode not in ("min", "max"):
            raise ArgumentError(f"mode must be 'min' or 'max', got {mode!r}")
        if keep_best and not monitor:
            raise ArgumentError(
                f"keep_best={keep_best} needs monitor=<metric name> to rank checkpoints, e.g. monitor='val_loss'"
            )
        self.directory = Path(directory).expanduser()
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.monitor = monitor
        self.mode = mode

        targets: list[Path] = []
        if staging_dir is not None and _is_drive_path(self.directory):
            local = _auto_staging(self.directory) if staging_dir == "auto" else Path(staging_dir).expanduser()
            targets.append(self.directory)
        else:
            local = self.directory
        if mirror is not None:
            extra = [mirror] if isinstance(mirror, (str, os.PathLike)) else list(mirror)
            targets.extend(Path(m).expanduser() for m in extra)
        for target in targets:
            if target.absolute() == local.absolute():
                raise ArgumentError(f"mirror={str(target)!r} is the checkpoint folder itself; pass a different folder")
        try:
            local.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CheckpointError(
                exc.errno or errno.EIO, f"cannot create checkpoint folder {local}: {exc}; pick a writable folder"
            ) from exc
        self._local = _Store(local)
        self._remotes = [_Store(t) for t in targets]
        self._lock = threading.RLock()
        self._commit_lane = _Lane("colabkit-checkpoint-commit")
        self._mirror_lane = _Lane("colabkit-checkpoint-mirror")
        self._commit_errors: list[str] = []
        self._mirror_errors: dict[tuple[int, str], str] = {}
        self._copying: Path | None = None  # the local file a mirror copy reads right now
        self._sync_queued = False
        self._rotation_deferred = False
        self._buffers: dict[tuple[Any, ...], torch.Tensor] = {}  # last snapshot's tensors, reused
        self._closed = False
        _warn_old_torch()
        with self._lock:
            self._local.cleanup()
        if self._remotes:
            self._mirror_lane.submit(self._catch_up)
        _register(self)

    # -- public API

    @property
    def local_dir(self) -> Path:
        """The folder written synchronously (``directory``, or its local staging folder)."""
        return self._local.root

    def save(
        self, state: Mapping[str, Any], *, step: int, metrics: Mapping[str, Any] | None = None, blocking: bool = False
    ) -> Path:
        """Save ``state`` as the checkpoint for ``step``.

        The caller waits only while the state is copied to RAM (tensors cloned to
        the CPU, containers rebuilt, so training may go on changing them); writing
        to local disk, the commit (fsync, hash, rename, manifest), rotation and
        mirroring follow in the background. States too large for a RAM copy
        (``SNAPSHOT_MAX_BYTES``, 30% of free RAM) are written to disk before
        ``save`` returns. Until the commit the previous checkpoints stay the newest;
        :meth:`wait` (or ``blocking=True``) waits for it.

        Args:
            state: Dict of tensors, primitives and state dicts. Use the keys
                ``model_state_dict``, ``optimizer_state_dict``, ``epoch`` (the PyTorch
                tutorial format) to make :meth:`restore` and plain ``torch.load`` work.
            step: Training step (>= 0). Saving a step again replaces it once the new one is complete.
            metrics: Numbers recorded in the manifest (and under ``state["metrics"]``); ``monitor`` ranks by them.
            blocking: Wait until the checkpoint is committed locally (and raise if that failed).

        Returns:
            The data file the checkpoint is (or is about to be) committed as.

        Raises:
            ArgumentError: ``state`` holds something weights_only loading could not read back.
            CheckpointError: The write failed, or the previous checkpoint's commit failed.
            InsufficientSpaceError: The local disk cannot hold the checkpoint.
        """
        self._check_open()
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ArgumentError(f"step must be an int >= 0, got {step!r}")
        if not isinstance(state, Mapping):
            raise ArgumentError(
                f"state must be a dict, got {type(state).__name__}; pass e.g. {{'model_state_dict': ...}}"
            )
        clean_metrics = _clean_metrics(metrics)
        payload = dict(state)
        if isinstance(payload.get(MODEL_KEY), Mapping):
            payload[MODEL_KEY] = _strip_wrapper_prefixes(payload[MODEL_KEY])
        payload.setdefault("step", step)
        if clean_metrics:
            payload.setdefault("metrics", clean_metrics)
        payload = _sanitize(payload, "")
        epoch = payload.get("epoch")
        epoch = epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None

        self._commit_lane.join()  # one commit in flight at most
        self._raise_commit_errors()
        nbytes = _storage_bytes(payload)
        _io.ensure_free_space(self._local.root, nbytes, what=f"the checkpoint for step {step}")
        final = self._local.root / f"step-{step:09d}-{uuid.uuid4().hex[:8]}.pt"
        tmp = _io.temp_name(final)
        created = _now_ns()
        # A one-item box, so the commit can drop the RAM copy as soon as it is on disk.
        box: list[dict[str, Any]] = []
        if self._snapshot_fits(nbytes):
            buffers: dict[tuple[Any, ...], torch.Tensor] = {}
            box.append(_snapshot(payload, {}, buffers, self._buffers))
            # Kept after the commit for the next save to copy into (fresh pages cost as much as
            # the copy): one state's worth of RAM, freed by close(). The next save joins this commit first.
            self._buffers = buffers
        else:
            self._buffers = {}
            self._write(payload, tmp, step)
        del payload
        self._commit_lane.submit(lambda: self._commit(tmp, final, step, epoch, created, clean_metrics, box))
        if blocking:
            self._commit_lane.join()
            self._raise_commit_errors()
        return final

    def _snapshot_fits(self, nbytes: int) -> bool:
        """Whether a copy of the state may sit in RAM while it is written in the background."""
        available = _ram_available()
        limit = SNAPSHOT_MAX_BYTES if available is None else min(SNAPSHOT_MAX_BYTES, int(available * 0.3))
        if nbytes <= limit:
            return True
        _notify.say_once(
            "ckpt-no-snapshot",
            f"checkpoints of {_io.human_bytes(nbytes)} are too large to copy to RAM first, so each save "
            "waits for the write to local disk",
        )
        return False

    def _write(self, payload: Mapping[str, Any], tmp: Path, step: int) -> None:
        """Serialise ``payload`` to ``tmp`` through the fault-injection seam."""
        try:
            handle = _io.ops.open(tmp, "wb")
            with handle:
                torch.save(payload, _Writer(handle))  # type: ignore[arg-type]
                handle.flush()
        except BaseException as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if not isinstance(exc, Exception):
                raise
            cause = _os_error_in(exc)
            raise CheckpointError(
                (cause.errno if cause is not None else None) or errno.EIO,
                f"could not write the checkpoint for step {step} to {self._local.root}: {cause or exc}; "
                "the previous checkpoints are untouched",
            ) from exc

    def latest(self) -> Path | None:
        """The newest checkpoint that checks out, or None.

        Checkpoints in the local folder and in mirrors are considered together
        (after a fresh runtime only the Drive copy may exist). Broken ones are
        skipped with a warning naming them.

        Verification is lazy: walking newest to oldest, the first checkpoint whose
        manifest parses and whose data file has the recorded size and mtime wins
        without re-reading it (its sha256 was computed from the committed bytes);
        a changed mtime triggers a full hash, remembered by (size, mtime) for the
        rest of the process. Hashing every candidate would read gigabytes per
        call; a sidecar cache file would be one more thing to keep atomic.
        :meth:`load` always re-checks the full sha256 before unpickling.
        """
        info = self._first_valid(self._candidates())
        return None if info is None else info.path

    def best(self) -> Path | None:
        """The best checkpoint by ``monitor`` that checks out, or None.

        Raises:
            ArgumentError: The manager has no ``monitor``.
        """
        if not self.monitor:
            raise ArgumentError("best() needs CheckpointManager(..., monitor=<metric name>) to rank checkpoints")
        pairs = self._candidates()
        store_of = {id(info): store for store, info in pairs}
        ranked = _rank_best((info for _, info in pairs), self.monitor, self.mode)
        info = self._first_valid([(store_of[id(i)], i) for i in ranked])
        return None if info is None else info.path

    def checkpoints(self) -> list[CheckpointInfo]:
        """Every valid checkpoint, oldest first (one entry per step and content)."""
        valid = []
        for store, info in self._candidates():
            if store.problem(info) is None:
                valid.append(info)
        return list(reversed(valid))

    def load(self, path: str | os.PathLike[str] | None = None, map_location: Any = "cpu") -> dict[str, Any]:
        """Load a checkpoint dict with ``torch.load(weights_only=True)`` after checking its sha256.

        Args:
            path: A checkpoint file (or folder); default: the newest valid one, falling back
                to older ones (with a warning) when it is corrupt or unloadable.
            map_location: Passed to ``torch.load``.

        Raises:
            CheckpointNotFoundError: There is no usable checkpoint.
            CheckpointError: ``path`` is corrupt or holds unsafe objects.
        """
        self._commit_lane.join()
        if path is not None:
            return load_checkpoint(path, map_location=map_location)
        for store, info in self._candidates():
            try:
                return store.load(info, map_location)
            except CheckpointError as exc:
                _notify.warn(f"skipping checkpoint {info.path}: {exc}; trying the next older one")
        raise CheckpointNotFoundError(f"no usable checkpoint in {self._where()}; train and save() first, or pass path=")

    def restore(
        self,
        model: torch.nn.Module | None = None,
        optimizer: Any = None,
        scheduler: Any = None,
        scaler: Any = None,
        path: str | os.PathLike[str] | None = None,
    ) -> dict[str, Any]:
        """Load a checkpoint into the given objects in place; returns the rest of the saved dict.

        Returns an empty dict (and changes nothing) when ``path`` is None and no
        checkpoint exists yet, so ``restore()`` at the top of a script starts fresh
        the first time and resumes afterwards.

        Raises:
            CheckpointMismatchError: The saved state does not fit the objects.
            CheckpointError / CheckpointNotFoundError: As :meth:`load` for an explicit ``path``.
        """
        try:
            state = self.load(path)
        except CheckpointNotFoundError:
            if path is not None:
                raise
            return {}
        return restore_state(state, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)

    def wait(self) -> None:
        """Block until every commit and mirror copy so far is done.

        Mirror copies that failed are tried once more first.

        Raises:
            CheckpointError: A commit or mirror copy failed (each failure is also
                warned about when it happens); the message names them.
        """
        self._commit_lane.join()
        self._mirror_lane.join()
        self._commit_lane.join()
        with self._lock:
            retry = bool(self._mirror_errors) and bool(self._remotes)
        if retry:  # one more pass before giving up: Drive may be back (or remounted) by now
            self._queue_sync()
            self._mirror_lane.join()
        problems = self._take_errors()
        if problems:
            raise CheckpointError(errno.EIO, "; ".join(problems))

    def close(self) -> None:
        """Flush pending work (see :meth:`wait`) and stop accepting saves.

        Interrupted (Ctrl-C while it waits), the manager stays registered so the
        flush at interpreter exit, or another ``close()``, still waits for the copies.
        """
        if self._closed and self not in _LIVE:
            return
        self._closed = True
        self._buffers = {}
        try:
            self.wait()
        except Exception:
            _LIVE.discard(self)  # the failures are reported: nothing left to wait for
            raise
        _LIVE.discard(self)

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except Exception as problem:  # do not mask the error already propagating
            _notify.warn(f"while closing after an error: {problem}")

    def __repr__(self) -> str:
        mirrors = ", ".join(str(s.root) for s in self._remotes)
        return f"CheckpointManager({str(self.directory)!r}, local={str(self._local.root)!r}, mirrors=[{mirrors}])"

    # -- internals

    def _detach_after_fork(self) -> None:
        self._commit_lane = _Lane("colabkit-checkpoint-commit")
        self._mirror_lane = _Lane("colabkit-checkpoint-mirror")
        self._lock = threading.RLock()
        self._buffers = {}
        self._commit_errors = []
        self._mirror_errors = {}  # the parent reports its own failures
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError(errno.EBADF, f"{self!r} is closed; create a new CheckpointManager to save again")

    def _where(self) -> str:
        return ", ".join(str(s.root) for s in [self._local, *self._remotes])

    def _take_errors(self) -> list[str]:
        with self._lock:
            problems = self._commit_errors + list(self._mirror_errors.values())
            self._commit_errors = []
            self._mirror_errors = {}
        return problems

    def _raise_commit_errors(self) -> None:
        with self._lock:
            problems, self._commit_errors = self._commit_errors, []
        if problems:
            raise CheckpointError(errno.EIO, "; ".join(problems))

    def _candidates(self) -> list[tuple[_Store, CheckpointInfo]]:
        """(store, info) pairs newest first; the local copy wins over identical mirrored ones."""
        self._commit_lane.join()
        seen: set[tuple[int, str]] = set()
        found: list[tuple[tuple[int, int, int], _Store, CheckpointInfo]] = []
        with self._lock:
            local = self._local.scan(report=True)
        for rank, (store, infos) in enumerate([(self._local, local), *self._remote_scans()]):
            for info in infos:
                ident = (info.step, info.sha256)
                if ident in seen:
                    continue
                seen.add(ident)
                found.append(((info.created_ns, info.step, -rank), store, info))
        found.sort(key=lambda item: item[0], reverse=True)
        return [(store, info) for _, store, info in found]

    def _remote_scans(self) -> Iterator[tuple[_Store, list[CheckpointInfo]]]:
        for store in self._remotes:
            try:
                yield store, store.scan(report=True)
            except OSError as exc:
                _notify.warn(f"cannot list mirrored checkpoints in {store.root}: {exc}")

    def _first_valid(self, candidates: Iterable[tuple[_Store, CheckpointInfo]]) -> CheckpointInfo | None:
        for store, info in candidates:
            try:
                reason = store.problem(info)
            except OSError as exc:
                reason = f"it cannot be read ({exc})"
            if reason is None:
                return info
            _notify.warn_once(
                f"ckpt-skip:{info.path}:{reason}", f"skipping checkpoint {info.path}: {reason}; using an older one"
            )
        return None

    def _commit(
        self,
        tmp: Path,
        final: Path,
        step: int,
        epoch: int | None,
        created: int,
        metrics: dict[str, Any],
        box: list[dict[str, Any]],
    ) -> None:
        """Background: (write the snapshot,) make the file a committed checkpoint, rotate, mirror."""
        store = self._local
        try:
            if box:
                self._write(box.pop(), tmp, step)  # the RAM copy is freed once written
            digest = hashlib.sha256()
            with open(tmp, "rb") as handle:
                while block := handle.read(_io.CHUNK):
                    digest.update(block)
                _io.ops.fsync(handle.fileno())
            size = tmp.stat().st_size
            _io.ops.replace(tmp, final)
            _io.fsync_dir(store.root)
            info = CheckpointInfo(
                step=step,
                path=final,
                manifest=store.root / _manifest_name(step),
                size=size,
                sha256=digest.hexdigest(),
                created_ns=created,
                metrics=metrics,
                epoch=epoch,
                mtime_ns=final.stat().st_mtime_ns,
            )
            with self._lock:
                previous = store.read_manifest(step, report=False)
                store.write_manifest(info, _versions())
        except BaseException as exc:
            landed = store.read_manifest(step, report=False)
            if landed is not None and landed.path == final and store.problem(landed) is None:
                # Only the fsync after the manifest's rename failed: the checkpoint is complete.
                _notify.warn(f"checkpoint for step {step} is saved but may not be durable yet ({exc})")
                self._after_commit(landed, None)
                return
            for leftover in (tmp, final):
                with contextlib.suppress(OSError):
                    leftover.unlink()
            with self._lock:
                message = (
                    f"checkpoint for step {step} was not saved in {store.root} ({type(exc).__name__}: {exc}); "
                    "the previous checkpoints are untouched. Fix the cause (free disk space, say) and save again"
                )
                self._commit_errors.append(message)
            _notify.warn(message)
            return
        self._after_commit(info, previous)

    def _after_commit(self, info: CheckpointInfo, previous: CheckpointInfo | None) -> None:
        if previous is not None and previous.path.name != info.path.name:
            with contextlib.suppress(OSError):
                previous.path.unlink()
        if self._remotes:
            self._queue_sync()
        self._rotate(self._local)

    def _rotate(self, store: _Store) -> None:
        """Delete checkpoints outside the keep set (only committed ones we wrote)."""
        try:
            with self._lock:
                infos = store.scan(report=False)
                valid = [i for i in infos if store.problem(i, rehash=False) is None]
                keep = _keep(valid, self.keep_last, self.keep_best, self.monitor, self.mode)
                for info in infos:
                    if (info.step, info.sha256) in keep:
                        continue
                    if info.path == self._copying:
                        self._rotation_deferred = True  # the mirror pass rotates once the copy is done
                        continue
                    store.remove(info)
        except OSError as exc:
            _notify.warn(f"could not remove old checkpoints in {store.root}: {exc}")

    def _queue_sync(self) -> None:
        with self._lock:
            if self._sync_queued:
                return  # the queued pass will see this checkpoint too
            self._sync_queued = True
        self._mirror_lane.submit(self._sync)

    def _sync(self) -> None:
        """Background: make every mirror hold the local keep set, newest first.

        One idempotent pass instead of one job per save: a checkpoint superseded
        before its turn is simply no longer in the keep set, a failed or
        interrupted copy is tried again by the next pass (or at the next start).
        """
        with self._lock:
            self._sync_queued = False
            local = [i for i in self._local.scan(report=False) if self._local.problem(i, rehash=False) is None]
            keep = _keep(local, self.keep_last, self.keep_best, self.monitor, self.mode)
            todo = [i for i in _Store.ordered(local) if (i.step, i.sha256) in keep]
        for remote in self._remotes:
            copied = False
            for info in todo:
                key = (info.step, str(remote.root))
                with self._lock:
                    if not info.path.exists():
                        continue  # rotated away meanwhile: superseded
                    self._copying = info.path
                try:
                    copied = self._mirror_one(info, remote) or copied
                except Exception as exc:
                    if isinstance(exc, FileNotFoundError) and not info.path.exists():
                        continue  # re-saved meanwhile (same step, new file): the next pass copies that
                    message = (
                        f"could not copy checkpoint step {info.step} to {remote.root} "
                        f"({type(exc).__name__}: {exc}); the local copy {info.path} is intact "
                        "and the copy is retried at the next save, wait() or close()"
                    )
                    with self._lock:
                        new = key not in self._mirror_errors
                        self._mirror_errors[key] = message
                    if new:
                        _notify.say(message)
                        _notify.warn(message)
                    continue
                finally:
                    with self._lock:
                        self._copying = None
                with self._lock:
                    self._mirror_errors.pop(key, None)
            if copied:  # old ones go only after a newer one is committed there
                self._rotate(remote)
        with self._lock:
            deferred, self._rotation_deferred = self._rotation_deferred, False
        if deferred:
            self._rotate(self._local)

    def _mirror_one(self, info: CheckpointInfo, remote: _Store) -> bool:
        """Copy ``info`` into ``remote`` unless it is there already; True when it copied."""
        existing = _mirror_retry(lambda: remote.read_manifest(info.step, report=False))
        if existing is not None and existing.sha256 == info.sha256 and remote.problem(existing) is None:
            return False
        target = remote.root / info.path.name

        def copy() -> int:
            remote.root.mkdir(parents=True, exist_ok=True)
            tmp = _io.temp_name(target)
            try:
                _io.copy_file(info.path, tmp)
                # Re-read what landed before it takes its final name: FUSE mounts can
                # acknowledge writes they later lose.
                if _io.hash_file(tmp) != info.sha256:
                    raise OSError(errno.EIO, f"copy of {info.path.name} read back with a different sha256")
                _io.ops.replace(tmp, target)
            except BaseException:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise
            _io.fsync_dir(remote.root)
            return target.stat().st_mtime_ns

        try:
            mtime = _mirror_retry(copy)
            copied = dataclasses.replace(
                info, path=target, manifest=remote.root / _manifest_name(info.step), mtime_ns=mtime
            )
            with self._lock:
                previous = remote.read_manifest(info.step, report=False)
            _mirror_retry(lambda: remote.write_manifest(copied, _versions()))
        except BaseException:
            # Half-done copies must not linger: drop the data unless its manifest made it.
            landed = remote.read_manifest(info.step, report=False)
            if landed is None or landed.path != target:
                with contextlib.suppress(OSError):
                    target.unlink()
            raise
        if previous is not None and previous.path.name != target.name:
            with contextlib.suppress(OSError):
                previous.path.unlink()
        return True

    def _catch_up(self) -> None:
        """Background, at start: clean mirror leftovers, then copy what the mirrors lack."""
        for remote in self._remotes:
            try:
                _mirror_retry(functools.partial(remote.cleanup))
            except OSError as exc:
                _notify.warn(f"could not clean leftovers in {remote.root}: {exc}")
        self._sync()


def _os_error_in(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc`` (torch.save re-raises a write error as RuntimeError)."""
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 10:
        if isinstance(current, OSError):
            return current
        current = current.__cause__ or current.__context__
        seen += 1
    return None


def _versions() -> dict[str, Any]:
    from colabkit import __version__

    return {
        "colabkit_version": __version__,
        "torch_version": _torch_version(),
        "python_version": ".".join(map(str, sys.version_info[:3])),
    }
