"""The compile cache that travels with a run's checkpoints (written for fit(compile=...), issue 19).

It knows nothing of fit: it stores and finds bytes by a key of primitives that the caller makes.

After the first compiled step fit saves
torch's cache artifacts (``torch.compiler.save_cache_artifacts()``: inductor,
AOTAutograd, autotuning and, on CUDA, the triton kernels) together with the C++
kernel libraries inductor built for the CPU (which those artifacts do not carry)
in ``<checkpoint_dir>/compile-cache/``, one file per key: torch, triton and Python
versions, device name and capability, the mode, precision and memory format, the
parameters' shapes and dtypes, and the inputs' shapes. A rerun, in a fresh runtime
whose own compile caches are empty, loads the matching file before compiling. A
file made for something else, or damaged, is ignored with a notice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from colabkit import _io, _notify, drive, versions
from colabkit.checkpoint.mirror import Lane, mirror_targets
from colabkit.errors import ChecksumError

__all__ = ["CACHE_FOLDER", "KEEP_FILES", "CacheLoad", "CompileCache", "file_name", "pack", "unpack"]

#: The folder beside the checkpoints that holds the compile cache files.
CACHE_FOLDER = "compile-cache"
#: Cache files kept per folder (one per key: say a T4 session and an A100 session), newest first.
KEEP_FILES = 4

_MAGIC = b"colabkit-compile-cache\n"
_SUFFIX = ".bin"
# Inductor's own cache folders that torch's cache artifacts fill (never copied file by file).
_ARTIFACT_DIRS = frozenset({"fxgraph", "aotautograd", "locks", "triton", "pgo", "autotune"})
# Compiled C++ kernels, their sources and inductor's "it loads" markers: what makes a CPU rerun fast.
_KERNEL_ENDINGS = (".so", ".cpp", ".so.load_ok")


def file_name(key: Mapping[str, Any]) -> str:
    """The cache file's name for ``key``: a hash of it."""
    text = json.dumps(key, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:20] + _SUFFIX


def pack(key: Mapping[str, Any], artifacts: list[bytes], files: list[tuple[str, bytes]]) -> bytes:
    """One cache file: a header (key, sizes, sha256 of the payload), then the artifacts and the kernel files.

    ``artifacts`` holds what ``torch.compiler.save_cache_artifacts()`` returned, one part per
    call (see :class:`CompileCache`): each is loaded by a call of its own.
    """
    payload = b"".join(artifacts) + b"".join(data for _, data in files)
    header = {
        "version": 1,
        "key": dict(key),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "artifacts": [len(part) for part in artifacts],
        "files": [[name, len(data)] for name, data in files],
    }
    raw = json.dumps(header, sort_keys=True).encode()
    return _MAGIC + len(raw).to_bytes(8, "little") + raw + payload


def _header(blob: bytes) -> tuple[dict[str, Any], int]:
    if not blob.startswith(_MAGIC) or len(blob) < len(_MAGIC) + 8:
        raise ChecksumError("not a colabkit compile cache")
    start = len(_MAGIC) + 8
    size = int.from_bytes(blob[len(_MAGIC) : start], "little")
    try:
        header = json.loads(blob[start : start + size])
    except ValueError as exc:
        raise ChecksumError(f"unreadable header ({exc})") from None
    if not isinstance(header, dict) or header.get("version") != 1 or not isinstance(header.get("key"), dict):
        raise ChecksumError("unknown header")
    return header, start + size


def unpack(blob: bytes) -> tuple[dict[str, Any], list[bytes], list[tuple[str, bytes]]]:
    """The key, the artifacts and the kernel files of a cache file, checked against its sha256.

    Raises:
        ChecksumError: The file is truncated, altered or not a cache file (always caught: the
            run then compiles afresh).
    """
    header, start = _header(blob)
    payload = blob[start:]
    if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
        raise ChecksumError("its content does not match its sha256 (truncated or altered)")
    artifacts, offset, files = [], 0, []
    for length in header["artifacts"]:
        artifacts.append(payload[offset : offset + int(length)])
        offset += int(length)
    for name, length in header["files"]:
        path = PurePosixPath(str(name))
        if path.is_absolute() or ".." in path.parts or not path.parts:
            raise ChecksumError(f"a kernel file name points outside the cache folder: {name!r}")
        files.append((str(path), payload[offset : offset + int(length)]))
        offset += int(length)
    if offset != len(payload):
        raise ChecksumError("its sizes do not add up")
    return header["key"], artifacts, files


def _inductor_dir() -> Path:
    return Path(versions.inductor_cache_dir())


def _kernel_files(root: Path) -> set[str]:
    """Inductor's compiled C++ kernels under ``root`` (relative POSIX names)."""
    found: set[str] = set()
    for folder, dirs, names in os.walk(root):
        if Path(folder) == root:
            dirs[:] = [d for d in dirs if d not in _ARTIFACT_DIRS]
        for name in names:
            if name.endswith(_KERNEL_ENDINGS):
                found.add(Path(folder, name).relative_to(root).as_posix())
    return found


def _differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> str:
    parts = []
    for field in ("torch", "triton", "python", "device", "capability", "mode", "precision", "channels_last"):
        if saved.get(field) != current.get(field):
            parts.append(f"{field} {saved.get(field)} (here {current.get(field)})")
    for field, words in (("model", "another model"), ("parameters", "other parameter shapes")):
        if saved.get(field) != current.get(field):
            parts.append(words)
    if saved.get("inputs") != current.get("inputs") or saved.get("batch_size") != current.get("batch_size"):
        parts.append(f"other input shapes or batch size ({saved.get('batch_size')}, here {current.get('batch_size')})")
    return ", ".join(parts[:4]) or "other settings"


@dataclasses.dataclass
class CacheLoad:
    """What loading found: a notice for the user, and what was put in place."""

    notice: str
    artifacts: frozenset[str] = frozenset()
    files: frozenset[str] = frozenset()
    parts: tuple[bytes, ...] = ()


class CompileCache:
    """The compile cache files in a run's checkpoint folder (local, and its Drive copy).

    Args:
        local: The folder written synchronously (read first).
        mirrors: Folders (Drive) the file is copied to in the background (read when local has none).
        writes: Whether this process writes them (rank 0).
    """

    @classmethod
    def beside(cls, directory: Path, *, writes: bool) -> CompileCache:
        """The cache of the checkpoints in ``directory``, staged as CheckpointManager stages them."""
        local, mirrors = mirror_targets(directory, "auto", None)
        return cls(local=local, mirrors=mirrors, writes=writes)

    def __init__(self, *, local: Path, mirrors: list[Path], writes: bool) -> None:
        self.local = local / CACHE_FOLDER
        self.mirrors = [m / CACHE_FOLDER for m in mirrors]
        self.writes = writes
        self.lane = Lane("colabkit-compile-cache")
        self.loaded = CacheLoad("")
        self.saved_artifacts: frozenset[str] = frozenset()
        self.saved_files: frozenset[str] = frozenset()
        self.kernels_before: set[str] = set()
        # What torch's serializer returned at each save with something new. It appends to one
        # stream, but loading a stream keeps only the last entry of each kind of artifact
        # (inductor, AOTAutograd, ...); loading every save's stream covers them all.
        self.parts: list[bytes] = []

    @property
    def notice(self) -> str:
        """What the last :meth:`load` found, in words."""
        return self.loaded.notice

    def load(self, key: Mapping[str, Any]) -> CacheLoad:
        """Put the matching cache file's artifacts and kernels in place before anything compiles."""
        self.loaded = self._load(key)
        if versions.compile_cache_artifacts():
            with contextlib.suppress(OSError):
                self.kernels_before = _kernel_files(_inductor_dir())
        return self.loaded

    def _load(self, key: Mapping[str, Any]) -> CacheLoad:
        if not versions.compile_cache_artifacts():
            return CacheLoad(f"compile cache: off (torch {torch.__version__} cannot carry compiled artifacts)")
        name = file_name(key)
        others: list[Path] = []
        for folder in (self.local, *self.mirrors):
            path = folder / name
            try:
                blob = drive.drive_retry(path.read_bytes)
            except FileNotFoundError:
                with contextlib.suppress(OSError):
                    others += [p for p in folder.glob(f"*{_SUFFIX}") if p.name != name]
                continue
            except OSError as exc:
                return CacheLoad(f"compile cache {path} could not be read ({exc}); compiling afresh")
            try:
                return self._put_in_place(path, key, blob)
            except ChecksumError as exc:
                return CacheLoad(f"compile cache {path} is damaged ({exc}); ignored, compiling afresh")
        if not others:
            return CacheLoad("compile cache: none yet; saved beside the checkpoints after the first step")
        newest = max(others, key=_mtime)
        try:
            saved_key = _header(newest.read_bytes())[0]["key"]
        except (OSError, ChecksumError) as exc:
            return CacheLoad(f"compile cache {newest} is damaged ({exc}); ignored, compiling afresh")
        return CacheLoad(
            f"compile cache {newest} was made for {_differences(saved_key, key)}; not used, compiling afresh"
        )

    def _put_in_place(self, path: Path, key: Mapping[str, Any], blob: bytes) -> CacheLoad:
        saved_key, artifacts, files = unpack(blob)
        if saved_key != dict(key):
            raise ChecksumError("its key does not match its name")
        root = _inductor_dir()
        placed = set()
        for name, data in files:
            target = root / name
            try:
                if not target.exists():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    _io.atomic_write_bytes(target, data, durable=False)
                placed.add(name)
            except OSError as exc:
                return CacheLoad(f"compile cache {path}: kernels could not be written to {root} ({exc}); compiling")
        keys: set[str] = set()
        for part in artifacts:
            try:
                info = torch.compiler.load_cache_artifacts(part)
            except Exception as exc:  # torch refuses what it cannot use; never a reason to fail the run
                return CacheLoad(f"compile cache {path} was refused by torch ({type(exc).__name__}: {exc}); compiling")
            if info is None:
                return CacheLoad(f"compile cache {path} was refused by torch; compiling afresh")
            keys.update(k for names in info.artifacts.values() for k in names)
        return CacheLoad(
            f"compile cache: loaded {path} ({_io.human_bytes(len(blob))}, {len(keys)} artifacts, "
            f"{len(placed)} kernel files)",
            artifacts=frozenset(keys),
            files=frozenset(placed),
            parts=tuple(artifacts),
        )

    def save(self, key: Mapping[str, Any]) -> str:
        """Write what this process compiled (if anything new) beside the checkpoints; returns a notice or ""."""
        if not self.writes or not versions.compile_cache_artifacts():
            return ""
        try:
            result = torch.compiler.save_cache_artifacts()
        except Exception as exc:  # a cache that cannot be made only costs the next run a compile
            return f"compile cache: not saved, torch could not serialise it ({type(exc).__name__}: {exc})"
        if result is None:
            return ""
        everything, info = result
        keys = frozenset(k for names in info.artifacts.values() for k in names)
        try:
            root = _inductor_dir()
            names = sorted((_kernel_files(root) - self.kernels_before) | self.loaded.files)
            if (
                keys <= self.loaded.artifacts | self.saved_artifacts
                and set(names) <= self.loaded.files | self.saved_files
            ):
                return ""  # the file there already holds all of it
            files = [(name, (root / name).read_bytes()) for name in names]
        except OSError as exc:
            return f"compile cache: not saved, inductor's kernels could not be read ({exc})"
        self.parts.append(everything)
        blob = pack(key, [*self.loaded.parts, *self.parts], files)
        name = file_name(key)
        try:
            self.local.mkdir(parents=True, exist_ok=True)
            _io.atomic_write_bytes(self.local / name, blob)
            _prune(self.local)
        except OSError as exc:
            return f"compile cache: could not be written to {self.local} ({exc}); the next run compiles afresh"
        self.saved_artifacts, self.saved_files = keys, frozenset(names)
        for mirror in self.mirrors:
            self.lane.submit(functools.partial(_copy, blob, mirror, name))
        return f"compile cache: saved {self.local / name} ({_io.human_bytes(len(blob))})"

    def close(self) -> None:
        """Wait for the Drive copies."""
        self.lane.join_recovering()


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _prune(folder: Path) -> None:
    files = sorted(folder.glob(f"*{_SUFFIX}"), key=_mtime, reverse=True)
    for old in files[KEEP_FILES:]:
        with contextlib.suppress(OSError):
            _io.discard(old)


def _copy(blob: bytes, folder: Path, name: str) -> None:
    """Background: the cache file onto Drive, atomically (a failure only costs the next runtime a compile)."""

    def write() -> None:
        folder.mkdir(parents=True, exist_ok=True)
        _io.atomic_write_bytes(folder / name, blob)
        _prune(folder)

    try:
        drive.drive_retry(write)
    except OSError as exc:
        _notify.say(f"compile cache: not copied to {folder} ({exc}); a rerun in a fresh runtime compiles afresh")
