"""Google Drive: mount, flush, project folders, and reads that survive Drive's hiccups.

On Colab, :func:`mount_drive` calls ``google.colab.drive.mount``; everywhere
else it hands back a local stand-in folder, so notebook code that saves to
"Drive" runs unchanged on Kaggle, a laptop or in tests.

Drive's FUSE mount is flaky for many small files: reads fail with errno 5
(``Input/output error``) or errno 107 (``Transport endpoint is not
connected``, the Drive process died). :func:`drive_retry` retries such reads
with backoff and, on errno 107, re-establishes the mount first.

Outside-world seams (replaced in tests): :func:`_colab_drive` returns the
``google.colab.drive`` module, :func:`_mount_table` returns the text of
``/proc/mounts``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import inspect
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, TypeVar

from colabkit import _io, _notify
from colabkit.errors import ArgumentError, DriveError, PlatformError
from colabkit.runtime import Runtime, runtime

__all__ = [
    "ProjectDirs",
    "drive_mounted",
    "drive_retry",
    "flush_drive",
    "is_drive_path",
    "mount_drive",
    "project_dirs",
]

T = TypeVar("T")

DEFAULT_MOUNTPOINT = "/content/drive"
_DRIVE_FSTYPE = "fuse.drive"
# Colab's own "already mounted" test looks for the old name too.
_MYDRIVE_NAMES = ("MyDrive", "My Drive")
_FLUSH_TIMEOUT_MS = 24 * 60 * 60 * 1000


@dataclasses.dataclass
class _MountOptions:
    mountpoint: str = DEFAULT_MOUNTPOINT
    timeout: float = 120
    readonly: bool = False


# What the last successful mount_drive() asked for, so a remount (after a flush,
# or on errno 107) reconnects the same folder with the same options.
_last_mount = _MountOptions()


# -- seams ----------------------------------------------------------------------------------------
def _colab_drive() -> ModuleType:
    """The ``google.colab.drive`` module (the seam tests replace)."""
    try:
        from google.colab import drive
    except ImportError as exc:
        raise PlatformError(
            "this looks like Colab but the google.colab package cannot be imported, so Drive "
            "cannot be mounted; run in a hosted Colab runtime, or copy data in with colabkit.stage()"
        ) from exc
    return drive


def _mount_table() -> str | None:
    """The text of ``/proc/mounts``, or None where it cannot be read."""
    try:
        return Path("/proc/mounts").read_text(errors="replace")  # odd bytes in a path must not break this
    except OSError:
        return None


# -- mount table ----------------------------------------------------------------------------------
def _unescape_mount_field(field: str) -> str:
    # /proc/mounts writes space, tab, newline and backslash as octal escapes.
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def _drive_mounts(rt: Runtime) -> set[Path] | None:
    """Folders where a Drive FUSE filesystem is mounted (mapped through the runtime), or None."""
    text = _mount_table()
    if text is None:
        return None
    found = set()
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == _DRIVE_FSTYPE:
            found.add(rt.host_path(_unescape_mount_field(fields[1])))
    return found


MountState = Literal["mounted", "broken", "absent", "empty", "foreign", "invalid"]


def _mount_state(host: Path, rt: Runtime) -> MountState:
    """What is at the mountpoint ``host``: a live Drive mount, a dead one, nothing, or foreign files."""
    mounts = _drive_mounts(rt)
    # On a real machine the mount table is the truth: a "MyDrive" folder that is
    # not a mount was written by someone before mounting, and would silently swallow
    # "saved to Drive" files. Under colabkit.testing fakes, whose paths never appear
    # in the table, the folder layout (Colab's own test) decides unless a test fed
    # the table a Drive entry.
    table_decides = mounts is not None and (rt.root == Path("/") or bool(mounts))
    try:
        if table_decides:
            assert mounts is not None
            if host in mounts:
                # A mount whose Drive process died answers stat() with errno 107.
                os.stat(host)
                return "mounted"
            # A mount point of another type name holding MyDrive: still Drive, never "foreign".
            if os.path.ismount(host) and _has_mydrive(host):
                return "mounted"
        elif _has_mydrive(host):
            return "mounted"
        if host.is_symlink() or (host.exists() and not host.is_dir()):
            return "invalid"
        if not host.exists():
            return "absent"
        return "foreign" if any(host.iterdir()) else "empty"
    except OSError:
        return "broken"


def _has_mydrive(host: Path) -> bool:
    return any((host / name).is_dir() for name in _MYDRIVE_NAMES)


def _mydrive(host: Path) -> Path:
    for name in _MYDRIVE_NAMES:
        candidate = host / name
        with contextlib.suppress(OSError):
            if candidate.is_dir():
                return candidate
    return host / "MyDrive"


def _stand_in(rt: Runtime) -> Path:
    folder = rt.drive_mountpoint / "MyDrive"
    folder.mkdir(parents=True, exist_ok=True)
    _notify.say_once(
        "drive-stand-in",
        f"not on Colab ({rt.kind}), so Google Drive is not mounted; using the local folder {folder} "
        "as a stand-in (set COLABKIT_DRIVE_DIR to choose another)",
    )
    return folder


def _mount_kwargs(mount: Callable[..., Any], *, force_remount: bool, timeout: float, readonly: bool) -> dict[str, Any]:
    """Only the keyword arguments this Colab's ``drive.mount`` accepts."""
    try:
        params = inspect.signature(mount).parameters
    except (TypeError, ValueError):  # builtins or C functions without a signature
        params = {}  # type: ignore[assignment]
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    wanted: dict[str, Any] = {"force_remount": force_remount, "timeout_ms": int(timeout * 1000)}
    if readonly:
        wanted["readonly"] = True
    kwargs = {key: value for key, value in wanted.items() if takes_any or key in params}
    if readonly and "readonly" not in kwargs:
        raise PlatformError(
            "mount_drive(readonly=True): this runtime's google.colab.drive.mount has no read-only mode "
            "(added to Colab in October 2022); call mount_drive() without readonly, or use a current Colab runtime"
        )
    return kwargs


def _explain_mount_error(exc: BaseException, mountpoint: str) -> BaseException:
    text = str(exc)
    if isinstance(exc, NotImplementedError):
        return PlatformError(f"Google Drive cannot be mounted in this runtime: {text}")
    if "credential propagation" in text or type(exc).__name__ == "MessageError":
        return DriveError(
            errno.EACCES,
            f"Drive authorisation failed ({text}); run mount_drive() again and accept the pop-up with the "
            "Google account that runs this notebook (other accounts cannot be mounted)",
        )
    if "timeout" in text.lower():
        return DriveError(
            errno.ETIMEDOUT,
            f"mounting Drive at {mountpoint} timed out ({text}); Drive times out when a folder (often the top "
            "of MyDrive) holds thousands of items: move them into sub-folders, then retry (retries often succeed)",
        )
    return DriveError(errno.EIO, f"mounting Drive at {mountpoint} failed: {text}; run mount_drive() again")


# -- public API -----------------------------------------------------------------------------------
def mount_drive(
    mountpoint: str = DEFAULT_MOUNTPOINT,
    *,
    force_remount: bool = False,
    timeout: float = 120,
    readonly: bool = False,
) -> Path:
    """Mount Google Drive (on Colab) and return its ``MyDrive`` folder.

    On Colab this calls ``google.colab.drive.mount`` with only the arguments
    the installed version accepts; if Drive is already mounted there it does
    nothing. Anywhere else (Kaggle, Jupyter, a script) it returns a local
    stand-in folder, ``runtime().drive_mountpoint / "MyDrive"``
    (``COLABKIT_DRIVE_DIR`` chooses it), and says so once, so code that saves
    to "Drive" runs unchanged.

    Args:
        mountpoint: Where to mount Drive on Colab. Ignored elsewhere.
        force_remount: Unmount and mount again even if Drive is mounted (the fix for
            errno 107 "Transport endpoint is not connected").
        timeout: Seconds to wait for the mount (and for each folder listing Drive does).
        readonly: Mount read-only, so nothing in this notebook can change Drive.

    Returns:
        The ``MyDrive`` folder (or the stand-in).

    Raises:
        ArgumentError: ``mountpoint`` contains a space, is a symlink or a file, or already
            holds files that are not Drive (checked before Colab is asked, so nothing changes);
            ``timeout`` is not positive.
        PlatformError: Colab Enterprise, or a Colab too old for ``readonly``.
        DriveError: Colab could not mount Drive (authorisation refused, timeout, ...).

    Example:
        >>> mydrive = colabkit.mount_drive()  # doctest: +SKIP
        >>> (mydrive / "results").mkdir(exist_ok=True)  # doctest: +SKIP
    """
    if not timeout > 0:
        raise ArgumentError(f"mount_drive(timeout={timeout!r}): the timeout must be a positive number of seconds")
    rt = runtime()
    if rt.kind != "colab":
        return _stand_in(rt)
    if rt.enterprise:
        raise PlatformError(
            "Google Drive cannot be mounted in Colab Enterprise (google.colab.drive.mount is not supported "
            "there); keep data in a Cloud Storage bucket and fetch it with colabkit.stage('gs://...')"
        )
    mountpoint = os.fspath(mountpoint)
    if " " in mountpoint:
        raise ArgumentError(f"mount_drive(mountpoint={mountpoint!r}): Colab refuses mountpoints containing a space")
    if not os.path.isabs(mountpoint):
        raise ArgumentError(f"mount_drive(mountpoint={mountpoint!r}): give an absolute path such as '/content/drive'")
    host = rt.host_path(mountpoint)
    state = _mount_state(host, rt)
    if state == "mounted" and not force_remount:
        _remember(mountpoint, timeout, readonly)
        return _mydrive(host)
    if state == "invalid":
        raise ArgumentError(
            f"mount_drive(mountpoint={mountpoint!r}): {host} is a file or a symlink, not a folder; "
            "pass another mountpoint or remove it"
        )
    if state == "foreign":
        entries = sorted(entry.name for entry in host.iterdir())
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise ArgumentError(
            f"mount_drive(mountpoint={mountpoint!r}): {host} already holds files that are not Google Drive "
            f"({len(entries)} entries: {shown}); something wrote there before Drive was mounted. Move them away "
            f"(e.g. mv {host} {host}_local) or pass another mountpoint; Colab would refuse too"
        )
    host.parent.mkdir(parents=True, exist_ok=True)
    drive = _colab_drive()
    kwargs = _mount_kwargs(
        drive.mount, force_remount=force_remount or state == "broken", timeout=timeout, readonly=readonly
    )
    try:
        drive.mount(mountpoint, **kwargs)
    except (ValueError, NotImplementedError, KeyError) as exc:
        raise _explain_mount_error(exc, mountpoint) from exc
    except Exception as exc:
        if type(exc).__name__ == "MessageError":
            raise _explain_mount_error(exc, mountpoint) from exc
        raise
    mydrive = _mydrive(host)
    if not mydrive.is_dir():
        raise DriveError(
            errno.ENOENT,
            f"Colab reported Drive mounted at {mountpoint} but {mydrive} does not exist; "
            "run mount_drive(force_remount=True)",
        )
    _remember(mountpoint, timeout, readonly)
    return mydrive


def _remember(mountpoint: str, timeout: float, readonly: bool) -> None:
    _last_mount.mountpoint, _last_mount.timeout, _last_mount.readonly = mountpoint, timeout, readonly


def drive_mounted() -> bool:
    """Whether Google Drive is mounted at the last-used (else the default) mountpoint. False off Colab."""
    rt = runtime()
    if rt.kind != "colab":
        return False
    return _mount_state(rt.host_path(_last_mount.mountpoint), rt) == "mounted"


def flush_drive(remount: bool = True) -> Path | None:
    """Push pending writes to Google Drive now.

    Drive keeps written files in a local cache and uploads them later; a
    runtime that dies first loses them. Colab offers only "flush and unmount",
    so this unmounts and, with ``remount=True``, mounts again with the options
    of the last :func:`mount_drive`. Off Colab it says so and does nothing.

    Args:
        remount: Mount Drive again after flushing.

    Returns:
        The ``MyDrive`` folder when remounted, else None.

    Raises:
        DriveError: The flush failed (the data may still be only in the local cache).

    Example:
        >>> colabkit.flush_drive()  # doctest: +SKIP
    """
    rt = runtime()
    if rt.kind != "colab":
        _notify.say(f"not on Colab ({rt.kind}): there is no Drive cache to flush")
        return None
    options = dataclasses.replace(_last_mount)
    state = _mount_state(rt.host_path(options.mountpoint), rt)
    if state not in ("mounted", "broken"):
        _notify.say(f"Drive is not mounted at {options.mountpoint}: nothing to flush")
        return None
    with contextlib.suppress(OSError):
        os.sync()
    drive = _colab_drive()
    try:
        params = inspect.signature(drive.flush_and_unmount).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    try:
        if "timeout_ms" in params:
            drive.flush_and_unmount(timeout_ms=_FLUSH_TIMEOUT_MS)
        else:
            drive.flush_and_unmount()
    except (ValueError, NotImplementedError) as exc:
        raise DriveError(
            errno.EIO,
            f"flushing Drive failed ({exc}); recent writes may exist only in the local cache: keep the runtime "
            "alive, run mount_drive(force_remount=True), then flush_drive() again",
        ) from exc
    if not remount:
        return None
    return mount_drive(options.mountpoint, timeout=options.timeout, readonly=options.readonly)


_remount_lock = threading.Lock()
# How many remounts errno 107 has triggered. A retry whose attempt began before the
# latest remount failed on the old, dead transport, which that remount already replaced:
# when DriveFS dies, every parallel copier fails at once, and they need one remount, not one each.
_remounts = [0]


def _remount_on_enotconn(exc: BaseException, attempt: int, seen: int) -> None:
    """Force-remount Drive after errno 107, unless a remount since ``seen`` already did."""
    if not (isinstance(exc, OSError) and exc.errno == errno.ENOTCONN):
        return
    if runtime().kind != "colab":
        return
    with _remount_lock:
        if _remounts[0] != seen:
            return
        _notify.logger.warning("Drive transport lost (errno 107); remounting before retry %d", attempt)
        try:
            mount_drive(
                _last_mount.mountpoint, force_remount=True, timeout=_last_mount.timeout, readonly=_last_mount.readonly
            )
        except Exception:
            # The retry that follows reports the real failure if the mount stays down.
            _notify.logger.exception("remounting Drive after errno 107 failed")
        finally:
            _remounts[0] += 1


def drive_retry(fn: Callable[[], T], *, retries: int = 3, sleep: Callable[[float], None] | None = None) -> T:
    """Call ``fn`` and retry it on Drive's transient errors (errno 5, 107, ...) with backoff.

    On errno 107 ("Transport endpoint is not connected": Drive's process died)
    Drive is force-remounted before the retry when on Colab; when many threads
    fail at once, the first remounts and the others retry on the new mount.
    ``fn`` must be safe to repeat (a read, or an atomic write).

    Args:
        fn: The operation, taking no arguments.
        retries: Extra attempts after the first.
        sleep: Sleep function between attempts (a seam for tests; default ``time.sleep``).

    Returns:
        What ``fn`` returns.

    Raises:
        OSError: The last error, once retries are used up or for a non-transient error.

    Example:
        >>> data = drive_retry(lambda: Path("/content/drive/MyDrive/x.bin").read_bytes())  # doctest: +SKIP
    """
    if retries < 0:
        raise ArgumentError(f"drive_retry(retries={retries!r}): use 0 or more")
    seen = [_remounts[0]]

    def attempt() -> T:
        seen[0] = _remounts[0]  # read before the call: which transport this attempt runs on
        return fn()

    def on_retry(exc: BaseException, number: int) -> None:
        _remount_on_enotconn(exc, number, seen[0])

    return _io.retry(attempt, retries=retries, on_retry=on_retry, sleep=sleep or time.sleep)


def is_drive_path(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` lies on Google Drive (or on the local stand-in for it).

    True under the runtime's Drive mountpoint, under the mountpoint last given
    to :func:`mount_drive`, or anywhere on a ``fuse.drive`` filesystem.

    Args:
        path: Any path; it need not exist.
    """
    rt = runtime()
    target = Path(os.path.abspath(rt.host_path(os.fspath(path))))
    roots = {Path(os.path.abspath(rt.drive_mountpoint))}
    if rt.kind == "colab":
        roots.add(Path(os.path.abspath(rt.host_path(_last_mount.mountpoint))))
    roots |= _drive_mounts(rt) or set()
    return any(target == root or root in target.parents for root in roots)


@dataclasses.dataclass(frozen=True)
class ProjectDirs:
    """The folders of one project on Drive (see :func:`project_dirs`).

    Attributes:
        root: The project folder.
        models: Final and exported models.
        checkpoints: Training checkpoints (resume from here).
        results: Metrics, plots, predictions.
        data: Datasets kept on Drive (stage them to local disk before training).
    """

    root: Path
    models: Path
    checkpoints: Path
    results: Path
    data: Path


def project_dirs(name: str, root: str | os.PathLike[str] | None = None) -> ProjectDirs:
    """Create ``models/``, ``checkpoints/``, ``results/`` and ``data/`` for a project.

    Args:
        name: The project's folder name (one path component, e.g. ``"cifar-resnet"``).
        root: Folder that holds projects; default: ``MyDrive`` (mounted with
            :func:`mount_drive` if needed, or its stand-in off Colab).

    Returns:
        A :class:`ProjectDirs` record of the (existing) folders.

    Raises:
        ArgumentError: ``name`` is empty or not a single folder name.

    Example:
        >>> dirs = colabkit.project_dirs("cifar")  # doctest: +SKIP
        >>> dirs.checkpoints  # doctest: +SKIP
        PosixPath('/content/drive/MyDrive/cifar/checkpoints')
    """
    if not isinstance(name, str) or not name.strip() or name in (".", "..") or "/" in name or "\\" in name:
        raise ArgumentError(
            f"project_dirs(name={name!r}): give a single folder name such as 'cifar-resnet' (no slashes); "
            "use root= to choose where it lives"
        )
    base = mount_drive() if root is None else runtime().host_path(Path(root).expanduser())
    project = base / name
    folders = {key: project / key for key in ("models", "checkpoints", "results", "data")}
    for folder in folders.values():
        drive_retry(functools.partial(folder.mkdir, parents=True, exist_ok=True))
    return ProjectDirs(root=project, **folders)


def mount_type(path: str | os.PathLike[str]) -> str | None:
    """The filesystem type (``fuse.drive``, ``ext4``...) of the mount that holds ``path``.

    Read from ``/proc/mounts``; None where the table cannot be read. ``path`` need not exist.
    """
    text = _mount_table()
    if text is None:
        return None
    real = os.path.realpath(path)
    best, fstype = "", None
    for fields in (line.split() for line in text.splitlines()):
        if len(fields) < 3:
            continue
        point = _unescape_mount_field(fields[1])
        if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, fstype = point, fields[2]
    return fstype
