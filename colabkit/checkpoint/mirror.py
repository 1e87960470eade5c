"""Background copies of committed checkpoints to Drive (or any other folder), and the lanes they run on.

Each committed checkpoint is copied by a background thread: temporary name in the
target folder, re-read and hash check, rename, manifest. Failures are retried
(errno 5 and 107 included) and reported loudly; a failed or interrupted copy is
tried again by the next pass. A :class:`Lane` is a job queue served by one thread
that exists only while there is work (the manager's commits run on one too).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import functools
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from colabkit import _io, _notify, drive
from colabkit.checkpoint.store import CheckpointInfo, Retention, Store
from colabkit.errors import ArgumentError, DriveLostError

__all__ = ["Lane", "Mirror", "mirror_targets"]

T = TypeVar("T")


def _mirror_retry(fn: Callable[[], T]) -> T:
    """Run one mirror step with Drive's retry policy (on errno 107: wait for the main thread's remount)."""
    return drive.drive_retry(fn, retries=3)


def _auto_staging(directory: Path) -> Path:
    """Fast local folder that stages checkpoints bound for ``directory``."""
    from colabkit.runtime import runtime

    key = hashlib.sha1(str(directory.absolute()).encode(), usedforsecurity=False).hexdigest()[:12]
    return runtime().data_dir / ".colabkit-checkpoints" / f"{directory.name}-{key}"


def _unreachable(folder: Path) -> bool:
    """Whether ``folder``'s absence would prove nothing: a Drive folder while Drive is not mounted."""
    if not drive.is_drive_path(folder):
        return False
    from colabkit.runtime import runtime

    return runtime().kind == "colab" and not drive.drive_mounted()


def mirror_targets(
    directory: Path,
    staging_dir: str | os.PathLike[str] | None,
    mirror: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | None,
) -> tuple[Path, list[Path]]:
    """The folder written synchronously and the folders copied to in the background.

    A ``directory`` on Drive is staged on local disk (``staging_dir``, ``"auto"``: the
    runtime's data disk) and becomes the first mirror.

    Raises:
        ArgumentError: A mirror is the local folder itself.
    """
    targets: list[Path] = []
    if staging_dir is not None and drive.is_drive_path(directory):
        local = _auto_staging(directory) if staging_dir == "auto" else Path(staging_dir).expanduser()
        targets.append(directory)
    else:
        local = directory
    if mirror is not None:
        extra = [mirror] if isinstance(mirror, (str, os.PathLike)) else list(mirror)
        targets.extend(Path(m).expanduser() for m in extra)
    for target in targets:
        if target.absolute() == local.absolute():
            raise ArgumentError(f"mirror={str(target)!r} is the checkpoint folder itself; pass a different folder")
    return local, targets


class Lane:
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

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the lane is idle (at most ``timeout`` seconds); True when it is."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            if self._thread is threading.current_thread():
                return True
            while self._thread is not None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
            last = self._last
        if last is not None and last is not threading.current_thread():
            last.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            return not last.is_alive()
        return True

    def join_recovering(self) -> None:
        """:meth:`join`, remounting Drive meanwhile if a job lost it (on the main thread)."""
        drive.wait_recovering(self.join)


def _start_thread(thread: threading.Thread) -> None:
    """Start a lane's thread (a seam: tests make it fail as at interpreter shutdown)."""
    thread.start()


class Mirror:
    """Keeps every mirror folder holding the local folder's keep set, newest first, in the background.

    Args:
        local: The folder checkpoints are committed to.
        remotes: The folders they are copied to.
        retention: What rotation keeps (in the mirrors as locally).
        lock: The manager's lock, held while folders are scanned or rotated.
        rotate_local: Called when local rotation was put off because a copy was reading the file.
    """

    def __init__(
        self,
        local: Store,
        remotes: list[Store],
        retention: Retention,
        lock: threading.RLock,
        rotate_local: Callable[[], None],
    ) -> None:
        self.local, self.remotes, self.retention, self.lock = local, remotes, retention, lock
        self.rotation_deferred = False
        self.copying: Path | None = None  # the local file a copy reads right now
        self.lane = Lane("colabkit-checkpoint-mirror")
        self._rotate_local = rotate_local
        self._errors: dict[tuple[int, str], str] = {}
        self._sync_queued = False
        #: Whether this run may still write (False once another run took the folder's lease over).
        self.may_write: Callable[[], bool] = lambda: True

    def start(self) -> None:
        """Clean the mirrors' leftovers, then copy what they lack (in the background)."""
        if self.remotes:
            self.lane.submit(self._catch_up)

    def queue_sync(self) -> None:
        """Have the background thread bring every mirror up to date (one pass serves many saves)."""
        if not self.remotes:
            return
        with self.lock:
            if self._sync_queued:
                return  # the queued pass will see this checkpoint too
            self._sync_queued = True
        self.lane.submit(self._sync)

    def join(self, *, retry: bool) -> None:
        """Wait for queued copies; with ``retry``, one more pass when a copy failed."""
        self.lane.join_recovering()
        with self.lock:
            again = retry and bool(self._errors) and bool(self.remotes)
        if again:  # Drive may be back (or remounted) by now
            drive.recover_if_lost()
            self.queue_sync()
            self.lane.join_recovering()

    def take_errors(self) -> list[str]:
        with self.lock:
            problems, self._errors = list(self._errors.values()), {}
        return problems

    def detach_after_fork(self) -> None:
        self.lane = Lane("colabkit-checkpoint-mirror")
        self._errors = {}  # the parent reports its own failures
        self._sync_queued = False

    def _sync(self) -> None:
        """Background: make every mirror hold the local keep set, newest first.

        One idempotent pass instead of one job per save: a checkpoint superseded
        before its turn is simply no longer in the keep set, a failed or
        interrupted copy is tried again by the next pass (or at the next start).
        """
        with self.lock:
            self._sync_queued = False
            if not self.may_write():
                return  # another run writes these folders now
            local = [i for i in self.local.scan(report=False) if self.local.problem(i, rehash=False) is None]
            keep = self.retention.keep(local)
            todo = [i for i in Store.ordered(local) if (i.step, i.sha256) in keep]
        for remote in self.remotes:
            copied = False
            for info in todo:
                key = (info.step, str(remote.root))
                with self.lock:
                    if not info.path.exists():
                        continue  # rotated away meanwhile: superseded
                    self.copying = info.path
                try:
                    copied = self.mirror_one(info, remote) or copied
                except Exception as exc:
                    if isinstance(exc, FileNotFoundError) and not info.path.exists():
                        continue  # re-saved meanwhile (same step, new file): the next pass copies that
                    self._report(key, info, remote, exc)
                    continue
                finally:
                    with self.lock:
                        self.copying = None
                with self.lock:
                    self._errors.pop(key, None)
            if copied:  # old ones go only after a newer one is committed there
                self._rotate(remote)
        with self.lock:
            deferred, self.rotation_deferred = self.rotation_deferred, False
        if deferred:
            self._rotate_local()

    def _report(self, key: tuple[int, str], info: CheckpointInfo, remote: Store, exc: Exception) -> None:
        if isinstance(exc, DriveLostError):
            # Parked, not failed: colabkit.drive already said how to remount; the next pass copies it.
            message = (
                f"checkpoint step {info.step} is not yet on {remote.root}: Google Drive is not connected "
                f"(errno 107); the local copy {info.path} is intact and is copied once Drive is remounted"
            )
            with self.lock:
                new = key not in self._errors
                self._errors[key] = message
            if new:
                _notify.say(message)
            return
        message = (
            f"could not copy checkpoint step {info.step} to {remote.root} "
            f"({type(exc).__name__}: {exc}); the local copy {info.path} is intact "
            "and the copy is retried at the next save, wait() or close()"
        )
        with self.lock:
            new = key not in self._errors
            self._errors[key] = message
        if new:
            _notify.say(message)
            _notify.warn(message)

    def _rotate(self, remote: Store) -> None:
        try:
            with self.lock:
                remote.rotate(self.retention)
        except OSError as exc:
            _notify.warn(f"could not remove old checkpoints in {remote.root}: {exc}")

    def mirror_one(self, info: CheckpointInfo, remote: Store) -> bool:
        """Copy ``info`` into ``remote`` unless it is there already; True when it copied."""
        existing = _mirror_retry(lambda: remote.read_manifest(info.step, report=False))
        if existing is not None and existing.sha256 == info.sha256 and remote.problem(existing) is None:
            self.local.mark_mirrored(info, remote.root, self.lock)
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
                    _io.discard(tmp)
                raise
            _io.fsync_dir(remote.root)
            return target.stat().st_mtime_ns

        try:
            mtime = _mirror_retry(copy)
            copied = dataclasses.replace(
                info, path=target, manifest=remote.manifest_path(info.step), mtime_ns=mtime, mirrored=()
            )
            with self.lock:
                previous = remote.read_manifest(info.step, report=False)
            _mirror_retry(lambda: remote.write_manifest(copied))
        except BaseException:
            # Half-done copies must not linger: drop the data unless its manifest made it.
            landed = remote.read_manifest(info.step, report=False)
            if landed is None or landed.path != target:
                with contextlib.suppress(OSError):
                    _io.discard(target)
            raise
        if previous is not None and previous.path.name != target.name:
            with contextlib.suppress(OSError):
                _io.discard(previous.path)
        # Only now, with data and manifest verified there: a copy that later vanishes was deleted.
        self.local.mark_mirrored(info, remote.root, self.lock)
        return True

    def forget_deleted(self) -> list[CheckpointInfo]:
        """Drop local checkpoints whose confirmed mirror copy is gone: someone deleted it there.

        Deleting the checkpoint folder on Drive means "start over"; without this the local
        staged copy would silently resume the run. A copy that never completed proves
        nothing (the local one is then the only good state and stays), and neither does a
        folder that cannot be read now, or a Drive that is not mounted.
        """
        dropped: list[CheckpointInfo] = []
        for remote in self.remotes:
            name = str(remote.root.absolute())
            with self.lock:
                confirmed = [i for i in self.local.scan(report=False) if name in i.mirrored]
            if not confirmed or _unreachable(remote.root):
                continue
            for info in confirmed:
                try:
                    there = _mirror_retry(functools.partial(remote.read_manifest, info.step, report=False))
                except OSError:
                    continue  # cannot tell now: keep it
                if there is not None and there.sha256 == info.sha256:
                    continue
                with self.lock:
                    self.local.remove(info)
                dropped.append(info)
        if dropped:
            where = ", ".join(sorted({str(r.root) for r in self.remotes}))
            _notify.say(
                f"{len(dropped)} checkpoint(s) staged in {self.local.root} had been copied to {where} and are no "
                "longer on Drive there (the folder or files were deleted): they are not resumed and were removed "
                "locally; training starts over"
            )
        return dropped

    def _catch_up(self) -> None:
        """Background, at start: clean mirror leftovers, then copy what the mirrors lack."""
        for remote in self.remotes:
            try:
                _mirror_retry(functools.partial(remote.cleanup))
            except OSError as exc:
                _notify.warn(f"could not clean leftovers in {remote.root}: {exc}")
        self._sync()
