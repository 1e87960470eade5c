"""CheckpointManager: save in the background, restore the newest or best, keep the folder rotated.

Saving goes: copy the state to RAM (the only part the caller waits for), then in the
background serialise to a temporary name in the same folder, fsync, hash, rename to
the data name, fsync the folder and write the manifest atomically, last (see
:mod:`colabkit.checkpoint.store`). A kill at any instant therefore leaves every
committed checkpoint intact. Mirrors (``mirror=``, or a ``directory`` on Drive) are
kept up to date by :mod:`colabkit.checkpoint.mirror`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import torch

from colabkit import _io, _notify, drive
from colabkit.checkpoint import lease as lease_module
from colabkit.checkpoint import registry
from colabkit.checkpoint import state as state_module
from colabkit.checkpoint.mirror import Lane, Mirror, mirror_targets
from colabkit.checkpoint.store import (
    CheckpointInfo,
    CheckpointListing,
    Retention,
    Store,
    load_checkpoint,
    warn_old_torch,
)
from colabkit.errors import ArgumentError, CheckpointError, CheckpointNotFoundError

__all__ = ["CheckpointManager"]


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
        takeover: Take ``directory`` over even while another run holds its lease (that run
            stops saving at its next heartbeat). A holder whose process is gone, or whose
            heartbeat is older than 5 minutes, is taken over without it.

    Only one writer at a time: from its first :meth:`save` (or :meth:`acquire`) the manager
    holds a lease on ``directory`` (the file ``.colabkit-lease``, renewed every minute) until
    :meth:`close` or the end of the process. Until then it only reads: :meth:`latest`,
    :meth:`best`, :meth:`checkpoints`, :meth:`load` and :meth:`restore` never take, wait for
    or break a lease, and write or delete nothing, so a notebook cell may watch a folder
    that a training run writes. The writer's housekeeping (leftovers of killed writers
    removed, mirrors caught up) starts with the lease too.

    Raises:
        ArgumentError: An option has an unusable value.
        CheckpointError: ``directory`` (or the staging folder) cannot be a folder.

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
        takeover: bool = False,
    ) -> None:
        retention = Retention(keep_last, keep_best, monitor, mode)  # checks the four options
        self.directory = Path(directory).expanduser()
        self.keep_last, self.keep_best, self.monitor, self.mode = keep_last, keep_best, monitor, mode
        self.takeover = takeover
        local, targets = mirror_targets(self.directory, staging_dir, mirror)
        for folder in dict.fromkeys((self.directory, local)):
            _make_folder(folder)
        self._lease: lease_module.Lease | None = None  # taken by the first write (acquire)
        self._open(local, targets, retention)

    def _open(self, local: Path, targets: list[Path], retention: Retention) -> None:
        self._local = Store(local)
        self._lock = threading.RLock()
        # Weakly: no reference cycle keeps a dropped manager (and its lease) alive until a gc pass.
        rotate = weakref.WeakMethod(self._rotate_local)

        def rotate_local() -> None:
            method = rotate()
            if method is not None:
                method()

        self._mirror = Mirror(self._local, [Store(t) for t in targets], retention, self._lock, rotate_local)
        self._mirror.may_write = lambda: False  # a reader copies nothing (acquire lets the writer)
        self._listing = CheckpointListing(self._local, *self._mirror.remotes, lock=self._lock)
        self._commit_lane = Lane("colabkit-checkpoint-commit")
        self._commit_errors: list[str] = []
        self._buffers: dict[tuple[Any, ...], torch.Tensor] = {}  # last snapshot's tensors, reused
        self._closed = False
        warn_old_torch()

    def acquire(self) -> CheckpointManager:
        """Become the folder's writer now; :meth:`save` does this at its first call.

        Takes the lease on ``directory``, checks the staging folder is writable, removes
        leftovers of killed writers and starts catching the mirrors up. fit() calls it before
        training, so a second run on the folder is refused before any work. Calling it again
        while the lease is held does nothing.

        Returns:
            This manager.

        Raises:
            CheckpointInUseError: Another live run holds the folder's lease (``takeover=False``).
            CheckpointError: The manager is closed, or a folder is not writable.
        """
        self._writer_lease()
        return self

    def _writer_lease(self) -> lease_module.Lease:
        """The lease this manager writes under, taken now if it has none yet (see :meth:`acquire`)."""
        self._check_open()
        if self._lease is not None:
            return self._lease  # held, or lost to a takeover (its check() says so)
        # The lease lives where every runtime sees it: the folder named, on Drive if it is there.
        # Drive has no locks across runtimes: wait a beat and read the lease back.
        lease = lease_module.acquire(
            self.directory, takeover=self.takeover, settle=1.0 if drive.is_drive_path(self.directory) else 0.0
        )
        try:
            if self._local.root != self.directory:
                _check_writable(self._local.root)
            with self._lock:
                self._local.cleanup()
            self._mirror.forget_deleted()
        except BaseException:
            lease.release()
            raise
        self._lease = lease
        self._mirror.may_write = lambda: lease.held  # not self: the mirror must not keep the manager alive
        # A manager dropped without close() lets go of the folder when collected; at exit the
        # registry's flush runs first, then the lease's own hook.
        weakref.finalize(self, lease.release).atexit = False
        self._mirror.start()
        registry.register(self)
        return lease

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
        self._writer_lease().check()
        drive.recover_if_lost()  # a main-thread Drive touch: remount for copies that lost Drive
        payload, clean_metrics = state_module.prepare(state, step=step, metrics=metrics)
        epoch = payload.get("epoch")
        fields = {
            "step": step,
            "epoch": epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None,
            "created_ns": _now_ns(),
            "metrics": clean_metrics,
        }
        self._commit_lane.join()  # one commit in flight at most
        self._raise_commit_errors()
        nbytes = state_module.storage_bytes(payload)
        _io.ensure_free_space(self._local.root, nbytes, what=f"the checkpoint for step {step}")
        final = self._local.new_data_path(step)
        tmp = _io.temp_name(final)
        box: list[dict[str, Any]] = []  # a one-item box, so the commit can drop the RAM copy once on disk
        if state_module.snapshot_fits(nbytes):
            buffers: dict[tuple[Any, ...], torch.Tensor] = {}
            box.append(state_module.snapshot(payload, {}, buffers, self._buffers))
            # Kept for the next save to copy into (fresh pages cost as much as the copy):
            # one state's worth of RAM, freed by close(). The next save joins this commit first.
            self._buffers = buffers
        else:
            self._buffers = {}
            self._local.write(payload, tmp, step)
        del payload
        self._commit_lane.submit(lambda: self._commit(tmp, final, fields, box))
        if blocking:
            self._commit_lane.join()
            self._raise_commit_errors()
        return final

    def latest(self) -> Path | None:
        """The newest checkpoint that checks out, or None.

        Local and mirrored checkpoints are considered together (after a fresh runtime
        only the Drive copy may exist); broken ones are skipped with a warning. A data
        file whose size and mtime match its manifest is trusted without re-hashing;
        :meth:`load` always re-checks the full sha256 before unpickling.
        """
        self._commit_lane.join()
        info = self._listing.latest()
        return None if info is None else info.path

    def best(self) -> Path | None:
        """The best checkpoint by ``monitor`` that checks out, or None.

        Raises:
            ArgumentError: The manager has no ``monitor``.
        """
        if not self.monitor:
            raise ArgumentError("best() needs CheckpointManager(..., monitor=<metric name>) to rank checkpoints")
        self._commit_lane.join()
        info = self._listing.best(self.monitor, self.mode)
        return None if info is None else info.path

    def checkpoints(self) -> list[CheckpointInfo]:
        """Every valid checkpoint, oldest first (one entry per step and content)."""
        self._commit_lane.join()
        return self._listing.checkpoints()

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
        return self._listing.load(map_location, fix="train and save() first, or pass path=")

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
            saved = self.load(path)
        except CheckpointNotFoundError:
            if path is not None:
                raise
            return {}
        return state_module.restore_state(saved, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)

    def wait(self) -> None:
        """Block until every commit and mirror copy so far is done (failed copies are tried once more).

        Raises:
            CheckpointError: A commit or mirror copy failed (each failure is also
                warned about when it happens); the message names them.
        """
        drive.recover_if_lost()  # a main-thread Drive touch: remount for copies that lost Drive
        self._commit_lane.join()
        self._mirror.lane.join_recovering()
        self._commit_lane.join()
        self._mirror.join(retry=True)
        with self._lock:
            problems, self._commit_errors = self._commit_errors, []
        problems += self._mirror.take_errors()
        if problems:
            raise CheckpointError(errno.EIO, "; ".join(problems))

    def close(self) -> None:
        """Flush pending work (see :meth:`wait`) and stop accepting saves.

        Interrupted (Ctrl-C while it waits), the manager stays registered so the
        flush at interpreter exit, or another ``close()``, still waits for the copies.
        """
        if self._closed and not registry.is_live(self):
            self._release()
            return
        self._closed = True
        self._buffers = {}
        try:
            self.wait()
        except Exception:
            registry.forget(self)  # the failures are reported: nothing left to wait for
            self._release()
            raise
        registry.forget(self)
        self._release()

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
        mirrors = ", ".join(str(s.root) for s in self._mirror.remotes)
        return f"CheckpointManager({str(self.directory)!r}, local={str(self._local.root)!r}, mirrors=[{mirrors}])"

    def detach_after_fork(self) -> None:
        """In a forked child: drop the parent's threads and pending work, refuse saves."""
        self._commit_lane = Lane("colabkit-checkpoint-commit")
        self._lock = threading.RLock()
        self._mirror.lock = self._lock
        self._listing = CheckpointListing(self._local, *self._mirror.remotes, lock=self._lock)
        self._mirror.detach_after_fork()
        self._buffers = {}
        self._commit_errors = []
        self._closed = True

    # -- internals

    def _release(self) -> None:
        if self._lease is not None:
            self._lease.release()

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError(errno.EBADF, f"{self!r} is closed; create a new CheckpointManager to save again")

    def _raise_commit_errors(self) -> None:
        with self._lock:
            problems, self._commit_errors = self._commit_errors, []
        if problems:
            raise CheckpointError(errno.EIO, "; ".join(problems))

    def _commit(self, tmp: Path, final: Path, fields: dict[str, Any], box: list[dict[str, Any]]) -> None:
        """Background: (write the snapshot,) make the file a committed checkpoint, rotate, mirror."""
        store, step = self._local, fields["step"]
        try:
            info, previous = store.commit(tmp, final, fields, box, self._lock)
        except BaseException as exc:
            landed = store.committed(step, final)
            if landed is not None:
                # Only the fsync after the manifest's rename failed: the checkpoint is complete.
                _notify.warn(f"checkpoint for step {step} is saved but may not be durable yet ({exc})")
                self._after_commit(landed, None)
                return
            for leftover in (tmp, final):
                with contextlib.suppress(OSError):
                    _io.discard(leftover)
            message = (
                f"checkpoint for step {step} was not saved in {store.root} ({type(exc).__name__}: {exc}); "
                "the previous checkpoints are untouched. Fix the cause (free disk space, say) and save again"
            )
            with self._lock:
                self._commit_errors.append(message)
            _notify.warn(message)
            return
        self._after_commit(info, previous)

    def _after_commit(self, info: CheckpointInfo, previous: CheckpointInfo | None) -> None:
        if previous is not None and previous.path.name != info.path.name:
            with contextlib.suppress(OSError):
                _io.discard(previous.path)
        self._mirror.queue_sync()
        self._rotate_local()

    def _rotate_local(self) -> None:
        """Delete local checkpoints outside the keep set, sparing the one a mirror copy reads."""
        try:
            with self._lock:
                if self._local.rotate(self._mirror.retention, busy=self._mirror.copying):
                    self._mirror.rotation_deferred = True  # the mirror pass rotates once the copy is done
        except OSError as exc:
            _notify.warn(f"could not remove old checkpoints in {self._local.root}: {exc}")


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        what = "is a file, not a folder" if folder.is_file() else f"cannot be created ({exc})"
        raise CheckpointError(
            exc.errno or errno.EIO, f"the checkpoint folder {folder} {what}; pick a writable folder"
        ) from exc


def _check_writable(folder: Path) -> None:
    """Write and remove a small file: the one test of writability that holds for root and FUSE alike."""
    probe = _io.temp_name(folder / "write-test")
    try:
        try:
            with open(probe, "wb") as handle:
                handle.write(b"ok")
        finally:
            _io.discard(probe)
    except OSError as exc:
        raise CheckpointError(
            exc.errno or errno.EIO, f"the checkpoint folder {folder} is not writable ({exc}); pick a writable folder"
        ) from exc


def _now_ns() -> int:
    """Wall clock for manifests; comparable across runtimes, unlike a monotonic clock."""
    return time.time_ns()
