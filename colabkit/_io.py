"""Durable file operations shared by staging and checkpoints.

One place for: atomic writes (temporary name in the same folder, fsync,
rename, fsync of the folder), retries on the transient errors Google Drive's
FUSE mount throws (errno 5 ``EIO``, errno 107 ``ENOTCONN``), chunked copies,
hashing and free-space checks.

Every file operation colabkit performs on data (checkpoint writes, copies
from Drive, extracted archive members) goes through :data:`ops`, one
:class:`FileOps` instance, so tests can slow down or fail any single
``open``/``read``/``write``/``fsync``/``replace``; forked extraction workers
inherit a replaced one. :func:`copy_stream` is the one chunked-copy loop.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import signal
import stat
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

from colabkit.errors import InsufficientSpaceError

__all__ = [
    "SPACE_MARGIN",
    "TEMP_MARK",
    "TRANSIENT_ERRNOS",
    "FileOps",
    "atomic_open",
    "atomic_write_bytes",
    "copy_file",
    "copy_stream",
    "die_with_parent",
    "discard",
    "ensure_free_space",
    "free_space",
    "fsync_dir",
    "hash_file",
    "human_bytes",
    "is_temp_name",
    "is_transient",
    "locked",
    "ops",
    "pid_alive",
    "publish_folder",
    "retry",
    "space_margin",
    "temp_name",
    "temp_owner_alive",
    "write_all",
]

T = TypeVar("T")

#: errno values that Drive's FUSE mount raises while it recovers; worth a retry.
TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.ENOTCONN, errno.ETIMEDOUT, errno.EAGAIN})

#: Marker inside every temporary name colabkit creates, so leftovers can be found.
TEMP_MARK = ".colabkit-tmp-"

CHUNK = 8 * 1024 * 1024
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


class FileOps:
    """The system calls file data moves through: the one seam for latency and fault injection."""

    def open(self, path: str | os.PathLike[str], mode: str) -> IO[Any]:
        """Open a buffered file (atomic writes, and reads of sources such as Drive files)."""
        return open(path, mode)

    def write(self, handle: IO[bytes], data: bytes) -> None:
        handle.write(data)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def replace(self, src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        os.replace(src, dst)

    def copy_chunk(self, src: IO[bytes], size: int) -> bytes:
        """Read one chunk of a copy (:func:`copy_file`, copies off Drive)."""
        return src.read(size)

    def create(self, path: str, mode: int) -> int:
        """Create a new file for raw writes; never follows or replaces an existing entry."""
        return os.open(path, _CREATE_FLAGS, mode)

    def write_fd(self, fd: int, data: bytes | memoryview) -> int:
        """One raw write to a file made by :meth:`create`; returns the bytes written."""
        return os.write(fd, data)


ops = FileOps()


def temp_name(path: Path) -> Path:
    """A unique temporary sibling of ``path`` that :func:`is_temp_name` recognises."""
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}")


def is_temp_name(name: str) -> bool:
    """Whether ``name`` was made by :func:`temp_name`."""
    return TEMP_MARK in name


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists but belongs to someone else
    return True


def temp_owner_alive(name: str) -> bool:
    """Whether the process that made temporary ``name`` (see :func:`temp_name`) still runs.

    Leftovers of dead processes are safe to delete; a live owner may still be writing.
    """
    try:
        pid = int(name.split(TEMP_MARK, 1)[1].split("-", 1)[0])
    except (IndexError, ValueError):
        return False
    return pid_alive(pid)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename inside ``path`` durable; silently skipped where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        ops.fsync(fd)
    except OSError as exc:
        # Some filesystems (FUSE mounts among them) refuse fsync on folders.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb", *, durable: bool = True) -> Iterator[IO[Any]]:
    """Open a file that appears at ``path`` only once it is complete.

    Data goes to a temporary sibling; on a clean exit it is flushed, fsynced
    and renamed over ``path`` and the folder is fsynced. On any exception
    (KeyboardInterrupt included) the temporary file is removed and ``path``
    keeps its previous content.
    """
    target = Path(path)
    tmp = temp_name(target)
    handle = ops.open(tmp, mode)
    try:
        with handle:
            yield handle
            handle.flush()
            if durable:
                ops.fsync(handle.fileno())
        ops.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            discard(tmp)
        raise
    if durable:
        fsync_dir(target.parent)


def publish_folder(staging: Path, target: Path) -> None:
    """Rename the finished folder ``staging`` to ``target``, replacing an older one: the commit point.

    The old folder first moves to a temporary name (:func:`temp_name`), so a kill
    in between leaves ``staging`` and a recognisable leftover, never a half folder
    under ``target``.
    """
    fsync_dir(staging)
    trash = None
    if os.path.lexists(target):
        trash = temp_name(target)
        os.rename(target, trash)
    os.rename(staging, target)
    fsync_dir(target.parent)
    if trash is not None:
        if os.path.isdir(trash) and not os.path.islink(trash):
            shutil.rmtree(trash, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(trash)


def die_with_parent() -> None:
    """In a forked worker: be killed when the parent dies (Linux), so a killed run leaves no writer behind.

    A worker that outlived its killed parent would keep writing into a folder that
    the next run is about to remove or resume. Elsewhere a no-op.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on the folder ``path`` so two processes never write into it at once.

    The lock is taken on the folder itself, so no lock file is left behind; a killed
    holder releases it automatically.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no lock, publishing is still atomic
        yield
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_open`)."""
    with atomic_open(path, "wb", durable=durable) as handle:
        ops.write(handle, data)


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is an OSError worth retrying (Drive's errno 5 and 107)."""
    return isinstance(exc, OSError) and exc.errno in TRANSIENT_ERRNOS


def retry(
    fn: Callable[[], T],
    *,
    retries: int = 3,
    delay: float = 0.5,
    backoff: float = 2.0,
    on_retry: Callable[[BaseException, int], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    should_retry: Callable[[BaseException], bool] = is_transient,
) -> T:
    """Call ``fn``; on a transient error wait and call again, up to ``retries`` more times.

    Args:
        fn: The operation. It must be safe to repeat.
        retries: How many extra attempts after the first.
        delay: Seconds before the first retry; multiplied by ``backoff`` each time.
        backoff: Growth factor of the delay.
        on_retry: Called with the error and the attempt number before each retry
            (Drive uses it to remount on errno 107).
        sleep: The sleep function (a seam for tests).
        should_retry: Decides which errors are transient.
    """
    attempt = 0
    wait = delay
    while True:
        try:
            return fn()
        except Exception as exc:
            if attempt >= retries or not should_retry(exc):
                raise
            attempt += 1
            if on_retry is not None:
                on_retry(exc, attempt)
            sleep(wait)
            wait *= backoff


def hash_file(path: str | os.PathLike[str], algorithm: str = "sha256", *, chunk_size: int = CHUNK) -> str:
    """Hex digest of a file, read in large chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        while block := handle.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write all of ``data`` to the raw descriptor ``fd`` through :data:`ops` (short writes continue)."""
    written = ops.write_fd(fd, data)
    if written == len(data):
        return  # the usual case: one write
    view = memoryview(data)[written:]
    while view:
        view = view[ops.write_fd(fd, view) :]


def copy_stream(
    read: Callable[[int], bytes],
    write: Callable[[bytes], object],
    *,
    chunk_size: int = CHUNK,
    progress: Callable[[int], None] | None = None,
    hashers: Iterable[Any] = (),
) -> int:
    """Move data from ``read`` to ``write`` in chunks until ``read`` returns nothing; returns the bytes moved.

    ``hashers`` (``hashlib`` objects) are fed every chunk, so a checksum costs
    no second read. ``progress`` is called with each chunk's size.
    """
    feed = tuple(hashers)
    copied = 0
    while block := read(chunk_size):
        write(block)
        for hasher in feed:
            hasher.update(block)
        copied += len(block)
        if progress is not None:
            progress(len(block))
    return copied


def copy_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    chunk_size: int = CHUNK,
    progress: Callable[[int], None] | None = None,
    hashers: Iterable[Any] = (),
    durable: bool = True,
    offset: int = 0,
    atomic: bool = True,
) -> int:
    """Copy ``src`` to ``dst`` in large chunks; returns the bytes copied.

    With ``atomic`` (the default) ``dst`` appears only once complete (see
    :func:`atomic_open`); without it ``dst`` must not exist yet and is written
    in place, for copies into a folder that is itself published atomically.
    ``offset`` skips that many leading bytes of ``src``. See :func:`copy_stream`
    for ``progress`` and ``hashers``.
    """
    with ops.open(src, "rb") as source:
        if offset:
            source.seek(offset)

        def read(size: int) -> bytes:
            return ops.copy_chunk(source, size)

        if atomic:
            with atomic_open(dst, "wb", durable=durable) as target:
                return copy_stream(
                    read,
                    lambda block: ops.write(target, block),
                    chunk_size=chunk_size,
                    progress=progress,
                    hashers=hashers,
                )
        fd = ops.create(os.fspath(dst), 0o644)
        try:
            copied = copy_stream(
                read, lambda block: write_all(fd, block), chunk_size=chunk_size, progress=progress, hashers=hashers
            )
            if durable:
                ops.fsync(fd)
        finally:
            os.close(fd)
        return copied


def _existing(path: str | os.PathLike[str]) -> Path:
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def free_space(path: str | os.PathLike[str]) -> int:
    """Free bytes on the filesystem that holds ``path`` (or its nearest existing parent)."""
    return shutil.disk_usage(_existing(path)).free


#: Most head-room :func:`ensure_free_space` keeps free, so the system itself does not run dry.
SPACE_MARGIN = 64 * 1024 * 1024


def space_margin(path: str | os.PathLike[str]) -> int:
    """The head-room kept free on ``path``'s disk: :data:`SPACE_MARGIN`, or 5% of a smaller disk."""
    return min(SPACE_MARGIN, shutil.disk_usage(_existing(path)).total // 20)


def human_bytes(size: float) -> str:
    """``1536`` -> ``'1.5 KB'``: sizes people read at a glance."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(size) < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def ensure_free_space(
    path: str | os.PathLike[str], needed: int, *, what: str, margin: int | None = None, fix: str = ""
) -> None:
    """Raise :class:`InsufficientSpaceError` when ``path``'s disk lacks ``needed`` bytes plus a margin.

    The message names every number, so it adds up: what is needed, the margin, their
    sum and what is free.

    Args:
        path: Where the data will be written.
        needed: Bytes about to be written.
        what: Names the data in the message (``"the extracted dataset"``).
        margin: Head-room kept free so the system itself does not run dry; default
            :func:`space_margin` (64 MB, or 5% of a disk smaller than 1.25 GB).
        fix: How to get more room, for the message (default: delete files or use a larger disk).
    """
    available = free_space(path)
    keep = space_margin(path) if margin is None else margin
    if needed + keep > available:
        total = needed + keep
        raise InsufficientSpaceError(
            errno.ENOSPC,
            f"not enough free disk for {what}: it needs {human_bytes(needed)} ({needed} bytes) plus "
            f"{human_bytes(keep)} ({keep} bytes) kept free as a safety margin, {human_bytes(total)} "
            f"({total} bytes) in all, but {path} has {human_bytes(available)} ({available} bytes) free; "
            + (fix or "free some space (delete old checkpoints or datasets) or pass a dest on a larger disk"),
        )


def discard(path: str | os.PathLike[str]) -> None:
    """Delete a file after emptying it, so no trash or other link keeps its bytes.

    Google Drive keeps deleted files in its trash for 30 days, counted against the
    quota; a file truncated to zero bytes (and fsynced, so the empty version is the one
    uploaded) leaves only an empty entry there. Elsewhere this is an ordinary delete.

    The file first moves to a temporary name (:func:`temp_name`), so its own name
    vanishes at once: a kill half-way never leaves an emptied file under a name that
    readers trust, only a leftover that cleanup recognises. A missing file is fine; a
    symbolic link is removed without touching its target; emptying is best effort (a
    read-only file is still removed). The unlink's own errors propagate.
    """
    target = Path(path)
    try:
        if stat.S_ISDIR(os.lstat(target).st_mode):
            raise IsADirectoryError(errno.EISDIR, "discard() removes files, not folders", str(target))
    except FileNotFoundError:
        return
    doomed = temp_name(target)
    try:
        os.replace(target, doomed)
    except FileNotFoundError:
        return
    except OSError:
        doomed = target  # a filesystem that cannot rename: empty it where it is
    try:
        fd = os.open(doomed, os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        fd = -1  # a symlink (ELOOP) or a read-only file: nothing to empty here
    if fd >= 0:
        try:
            os.ftruncate(fd, 0)
            ops.fsync(fd)
        except OSError:
            pass  # the unlink below is what matters; an unemptied file only costs trash space
        finally:
            os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(doomed)
