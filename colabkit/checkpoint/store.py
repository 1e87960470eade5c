"""Checkpoint files on disk: names, manifests, commit, verification, rotation, safe loading.

Layout of a checkpoint folder (flat files, no symlinks, no hard links: Drive has none)::

    step-000000120-1f3a9c0d.pt     the data: one torch.save() file
    step-000000120.json            its manifest (sha256, size, step, metrics, versions)

A checkpoint exists only once its manifest does. The data name carries a random
token, so saving a step again never overwrites the committed file: the manifest is
swapped in one rename and only then is the old data deleted.

:class:`CheckpointListing` reads folders without writing or deleting anything, so
inference can pick the latest or best checkpoint without a :class:`CheckpointManager`.
Loading always uses ``torch.load(weights_only=True)`` after checking the sha256, and
never falls back to unsafe unpickling.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import math
import os
import pickle
import re
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any

import torch

from colabkit import _io, _notify, versions
from colabkit.checkpoint.lease import LEASE_NAME
from colabkit.errors import ArgumentError, CheckpointError, CheckpointNotFoundError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "STALE_SECONDS",
    "CheckpointInfo",
    "CheckpointListing",
    "Retention",
    "Store",
    "load_checkpoint",
    "manifest_extras",
    "warn_old_torch",
]

#: ``format`` field of every manifest.
FORMAT = "colabkit.checkpoint"
FORMAT_VERSION = 1

_DATA_RE = re.compile(r"^step-(\d{9,})-([0-9a-f]{8})\.pt$")
_MANIFEST_RE = re.compile(r"^step-(\d{9,})\.json$")
_TEMP_PID_RE = re.compile(re.escape(_io.TEMP_MARK) + r"(\d+)-")

#: Leftovers of a writer that may still be alive are kept this long before cleanup.
STALE_SECONDS = 600.0


def warn_old_torch() -> None:
    """Tell once, as a log notice, when this torch's weights_only loader is known to be unsafe.

    A notice on the ``colabkit`` logger, not a Python warning: the advice is about the
    user's torch, not their code, so it must not fail a warnings-as-errors test run on a
    torch colabkit supports. Silence it with ``logging.getLogger("colabkit").setLevel(logging.ERROR)``.
    """
    if versions.weights_only_is_safe():
        return
    major, minor = versions.SAFE_WEIGHTS_ONLY
    _notify.log_once(
        "torch-cve-2026-24747",
        f"torch {versions.torch_version_text()} is older than {major}.{minor}: its weights_only loader can be made "
        "to run code by a crafted checkpoint (CVE-2026-24747); only load checkpoints you made yourself, or "
        "upgrade with: pip install -U torch",
    )


def manifest_extras() -> dict[str, Any]:
    """The versions every manifest records."""
    from colabkit import __version__

    return {
        "colabkit_version": __version__,
        "torch_version": versions.torch_version_text(),
        "python_version": ".".join(map(str, sys.version_info[:3])),
    }


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
        return CheckpointListing(target).load(map_location, fix="pass the path of a checkpoint file or save one first")
    if not target.exists():
        raise CheckpointNotFoundError(f"checkpoint {str(target)!r} does not exist; check the path")
    match = _DATA_RE.match(target.name)
    if match is not None:
        store = Store(target.parent)
        found = store.read_manifest(int(match.group(1)), report=True)
        if found is not None and found.path.name == target.name:
            return store.load(found, map_location)
    return _torch_load(target, map_location)


def _torch_load(path: Path, map_location: Any) -> dict[str, Any]:
    warn_old_torch()
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
        mirrored: The mirror folders that confirmed a verified copy (local manifests only):
            a copy that vanished from one of them was deleted there, so the local one is too.
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
    mirrored: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Retention:
    """Which checkpoints rotation keeps: the ``keep_last`` newest and the ``keep_best`` best by ``monitor``."""

    keep_last: int | None
    keep_best: int = 0
    monitor: str | None = None
    mode: str = "min"

    def __post_init__(self) -> None:
        keep_last, keep_best = self.keep_last, self.keep_best
        if keep_last is not None and (isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
            raise ArgumentError(f"keep_last must be an int >= 1 or None (keep all), got {keep_last!r}")
        if isinstance(keep_best, bool) or not isinstance(keep_best, int) or keep_best < 0:
            raise ArgumentError(f"keep_best must be an int >= 0, got {keep_best!r}")
        if self.mode not in ("min", "max"):
            raise ArgumentError(f"mode must be 'min' or 'max', got {self.mode!r}")
        if keep_best and not self.monitor:
            raise ArgumentError(
                f"keep_best={keep_best} needs monitor=<metric name> to rank checkpoints, e.g. monitor='val_loss'"
            )

    def keep(self, infos: list[CheckpointInfo]) -> set[tuple[int, str]]:
        """Identities (step, sha256) that rotation keeps."""
        ordered = Store.ordered(infos)
        kept = {(i.step, i.sha256) for i in (ordered if self.keep_last is None else ordered[: self.keep_last])}
        if self.keep_best and self.monitor:
            kept.update((i.step, i.sha256) for i in _rank_best(infos, self.monitor, self.mode)[: self.keep_best])
        return kept


def _metric(info: CheckpointInfo, monitor: str) -> float | None:
    value = info.metrics.get(monitor)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _rank_best(infos: Iterable[CheckpointInfo], monitor: str, mode: str) -> list[CheckpointInfo]:
    """Checkpoints that recorded ``monitor``, best first; among equals the newest."""
    scored = [(m, i) for i in infos if (m := _metric(i, monitor)) is not None]
    sign = 1.0 if mode == "min" else -1.0
    scored.sort(key=lambda pair: (sign * pair[0], -pair[1].created_ns))
    return [i for _, i in scored]


class _Writer:
    """File object handed to torch.save: every write goes through the fault-injection seam."""

    def __init__(self, handle: IO[bytes]) -> None:
        self._handle = handle

    def write(self, data: bytes) -> int:
        _io.ops.write(self._handle, data)
        return len(data)

    def flush(self) -> None:
        self._handle.flush()


def _os_error_in(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc`` (torch.save re-raises a write error as RuntimeError)."""
    current: BaseException | None = exc
    for _ in range(10):
        if current is None or isinstance(current, OSError):
            return current
        current = current.__cause__ or current.__context__
    return None


class Store:
    """One folder of checkpoints: scan, verify, write, commit, rotate, clean."""

    def __init__(self, root: Path) -> None:
        self.root = root
        # path -> (size, mtime_ns, sha256) already hashed in this process.
        self._verified: dict[str, tuple[int, int, str]] = {}

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    # -- reading

    def manifest_path(self, step: int) -> Path:
        return self.root / f"step-{step:09d}.json"

    def read_manifest(self, step: int, *, report: bool) -> CheckpointInfo | None:
        path = self.manifest_path(step)
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
                mirrored=tuple(str(folder) for folder in data.get("mirrored") or ()),
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

    def new_data_path(self, step: int) -> Path:
        """A fresh data name for ``step`` (never one a committed checkpoint uses)."""
        return self.root / f"step-{step:09d}-{uuid.uuid4().hex[:8]}.pt"

    def write(self, payload: Mapping[str, Any], tmp: Path, step: int) -> None:
        """Serialise ``payload`` to ``tmp`` through the fault-injection seam."""
        try:
            handle = _io.ops.open(tmp, "wb")
            with handle:
                torch.save(payload, _Writer(handle))  # type: ignore[arg-type]
                handle.flush()
        except BaseException as exc:
            with contextlib.suppress(OSError):
                _io.discard(tmp)
            if not isinstance(exc, Exception):
                raise
            cause = _os_error_in(exc)
            raise CheckpointError(
                (cause.errno if cause is not None else None) or errno.EIO,
                f"could not write the checkpoint for step {step} to {self.root}: {cause or exc}; "
                "the previous checkpoints are untouched",
            ) from exc

    def publish(self, tmp: Path, final: Path, **fields: Any) -> CheckpointInfo:
        """Fsync and hash ``tmp``, rename it to ``final`` and describe it (the manifest is not written yet)."""
        digest = hashlib.sha256()
        with open(tmp, "rb") as handle:
            while block := handle.read(_io.CHUNK):
                digest.update(block)
            _io.ops.fsync(handle.fileno())
        size = tmp.stat().st_size
        _io.ops.replace(tmp, final)
        _io.fsync_dir(self.root)
        step = int(fields.pop("step"))
        return CheckpointInfo(
            step=step,
            path=final,
            manifest=self.manifest_path(step),
            size=size,
            sha256=digest.hexdigest(),
            mtime_ns=final.stat().st_mtime_ns,
            **fields,
        )

    def commit(
        self, tmp: Path, final: Path, fields: dict[str, Any], box: list[dict[str, Any]], lock: threading.RLock
    ) -> tuple[CheckpointInfo, CheckpointInfo | None]:
        """Make ``tmp`` the committed checkpoint ``final``; returns it and the one it replaces.

        ``box`` holds the RAM snapshot still to be written (emptied, so it is freed once on disk).
        """
        if box:
            self.write(box.pop(), tmp, fields["step"])
        info = self.publish(tmp, final, **fields)
        with lock:
            previous = self.read_manifest(info.step, report=False)
            self.write_manifest(info)
        return info, previous

    def committed(self, step: int, final: Path) -> CheckpointInfo | None:
        """``final`` as the committed checkpoint of ``step`` when its manifest landed and it checks out."""
        landed = self.read_manifest(step, report=False)
        return landed if landed is not None and landed.path == final and self.problem(landed) is None else None

    def write_manifest(self, info: CheckpointInfo) -> None:
        body = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "step": info.step,
            "epoch": info.epoch,
            "created_ns": info.created_ns,
            "metrics": info.metrics,
            "files": [{"name": info.path.name, "size": info.size, "sha256": info.sha256, "mtime_ns": info.mtime_ns}],
            **manifest_extras(),
        }
        if info.mirrored:
            body["mirrored"] = list(info.mirrored)
        data = json.dumps(body, indent=1, sort_keys=True).encode()
        _io.atomic_write_bytes(self.manifest_path(info.step), data)

    def remove(self, info: CheckpointInfo) -> None:
        """Delete a checkpoint: manifest first, so it is invisible before its data goes.

        Files are emptied before they are unlinked (:func:`colabkit._io.discard`), so
        Drive's trash keeps no bytes of them against the quota.
        """
        _io.discard(info.manifest)
        _io.discard(info.path)
        self._verified.pop(str(info.path), None)

    def mark_mirrored(self, info: CheckpointInfo, folder: Path, lock: threading.RLock) -> None:
        """Record in ``info``'s manifest that ``folder`` holds a verified copy of it."""
        name = str(folder.absolute())
        with lock:
            current = self.read_manifest(info.step, report=False)
            if current is None or current.sha256 != info.sha256 or name in current.mirrored:
                return
            self.write_manifest(dataclasses.replace(current, mirrored=(*current.mirrored, name)))

    def rotate(self, retention: Retention, *, busy: Path | None = None) -> bool:
        """Delete committed checkpoints outside the keep set; True when ``busy`` was due but spared."""
        infos = self.scan(report=False)
        valid = [i for i in infos if self.problem(i, rehash=False) is None]
        keep = retention.keep(valid)
        spared = False
        for info in infos:
            if (info.step, info.sha256) in keep:
                continue
            if info.path == busy:
                spared = True
                continue
            self.remove(info)
        return spared

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
                if not (_DATA_RE.match(base) or _MANIFEST_RE.match(base) or base == LEASE_NAME):
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
                _io.discard(path)
                removed.append(name)
        return removed


class CheckpointListing:
    """Read-only view of checkpoint folders: list, latest, best, load. Never writes or deletes.

    Several folders (a local one and its Drive mirrors) are read together; a
    checkpoint held by several is listed once, from the first folder that has it.

    Args:
        *folders: Checkpoint folders (paths or :class:`Store` objects), preferred first.

    Example:
        >>> best = CheckpointListing("checkpoints").best("val_loss")  # doctest: +SKIP
    """

    def __init__(
        self, *folders: str | os.PathLike[str] | Store, lock: contextlib.AbstractContextManager[Any] | None = None
    ):
        self.stores = [f if isinstance(f, Store) else Store(Path(f).expanduser()) for f in folders]
        # The manager passes its lock: a local scan must not see a commit half-way.
        self._lock = lock if lock is not None else contextlib.nullcontext()

    def candidates(self) -> list[tuple[Store, CheckpointInfo]]:
        """(store, info) pairs newest first; the first folder's copy wins over identical later ones."""
        seen: set[tuple[int, str]] = set()
        found: list[tuple[tuple[int, int, int], Store, CheckpointInfo]] = []
        for rank, store in enumerate(self.stores):
            try:
                if rank == 0:
                    with self._lock:
                        infos = store.scan(report=True)
                else:
                    infos = store.scan(report=True)
            except OSError as exc:
                _notify.warn(f"cannot list mirrored checkpoints in {store.root}: {exc}")
                continue
            for info in infos:
                ident = (info.step, info.sha256)
                if ident not in seen:
                    seen.add(ident)
                    found.append(((info.created_ns, info.step, -rank), store, info))
        found.sort(key=lambda item: item[0], reverse=True)
        return [(store, info) for _, store, info in found]

    def checkpoints(self) -> list[CheckpointInfo]:
        """Every valid checkpoint, oldest first (one entry per step and content)."""
        return [info for store, info in reversed(self.candidates()) if store.problem(info) is None]

    def latest(self) -> CheckpointInfo | None:
        """The newest checkpoint that checks out (size and mtime, else its hash), or None."""
        return _first_valid(self.candidates())

    def best(self, monitor: str, mode: str = "min") -> CheckpointInfo | None:
        """The best checkpoint by ``monitor`` (``mode`` ``"min"`` or ``"max"``) that checks out, or None."""
        pairs = self.candidates()
        store_of = {id(info): store for store, info in pairs}
        ranked = _rank_best((info for _, info in pairs), monitor, mode)
        return _first_valid([(store_of[id(i)], i) for i in ranked])

    def load(self, map_location: Any = "cpu", *, fix: str = "train and save() first") -> dict[str, Any]:
        """The newest checkpoint that loads, falling back to older ones with a warning.

        Raises:
            CheckpointNotFoundError: No checkpoint loads; the message ends with ``fix``.
        """
        for store, info in self.candidates():
            try:
                return store.load(info, map_location)
            except CheckpointError as exc:
                _notify.warn(f"skipping checkpoint {info.path}: {exc}; trying the next older one")
        where = ", ".join(str(s.root) for s in self.stores)
        raise CheckpointNotFoundError(f"no usable checkpoint in {where}; {fix}")


def _first_valid(candidates: Iterable[tuple[Store, CheckpointInfo]]) -> CheckpointInfo | None:
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
