"""fit(compile=...): the model through ``torch.compile``, safe to capture, with a compile cache kept by the run.

Modes (:func:`parse_compile`, :func:`plan_compile`):

============================  ==========================================================
``compile=``                  what runs
============================  ==========================================================
``False``                     eager
``True`` / ``"default"``      ``torch.compile`` default mode: fused kernels
``"reduce-overhead"``         CUDA graphs: a whole forward / backward is one launch; on
                              a CPU or MPS device (no CUDA graphs) the default mode
``"max-autotune"``            autotuned kernels, CUDA graphs on CUDA; elsewhere without
============================  ==========================================================

The compiled model (:class:`CompiledModel`) is built with ``dynamic=False``: one graph
per batch shape. Batches of the run's full size (and the micro-batches an
out-of-memory back-off cuts them into) run compiled; any other size, such as an
epoch's last partial batch, runs the same module eagerly. Nothing is dropped or
padded, so sample counts, the data order and exact resume are those of eager
training, and a partial batch neither recompiles nor breaks a CUDA graph. Under
CUDA graphs the gradients live in buffers allocated outside the graphs and zeroed
in place (:attr:`CompiledModel.keeps_grads`), so accumulation over several
backward passes adds into memory no later graph replay overwrites.

The compile cache (:class:`CompileCache`): after the first compiled step fit saves
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
import platform
import time
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from colabkit import _io, _notify, drive
from colabkit.checkpoint.mirror import Lane, mirror_targets
from colabkit.errors import ArgumentError
from colabkit.train.oom import batch_length, split_batch

__all__ = [
    "CACHE_FOLDER",
    "MODES",
    "CompileCache",
    "CompilePlan",
    "CompiledModel",
    "cache_key",
    "compile_model",
    "file_name",
    "pack",
    "parse_compile",
    "plan_compile",
    "unpack",
]

#: The values ``fit(compile=...)`` takes.
MODES: tuple[Any, ...] = (False, True, "default", "reduce-overhead", "max-autotune")
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


def parse_compile(value: Any) -> str | None:
    """``fit(compile=...)`` as a mode name (``"default"``, ``"reduce-overhead"``, ``"max-autotune"``), or None.

    Raises:
        ArgumentError: ``value`` is not one of :data:`MODES`.
    """
    if value is False or value is None:
        return None
    if value is True:
        return "default"
    if isinstance(value, str) and value in MODES:
        return value
    raise ArgumentError(
        f"compile={value!r} is not a compile mode; use one of "
        f"{', '.join(map(repr, MODES))} (True = torch.compile's default mode, "
        "'reduce-overhead' = CUDA graphs, 'max-autotune' = autotuned kernels)"
    )


@dataclasses.dataclass(frozen=True)
class CompilePlan:
    """How a mode is compiled on a device.

    Attributes:
        mode: The mode asked for (:func:`parse_compile`).
        torch_mode: The ``mode=`` given to ``torch.compile`` (None: its default).
        cuda_graphs: Whether CUDA graphs capture the compiled steps.
        note: Why the device changed what runs (empty when nothing changed).
    """

    mode: str
    torch_mode: str | None
    cuda_graphs: bool
    note: str = ""

    def describe(self) -> str:
        what = {
            "default": "torch.compile's default mode",
            "reduce-overhead": "mode='reduce-overhead' (CUDA graphs)",
            "max-autotune": "mode='max-autotune'" + (" with CUDA graphs" if self.cuda_graphs else ""),
        }[self.mode]
        return what + (f"; {self.note}" if self.note else "")


def plan_compile(mode: str, device: torch.device) -> CompilePlan:
    """What ``mode`` compiles to on ``device``: CUDA graphs exist only on CUDA."""
    cuda = device.type == "cuda"
    if mode == "default":
        return CompilePlan(mode, None, cuda_graphs=False)
    if mode == "reduce-overhead":
        if cuda:
            return CompilePlan(mode, "reduce-overhead", cuda_graphs=True)
        return CompilePlan(
            mode, None, cuda_graphs=False, note=f"CUDA graphs need a CUDA GPU, so on {device.type} the default mode"
        )
    if cuda:
        return CompilePlan(mode, "max-autotune", cuda_graphs=True)
    return CompilePlan(
        mode,
        "max-autotune-no-cudagraphs",
        cuda_graphs=False,
        note=f"CUDA graphs need a CUDA GPU, so on {device.type} autotuned kernels only",
    )


# --------------------------------------------------------------------------- the cache


def _versions() -> dict[str, Any]:
    try:
        import triton

        triton_version: str | None = str(triton.__version__)
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version, "python": platform.python_version()}


def _device_facts(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return {"device": torch.cuda.get_device_name(index), "capability": f"{major}.{minor}"}
    return {"device": device.type, "capability": platform.machine()}


def _inputs(value: Any) -> Any:
    """The inputs' structure with per-sample shapes and dtypes (the batch size is keyed separately)."""
    if isinstance(value, torch.Tensor):
        return [list(value.shape[1:]), str(value.dtype).replace("torch.", "")]
    if isinstance(value, Mapping):
        return {str(key): _inputs(item) for key, item in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_inputs(item) for item in value]
    return type(value).__name__


def cache_key(
    *,
    model: torch.nn.Module,
    inputs: Any,
    batch_size: int | None,
    plan: CompilePlan,
    precision: str,
    channels_last: bool,
    device: torch.device,
) -> dict[str, Any]:
    """What a compiled graph depends on, as primitives: a cache file serves only an equal key."""
    return {
        **_versions(),
        **_device_facts(device),
        "mode": plan.mode,
        "torch_mode": plan.torch_mode,
        "precision": precision,
        "channels_last": channels_last,
        "model": type(model).__qualname__,
        "parameters": [[name, list(p.shape), str(p.dtype), p.requires_grad] for name, p in model.named_parameters()],
        "inputs": _inputs(inputs),
        "batch_size": batch_size,
    }


def file_name(key: Mapping[str, Any]) -> str:
    """The cache file's name for ``key``: a hash of it."""
    text = json.dumps(key, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:20] + _SUFFIX


class DamagedCacheError(ValueError):
    """A cache file that cannot be read back (local to this module: always caught and reported)."""


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
        raise DamagedCacheError("not a colabkit compile cache")
    start = len(_MAGIC) + 8
    size = int.from_bytes(blob[len(_MAGIC) : start], "little")
    try:
        header = json.loads(blob[start : start + size])
    except ValueError as exc:
        raise DamagedCacheError(f"unreadable header ({exc})") from None
    if not isinstance(header, dict) or header.get("version") != 1 or not isinstance(header.get("key"), dict):
        raise DamagedCacheError("unknown header")
    return header, start + size


def unpack(blob: bytes) -> tuple[dict[str, Any], list[bytes], list[tuple[str, bytes]]]:
    """The key, the artifacts and the kernel files of a cache file, checked against its sha256.

    Raises:
        DamagedCacheError: The file is truncated, altered or not a cache file.
    """
    header, start = _header(blob)
    payload = blob[start:]
    if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
        raise DamagedCacheError("its content does not match its sha256 (truncated or altered)")
    artifacts, offset, files = [], 0, []
    for length in header["artifacts"]:
        artifacts.append(payload[offset : offset + int(length)])
        offset += int(length)
    for name, length in header["files"]:
        path = PurePosixPath(str(name))
        if path.is_absolute() or ".." in path.parts or not path.parts:
            raise DamagedCacheError(f"a kernel file name points outside the cache folder: {name!r}")
        files.append((str(path), payload[offset : offset + int(length)]))
        offset += int(length)
    if offset != len(payload):
        raise DamagedCacheError("its sizes do not add up")
    return header["key"], artifacts, files


def _inductor_dir() -> Path:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir())


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
        folders: Where cache files are read from, first match wins (the local folder first).
        writes: Whether this process writes them (rank 0).
        local: The folder written synchronously.
        mirrors: Folders (Drive) the file is copied to in the background.
    """

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

    def load(self, key: Mapping[str, Any]) -> CacheLoad:
        """Put the matching cache file's artifacts and kernels in place before anything compiles."""
        self.loaded = self._load(key)
        with contextlib.suppress(OSError):
            self.kernels_before = _kernel_files(_inductor_dir())
        return self.loaded

    def _load(self, key: Mapping[str, Any]) -> CacheLoad:
        if not hasattr(torch.compiler, "load_cache_artifacts"):
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
            except DamagedCacheError as exc:
                return CacheLoad(f"compile cache {path} is damaged ({exc}); ignored, compiling afresh")
        if not others:
            return CacheLoad("compile cache: none yet; saved beside the checkpoints after the first step")
        newest = max(others, key=_mtime)
        try:
            saved_key = _header(newest.read_bytes())[0]["key"]
        except (OSError, DamagedCacheError) as exc:
            return CacheLoad(f"compile cache {newest} is damaged ({exc}); ignored, compiling afresh")
        return CacheLoad(
            f"compile cache {newest} was made for {_differences(saved_key, key)}; not used, compiling afresh"
        )

    def _put_in_place(self, path: Path, key: Mapping[str, Any], blob: bytes) -> CacheLoad:
        saved_key, artifacts, files = unpack(blob)
        if saved_key != dict(key):
            raise DamagedCacheError("its key does not match its name")
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
        if not self.writes or not hasattr(torch.compiler, "save_cache_artifacts"):
            return ""
        result = torch.compiler.save_cache_artifacts()
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


# --------------------------------------------------------------------------- the compiled model


class CompiledModel:
    """The model through ``torch.compile``, called as the model is; off-size batches run eagerly.

    Args:
        model: What runs the forward pass (the model, or its DDP wrapper).
        plan: :func:`plan_compile`'s result.
        batch_size: Samples in a full batch (None: the first batch seen sets it).
        cache: Where compiled artifacts are loaded from and saved to (None: no cache).
        key: The cache key of the first compiled inputs and the full batch size.
        clock: The loop's clock.
    """

    def __init__(
        self,
        model: Any,
        plan: CompilePlan,
        *,
        batch_size: int | None,
        cache: CompileCache | None,
        key: Callable[[Any, int | None], dict[str, Any]],
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.model = model
        self.plan = plan
        self.compiled = torch.compile(model, mode=plan.torch_mode, dynamic=False)
        self.batch_size = batch_size
        self.sizes: frozenset[int] = frozenset()
        self.chunks = 0
        self.cache = cache
        self._key_of = key
        self.key: dict[str, Any] | None = None
        self._clock = clock
        self.started: float | None = None  # when the first compiled call began
        self.compile_seconds: float | None = None
        self.eager_calls = 0
        self.compiled_calls = 0

    @property
    def keeps_grads(self) -> bool:
        """Whether gradients stay allocated (zeroed in place): CUDA graphs must not own them."""
        return self.plan.cuda_graphs

    def set_chunks(self, chunks: int) -> None:
        """The micro-batches a full batch is cut into (out-of-memory back-off): their sizes run compiled."""
        if chunks != self.chunks and self.batch_size is not None:
            self.chunks = chunks
            self.sizes = frozenset(size for _, size in split_batch(None, chunks, self.batch_size))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        size = batch_length((args, kwargs))
        if self.batch_size is None and size is not None:
            self.batch_size = size  # a loader of unknown batch size: its first batch is the full one
            self.set_chunks(max(self.chunks, 1))
        if size not in self.sizes:
            self.eager_calls += 1
            return self.model(*args, **kwargs)
        if self.started is None:
            self.key = self._key_of((args, kwargs), self.batch_size)
            if self.cache is not None:
                self.cache.load(self.key)
            self.started = self._clock()
        if self.plan.cuda_graphs:
            if torch.is_grad_enabled():
                _allocate_grads(self.model)
            torch.compiler.cudagraph_mark_step_begin()  # the last call's outputs were read already
        self.compiled_calls += 1
        return self.compiled(*args, **kwargs)

    def no_sync(self) -> Any:
        return self.model.no_sync()

    def after_step(self) -> str:
        """After an optimizer step: the first time a compiled step ended, what was compiled and how long it took."""
        if self.started is None or self.compile_seconds is not None:
            return ""
        self.compile_seconds = self._clock() - self.started
        parts = [
            f"compile: {type(_plain(self.model)).__name__} forward and backward with {self.plan.describe()}; "
            f"first step compiled in {self.compile_seconds:.1f} s; batches of {_sizes(self.sizes)} run compiled, "
            "others (a last partial batch) eagerly"
        ]
        if self.cache is not None:
            parts.append(self.cache.loaded.notice)
            parts.append(self.save_cache())
        return "\n".join(part for part in parts if part)

    def save_cache(self) -> str:
        """Save newly compiled artifacts (validation's graph after the first epoch, say); returns a notice."""
        if self.cache is None or self.key is None:
            return ""
        return self.cache.save(self.key)

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()


def _plain(model: Any) -> Any:
    return getattr(model, "module", model)


def _sizes(sizes: frozenset[int]) -> str:
    return " or ".join(str(size) for size in sorted(sizes)) or "the first size seen"


def _allocate_grads(model: torch.nn.Module) -> None:
    """Zeroed ``.grad`` buffers allocated outside any CUDA graph (see :attr:`CompiledModel.keeps_grads`)."""
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)


def compile_model(
    forward_model: Any,
    mode: str | None,
    *,
    model: torch.nn.Module,
    device: torch.device,
    precision: str,
    channels_last: bool,
    batch_size: int | None,
    directory: Path | None,
    is_main: bool,
) -> CompiledModel | None:
    """fit()'s compiled model for ``mode`` (None: eager), its cache in ``directory`` (and its Drive copy)."""
    if mode is None:
        return None
    plan = plan_compile(mode, device)
    cache = None
    if directory is not None:
        local, mirrors = mirror_targets(directory, "auto", None)  # as the checkpoint manager stages them
        cache = CompileCache(local=local, mirrors=mirrors, writes=is_main)

    def key(inputs: Any, full_batch: int | None) -> dict[str, Any]:
        return cache_key(
            model=model,
            inputs=inputs,
            batch_size=full_batch,
            plan=plan,
            precision=precision,
            channels_last=channels_last,
            device=device,
        )

    return CompiledModel(forward_model, plan, batch_size=batch_size, cache=cache, key=key)
