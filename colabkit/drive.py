"""Google Drive: mount, flush, project folders, and operations that survive Drive's hiccups.

On Colab, :func:`mount_drive` calls ``google.colab.drive.mount``; everywhere
else it hands back a local stand-in folder, so notebook code that saves to
"Drive" runs unchanged on Kaggle, a laptop or in tests.

Drive's FUSE mount is flaky for many small files: operations fail with errno
5 (``Input/output error``) or errno 107 (``Transport endpoint is not
connected``: the DriveFS process died). :func:`drive_retry` retries them
with backoff. Errno 107 needs a remount, and a remount happens only on the
main thread: every ``drive.mount`` first asks the browser for authorisation
through ``google.colab._message``, which is not thread safe (two threads'
requests race, and one can deadlock) and attaches to whatever cell runs. So
a background thread (a checkpoint mirror, a staging copy) that sees errno
107 marks Drive *lost* and waits, bounded, for the main thread; the main
thread remounts once at its next Drive touch (:func:`recover_if_lost`, which
fit's step boundary, ``save()``, ``wait()`` and ``stage()`` call) and wakes
every waiter. A waiter not woken in time raises
:class:`~colabkit.errors.DriveLostError`, its caller parks the work for
later, and colabkit says once which call fixes it.

:func:`mount_table` reads the mount table and :func:`is_drive_path` is the
one answer to "is this on Drive?". Outside-world seams: :func:`_colab_drive`
returns the ``google.colab.drive`` module; the mount table comes from the
runtime probe (``Probe.mounts``: ``/proc/mounts``, or a
:mod:`colabkit.testing` fake's own).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import inspect
import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, TypeVar

from colabkit import _io, _notify
from colabkit.errors import ArgumentError, DriveError, DriveLostError, PlatformError
from colabkit.runtime import Runtime, current_probe, runtime

__all__ = [
    "DRIVE_FSTYPE",
    "LOST_WAIT",
    "DriveMount",
    "MountEntry",
    "ProjectDirs",
    "drive_lost",
    "drive_mounted",
    "drive_mounts",
    "drive_retry",
    "flush_drive",
    "flush_drive_when_script_ends",
    "is_drive_path",
    "mount_drive",
    "mount_table",
    "mount_type",
    "project_dirs",
    "recover_if_lost",
    "wait_recovering",
]

T = TypeVar("T")

DEFAULT_MOUNTPOINT = "/content/drive"
#: The filesystem type of a Google Drive FUSE mount in the mount table.
DRIVE_FSTYPE = "fuse.drive"
# Colab's own "already mounted" test looks for the old name too.
_MYDRIVE_NAMES = ("MyDrive", "My Drive")
_FLUSH_TIMEOUT_MS = 24 * 60 * 60 * 1000
#: Seconds a background thread waits for the main thread to remount a lost Drive before it
#: gives up with :class:`~colabkit.errors.DriveLostError` (its caller parks the work for later).
LOST_WAIT = 120.0
# How often a waiter that no remount in this process can wake (no kernel here) looks at the mount.
_POLL = 2.0


@dataclasses.dataclass
class _MountOptions:
    mountpoint: str = DEFAULT_MOUNTPOINT
    timeout: float = 120
    readonly: bool = False


# What the last successful mount_drive() asked for, so a remount (after a flush,
# or on errno 107) reconnects the same folder with the same options.
_last_mount = _MountOptions()
# The mode colabkit mounted each folder in. DriveFS fixes read-only when it starts, and
# the mount table need not show it, so this record is how a later call knows.
_modes: dict[str, bool] = {}


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
    """The mount table's text: the runtime probe's (``/proc/mounts``, or a fake's), None if unreadable."""
    return current_probe().mounts()


# -- mount table ----------------------------------------------------------------------------------
def _unescape_mount_field(field: str) -> str:
    # /proc/mounts writes space, tab, newline and backslash as octal escapes.
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


@dataclasses.dataclass(frozen=True)
class MountEntry:
    """One line of the mount table (see :func:`mount_table`).

    Attributes:
        source: What is mounted (``drive`` for Google Drive).
        mountpoint: Where, as the table writes it (under a :mod:`colabkit.testing`
            fake, a platform path such as ``/content/drive``).
        fstype: The filesystem type: ``fuse.drive`` (Google Drive), ``ext4``, ``overlay``...
        options: Mount options such as ``("rw", "nosuid")``.
    """

    source: str
    mountpoint: str
    fstype: str
    options: tuple[str, ...] = ()

    @property
    def readonly(self) -> bool:
        """Whether the table marks it read-only (``ro``)."""
        return "ro" in self.options


def mount_table() -> list[MountEntry] | None:
    """Every mount of this machine (or of the active :mod:`colabkit.testing` fake), in table order.

    Returns:
        The entries, or None where the table cannot be read (not Linux).
    """
    text = _mount_table()
    if text is None:
        return None
    entries = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        options = tuple(_unescape_mount_field(fields[3]).split(",")) if len(fields) > 3 else ()
        entries.append(
            MountEntry(_unescape_mount_field(fields[0]), _unescape_mount_field(fields[1]), fields[2], options)
        )
    return entries


def mount_type(path: str | os.PathLike[str]) -> str | None:
    """The filesystem type (``fuse.drive``, ``ext4``...) of the mount that holds ``path``.

    Read from the mount table; None where it cannot be read. ``path`` need not exist.
    """
    table = mount_table()
    if table is None:
        return None
    rt = runtime()
    real = os.path.realpath(rt.host_path(os.fspath(path)))
    best, fstype = "", None
    for entry in table:
        point = str(rt.host_path(entry.mountpoint))
        if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, fstype = point, entry.fstype
    return fstype


def _drive_entries(rt: Runtime) -> dict[Path, MountEntry] | None:
    """Drive's FUSE mounts by folder on this machine (the last entry of a folder wins), or None."""
    table = mount_table()
    if table is None:
        return None
    return {rt.host_path(entry.mountpoint): entry for entry in table if entry.fstype == DRIVE_FSTYPE}


@dataclasses.dataclass(frozen=True)
class DriveMount:
    """A Google Drive mount found in the mount table (see :func:`drive_mounts`).

    Attributes:
        mountpoint: Where Colab was asked to mount it, e.g. ``/content/drive``.
        path: That folder on this machine (it differs from ``mountpoint`` only under the fakes).
        alive: Its DriveFS process answers. A dead mount answers errno 107; Colab leaves one
            behind when DriveFS crashes, and when Drive is mounted at another folder (the
            new mount stops the old DriveFS).
        readonly: Mounted read-only; None when neither the table nor colabkit knows.
    """

    mountpoint: str
    path: Path
    alive: bool
    readonly: bool | None

    @property
    def mydrive(self) -> Path:
        """Its ``MyDrive`` folder."""
        return _mydrive(self.path)


def drive_mounts() -> list[DriveMount]:
    """Every Google Drive mount in the mount table, live or dead, whoever mounted it.

    A user's own ``drive.mount('/content/gdrive')`` counts as much as
    :func:`mount_drive`'s. Empty off Colab and where the table cannot be read.
    """
    rt = runtime()
    found = []
    for host, entry in (_drive_entries(rt) or {}).items():
        found.append(DriveMount(entry.mountpoint, host, _alive(host), _mode(host, entry)))
    return found


def _alive(host: Path) -> bool:
    # A dead DriveFS mount answers stat() with errno 107; a live one always shows MyDrive.
    try:
        os.stat(host)
    except OSError:
        return False
    return _has_mydrive(host)


def _mode(host: Path, entry: MountEntry | None) -> bool | None:
    if entry is not None and entry.readonly:
        return True
    return _modes.get(str(host))


MountState = Literal["mounted", "broken", "absent", "empty", "foreign", "invalid"]


def _mount_state(host: Path, rt: Runtime) -> MountState:
    """What is at the mountpoint ``host``: a live Drive mount, a dead one, nothing, or foreign files."""
    # The mount table is the truth where it can be read: a "MyDrive" folder that is not
    # a mount was written by someone before mounting, and would silently swallow
    # "saved to Drive" files. Without a table, the folder layout (Colab's own test) decides.
    mounts = _drive_entries(rt)
    try:
        if mounts is not None:
            if host in mounts:
                return "mounted" if _alive(host) else "broken"
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
    image = ""
    if "COLAB_RELEASE_TAG" in current_probe().environ and rt.kind != "kaggle":
        image = ": a Colab image outside hosted Colab (a local runtime), where Drive cannot be mounted"
    _notify.say_once(
        "drive-stand-in",
        f"not on Colab ({rt.kind}{image}), so Google Drive is not mounted; using the local folder {folder} "
        "as a stand-in (set COLABKIT_DRIVE_DIR to choose another)",
    )
    return folder


def _expand_home(mountpoint: str) -> str:
    # Colab expands "~" itself (HOME is /root there); the probe's HOME, so a fake's home stays in the fake.
    if mountpoint == "~" or mountpoint.startswith("~/"):
        home = current_probe().environ.get("HOME")
        if home:
            return home.rstrip("/") + mountpoint[1:] if mountpoint != "~" else home
    return os.path.expanduser(mountpoint)


def _timeout_ms(timeout: float) -> int:
    # Colab turns timeout_ms into whole seconds for its authorisation request, and 0 there
    # means "no timeout at all": never hand it less than one second.
    return max(1000, round(timeout * 1000))


def _mount_kwargs(mount: Callable[..., Any], *, force_remount: bool, timeout: float, readonly: bool) -> dict[str, Any]:
    """Only the keyword arguments this Colab's ``drive.mount`` accepts."""
    try:
        params = inspect.signature(mount).parameters
    except (TypeError, ValueError):  # builtins or C functions without a signature
        params = {}  # type: ignore[assignment]
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    wanted: dict[str, Any] = {"force_remount": force_remount, "timeout_ms": _timeout_ms(timeout)}
    if readonly:
        wanted["readonly"] = True
    kwargs = {key: value for key, value in wanted.items() if takes_any or key in params}
    if readonly and "readonly" not in kwargs:
        raise PlatformError(
            "mount_drive(readonly=True): this runtime's google.colab.drive.mount has no read-only mode "
            "(added to Colab in October 2022); call mount_drive() without readonly, or use a current Colab runtime"
        )
    return kwargs


def _missing_variable(exc: KeyError, action: str) -> PlatformError:
    name = str(exc.args[0]) if exc.args else "?"
    if name == "TBE_EPHEM_CREDS_ADDR":
        why = "the address of the runtime's credentials service, which hosted Colab sets in the notebook's environment"
    else:
        why = "which hosted Colab sets in the notebook's environment"
    return PlatformError(
        f"{action} needs the environment variable {name} ({why}), and this process lacks it: it was started "
        "with a cleaned environment (env -i, subprocess with env=...) or is not a hosted Colab runtime. Mount "
        "Drive from the notebook itself, or pass the variable on to the child process"
    )


def _explain_mount_error(exc: BaseException, mountpoint: str, timeout: float) -> BaseException | None:
    """The colabkit error for a failure of Colab's ``drive.mount``; None for one it does not know."""
    text = str(exc)
    kind = type(exc)
    if isinstance(exc, NotImplementedError):
        return PlatformError(f"Google Drive cannot be mounted in this runtime: {text}")
    if isinstance(exc, KeyError):
        return _missing_variable(exc, "Colab's drive.mount")
    if kind.__name__ == "MessageError" or "credential propagation" in text:
        return DriveError(
            errno.EACCES,
            f"Drive authorisation failed ({text}); run mount_drive() again and accept the pop-up with the "
            "Google account that runs this notebook (other accounts cannot be mounted)",
        )
    if "domain policy has disabled Drive File Stream" in text:
        return DriveError(
            errno.EACCES,
            f"the Google Workspace account that runs this notebook may not use Drive here: its administrator's "
            f"policy disables Drive File Stream ({text}). Mounting again will not help: open the notebook with "
            "another (e.g. personal) Google account, or ask the Workspace admin to allow Drive for desktop; "
            "meanwhile fetch data with colabkit.stage() from a shared link or a bucket",
        )
    if kind.__module__.startswith("pexpect") and kind.__name__ in ("TIMEOUT", "EOF"):
        waited = _timeout_ms(timeout) / 1000 + 30
        return DriveError(
            errno.ETIMEDOUT,
            f"mounting Drive at {mountpoint} timed out: DriveFS did not answer within {waited:g} s "
            f"(pexpect {kind.__name__}: it hung or died while starting). Run "
            f"mount_drive({mountpoint!r}, force_remount=True) to start it afresh (a longer timeout= helps when "
            "MyDrive holds thousands of items); if it hangs again, use Runtime > Restart session",
        )
    if isinstance(exc, ValueError):
        if "timeout" in text.lower():
            return DriveError(
                errno.ETIMEDOUT,
                f"mounting Drive at {mountpoint} timed out ({text}); Drive times out when a folder (often the top "
                "of MyDrive) holds thousands of items: move them into sub-folders, then retry (retries often "
                "succeed)",
            )
        return DriveError(errno.EIO, f"mounting Drive at {mountpoint} failed: {text}; run mount_drive() again")
    return None


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


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
    the installed version accepts; if Drive is already mounted there in the
    asked mode it does nothing. DriveFS fixes read-only when it starts, so a
    mount in the other mode is remounted. Anywhere else (Kaggle, Jupyter, a
    script, Colab's local-runtime image) it returns a local stand-in folder,
    ``runtime().drive_mountpoint / "MyDrive"`` (``COLABKIT_DRIVE_DIR`` chooses
    it), and says so once, so code that saves to "Drive" runs unchanged.

    Mounting asks the browser for authorisation, which Colab can do only from
    the notebook's main thread; colabkit never mounts from another thread.

    Args:
        mountpoint: Where to mount Drive on Colab (``~`` is expanded, as Colab does). Ignored elsewhere.
        force_remount: Unmount and mount again even if Drive is mounted (the fix for
            errno 107 "Transport endpoint is not connected").
        timeout: Seconds to wait for the mount (and for each folder listing Drive does);
            Colab counts whole seconds, so less than one second counts as one.
        readonly: Mount read-only, so nothing in this notebook can change Drive.

    Returns:
        The ``MyDrive`` folder (or the stand-in).

    Raises:
        ArgumentError: ``mountpoint`` contains a space, is a symlink or a file, or already
            holds files that are not Drive (checked before Colab is asked, so nothing changes);
            ``timeout`` is not positive.
        PlatformError: Colab Enterprise, a Colab too old for ``readonly``, a call from a
            background thread or from a process without a notebook kernel, or an environment
            without Colab's variables.
        DriveError: Colab could not mount Drive (authorisation refused, Workspace policy, timeout...).

    Example:
        >>> mydrive = colabkit.mount_drive()  # doctest: +SKIP
        >>> (mydrive / "results").mkdir(exist_ok=True)  # doctest: +SKIP
    """
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ArgumentError(f"mount_drive(timeout={timeout!r}): the timeout must be a positive number of seconds")
    rt = runtime()
    if rt.kind != "colab":
        return _stand_in(rt)
    if rt.enterprise:
        raise PlatformError(
            "Google Drive cannot be mounted in Colab Enterprise (google.colab.drive.mount is not supported "
            "there); keep data in a Cloud Storage bucket and fetch it with colabkit.stage('gs://...')"
        )
    mountpoint = _expand_home(os.fspath(mountpoint))
    if " " in mountpoint:
        raise ArgumentError(f"mount_drive(mountpoint={mountpoint!r}): Colab refuses mountpoints containing a space")
    if not os.path.isabs(mountpoint):
        raise ArgumentError(f"mount_drive(mountpoint={mountpoint!r}): give an absolute path such as '/content/drive'")
    host = rt.host_path(mountpoint)
    state = _mount_state(host, rt)
    if state == "mounted" and not force_remount:
        current = _mode(host, (_drive_entries(rt) or {}).get(host))
        # Unknown means Colab's default, read-write; asking for read-only then remounts to be sure.
        if current == readonly or (current is None and not readonly):
            _remember(mountpoint, timeout, readonly, host)
            if _loss.lost:
                _connected()  # mounted again behind colabkit's back: the waiters may go on
            return _mydrive(host)
        was = {True: "read-only", False: "read-write", None: "in a mode colabkit cannot tell"}[current]
        _notify.say(
            f"Drive at {mountpoint} is mounted {was}; remounting it {'read-only' if readonly else 'read-write'} "
            "as asked (DriveFS fixes the mode when it starts)"
        )
        force_remount = True
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
    if not _on_main_thread():
        raise PlatformError(
            f"mount_drive({mountpoint!r}) was called from the thread {threading.current_thread().name!r}; Colab's "
            "authorisation request is not thread safe (it can deadlock the notebook), so Drive is mounted only "
            "from the main thread: call mount_drive() in the notebook itself"
        )
    if rt.headless:
        # colab run / colab exec answer no authorisation request: drive.mount would wait for one.
        raise PlatformError(
            f"mount_drive({mountpoint!r}): Drive is not mounted there, and under Google's colab command line "
            "there is no browser to authorise a mount. Mount it from the command line before the script runs: "
            "colab new -s NAME --gpu T4; colab drivemount -s NAME; colab exec -s NAME --env COLABKIT_HEADLESS=1 "
            "-f train.py; colab stop -s NAME (colab run starts a fresh VM without Drive)"
        )
    if not rt.in_notebook:
        raise PlatformError(
            f"mount_drive({mountpoint!r}): Drive is not mounted there, and this process has no notebook kernel "
            "(e.g. a script started with !python) through which Colab could ask for authorisation. Mount Drive "
            f"in a notebook cell first (colabkit.mount_drive({mountpoint!r})), then run the script: it uses that mount"
        )
    host.parent.mkdir(parents=True, exist_ok=True)
    drive = _colab_drive()
    kwargs = _mount_kwargs(
        drive.mount, force_remount=force_remount or state == "broken", timeout=timeout, readonly=readonly
    )
    try:
        drive.mount(mountpoint, **kwargs)
    except Exception as exc:
        explained = _explain_mount_error(exc, mountpoint, timeout)
        if explained is None:
            raise
        raise explained from exc
    mydrive = _mydrive(host)
    if not mydrive.is_dir():
        raise DriveError(
            errno.ENOENT,
            f"Colab reported Drive mounted at {mountpoint} but {mydrive} does not exist; "
            "run mount_drive(force_remount=True)",
        )
    _remember(mountpoint, timeout, readonly, host)
    _connected()
    return mydrive


def _remember(mountpoint: str, timeout: float, readonly: bool, host: Path) -> None:
    _last_mount.mountpoint, _last_mount.timeout, _last_mount.readonly = mountpoint, timeout, readonly
    _modes[str(host)] = readonly


def drive_mounted() -> bool:
    """Whether Google Drive is mounted at the last-used (else the default) mountpoint. False off Colab."""
    rt = runtime()
    if rt.kind != "colab":
        return False
    return _mount_state(rt.host_path(_last_mount.mountpoint), rt) == "mounted"


def _flush_and_unmount(drive: ModuleType) -> None:
    try:
        params = inspect.signature(drive.flush_and_unmount).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    fix = (
        "recent writes may exist only in the local cache: keep the runtime alive, run "
        "mount_drive(force_remount=True), then flush_drive() again"
    )
    try:
        if "timeout_ms" in params:
            drive.flush_and_unmount(timeout_ms=_FLUSH_TIMEOUT_MS)
        else:
            drive.flush_and_unmount()
    except KeyError as exc:
        raise _missing_variable(exc, "Colab's drive.flush_and_unmount") from exc
    except NotImplementedError as exc:
        raise PlatformError(f"Drive cannot be flushed in this runtime: {exc}") from exc
    except subprocess.CalledProcessError as exc:
        raise DriveError(
            errno.EIO,
            f"flushing Drive failed: listing the mounts ({exc.cmd}) exited with status {exc.returncode}; {fix}",
        ) from exc
    except (ValueError, OSError) as exc:
        # OSError: DriveFS's binary is missing or cannot start.
        raise DriveError(errno.EIO, f"flushing Drive failed ({exc}); {fix}") from exc


def flush_drive(remount: bool = True) -> Path | None:
    """Push pending writes to Google Drive now, for every Drive mount there is.

    Drive keeps written files in a local cache and uploads them later; a
    runtime that dies first loses them. Colab offers only "flush and unmount",
    so this unmounts and, with ``remount=True``, mounts again where Drive was
    (with the options of the last :func:`mount_drive`). It looks at every
    ``fuse.drive`` mount in the mount table, so a ``drive.mount('/content/gdrive')``
    of your own is flushed too, and says which mounts were dead (errno 107).
    Off Colab it says so and does nothing.

    Args:
        remount: Mount Drive again after flushing.

    Returns:
        The ``MyDrive`` folder when remounted, else None.

    Raises:
        DriveError: The flush failed (the data may still be only in the local cache).
        PlatformError: This runtime cannot flush (Colab's variables or tools are missing).

    Example:
        >>> colabkit.flush_drive()  # doctest: +SKIP
    """
    rt = runtime()
    if rt.kind != "colab":
        _notify.say(f"not on Colab ({rt.kind}): there is no Drive cache to flush")
        return None
    options = dataclasses.replace(_last_mount)
    ours = rt.host_path(options.mountpoint)
    mounts = drive_mounts()
    if _drive_entries(rt) is None:  # no table: only colabkit's own mountpoint can be judged
        state = _mount_state(ours, rt)
        if state in ("mounted", "broken"):
            mounts = [DriveMount(options.mountpoint, ours, state == "mounted", options.readonly)]
    if not mounts:
        _notify.say("Drive is not mounted (no fuse.drive mount in the mount table): nothing to flush")
        return None
    with contextlib.suppress(OSError):
        os.sync()
    # One DriveFS process serves Drive; flushing it pushes what every mount wrote.
    _flush_and_unmount(_colab_drive())
    dead = [m.mountpoint for m in mounts if not m.alive]
    if dead:
        _notify.say(
            f"Drive mount(s) at {', '.join(dead)} were not connected (errno 107: their DriveFS process stopped, "
            "e.g. when Drive was mounted at another folder); what was written through them before that was flushed"
        )
    if not remount:
        return None
    live = [m for m in mounts if m.alive]
    target = next((m for m in live if m.path == ours), None) or (live[0] if live else None)
    if target is None:
        target = next((m for m in mounts if m.path == ours), None)
    if target is None:
        return None
    readonly = target.readonly if target.readonly is not None else False
    return mount_drive(target.mountpoint, timeout=options.timeout, readonly=readonly)


# -- Drive lost (errno 107) ---------------------------------------------------------------------------
class _LossState:
    """Whether Drive's transport is lost, and how often colabkit found or made a live mount."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.generation = 0  # bumped by every mount that (re)connected Drive
        self.lost = False
        self.tried = False  # the main thread tried to remount during this loss
        self.failed = False  # and that failed: no remount comes until someone mounts by hand
        self.told = False  # the fix was shown for this loss


_loss = _LossState()


def drive_lost() -> bool:
    """Whether a Drive operation hit errno 107 and Drive has not been remounted since."""
    return _loss.lost


def _connected() -> None:
    with _loss.cond:
        _loss.generation += 1
        _loss.lost = _loss.tried = _loss.failed = _loss.told = False
        _loss.cond.notify_all()


def _mark_lost() -> None:
    with _loss.cond:
        if _loss.lost:
            return
        _loss.lost = True
        _loss.tried = _loss.failed = _loss.told = False
    _notify.logger.warning(
        "Google Drive's connection was lost (errno 107) in thread %r; it is remounted on the main thread",
        threading.current_thread().name,
    )


def _fix_call(rt: Runtime) -> str:
    mountpoint = _last_mount.mountpoint
    if rt.in_notebook:
        return f"colabkit.mount_drive({mountpoint!r}, force_remount=True) in a cell"
    return (
        f"from google.colab import drive; drive.mount({mountpoint!r}, force_remount=True) in a notebook cell "
        "(this process has no notebook kernel, so it cannot remount Drive itself)"
    )


def _tell_lost(rt: Runtime, why: str, *, again: bool = False) -> None:
    """Say once per loss (``again``: once more) what fixes it."""
    with _loss.cond:
        if _loss.told and not again:
            return
        _loss.told = True
    message = (
        f"Google Drive is not connected (errno 107) and {why}. Run {_fix_call(rt)}: background copies waiting "
        "for Drive go on by themselves and parked ones are retried at the next save. Local files (checkpoints "
        "included) are intact; resume from them"
    )
    _notify.logger.warning("%s", message)
    if _on_main_thread():
        _notify.warn(message)
    else:
        # A warning raised in a worker (warnings as errors) must not replace the error its caller handles.
        _notify.say(message)


def _remount(seen: int) -> bool:
    """Remount Drive on the main thread, once per loss; True when it is connected again."""
    with _loss.cond:
        if _loss.generation != seen:
            return True  # someone remounted since the failing attempt began
        if _loss.tried:
            return False  # each try opens an authorisation pop-up: once per loss
        _loss.tried = True
    rt = runtime()
    if not rt.in_notebook:
        _tell_lost(rt, "this process cannot remount it")
        return False
    options = dataclasses.replace(_last_mount)
    _notify.logger.warning("remounting Google Drive at %s on the main thread (errno 107)", options.mountpoint)
    try:
        mount_drive(options.mountpoint, force_remount=True, timeout=options.timeout, readonly=options.readonly)
    except Exception as exc:
        _notify.logger.exception("remounting Drive after errno 107 failed")
        with _loss.cond:
            _loss.failed = True
            _loss.cond.notify_all()  # the waiters need not wait for a remount that will not come
        _tell_lost(rt, f"remounting it failed ({exc})", again=True)
        return False
    return True


def recover_if_lost() -> bool:
    """Remount Google Drive if an operation lost its connection (errno 107); main thread only.

    Background threads never remount (Colab's authorisation request is not
    thread safe); they mark Drive lost and wait. colabkit calls this at its
    main-thread Drive touches (fit's step boundaries, ``CheckpointManager.save()``
    and ``wait()``, ``stage()``); call it in your own loop that runs background
    Drive work. It remounts at most once per loss: when that fails, it warns
    with the call that fixes it instead of opening pop-up after pop-up.

    Returns:
        True when Drive was remounted by this call. False when nothing was lost, off
        the main thread, or when the remount failed.
    """
    if not _loss.lost or not _on_main_thread():
        return False
    seen = _loss.generation
    return _remount(seen) and _loss.generation != seen


def wait_recovering(done: Callable[[float], bool], *, interval: float = 0.25) -> None:
    """Wait for background Drive work while remounting Drive for it if it gets lost.

    A main thread that blocks on background copies (a queue join, futures)
    would leave a worker that lost Drive waiting for a remount only the main
    thread may make. ``done(timeout)`` waits up to ``timeout`` seconds and says
    whether the work is finished; between calls this runs :func:`recover_if_lost`.

    Args:
        done: Waits up to the given seconds; returns True when the work is finished.
        interval: Seconds per wait.
    """
    while not done(interval):
        recover_if_lost()


def _wait_for_remount(seen: int, wait: float, rt: Runtime, exc: BaseException) -> None:
    """Block a worker until the main thread (or, with no kernel here, anyone) remounts Drive."""
    deadline = time.monotonic() + wait
    # Without a kernel no remount of this process will come; one from the notebook shows in the mount.
    poll = not rt.in_notebook
    host = rt.host_path(_last_mount.mountpoint)
    if poll:
        _tell_lost(rt, "this process cannot remount it")
    while True:
        with _loss.cond:
            if _loss.generation != seen:
                return
            left = deadline - time.monotonic()
            if left <= 0 or _loss.failed:
                break
            _loss.cond.wait(min(left, _POLL) if poll else left)
            if _loss.generation != seen:
                return
        if poll and _mount_state(host, rt) == "mounted":
            _connected()
            return
    if _loss.failed:
        why = "remounting it on the main thread failed"
    else:
        why = f"nothing on the main thread remounted it within {wait:g} s"
        _tell_lost(rt, why)
    raise DriveLostError(
        errno.ENOTCONN,
        f"Google Drive is not connected (errno 107) and {why}; the operation was left for later. Run {_fix_call(rt)}",
    ) from exc


def _on_enotconn(exc: BaseException, seen: int, wait: float) -> None:
    rt = runtime()
    if rt.kind != "colab":
        return  # nothing to remount off Colab: a plain retry
    _mark_lost()
    if _on_main_thread():
        _remount(seen)  # the retry reports the real failure if Drive stays down
    else:
        _wait_for_remount(seen, wait, rt, exc)


def _retryable(exc: BaseException) -> bool:
    # A DriveLostError already waited for a remount that did not come: its caller parks the work.
    return _io.is_transient(exc) and not isinstance(exc, DriveLostError)


def drive_retry(
    fn: Callable[[], T],
    *,
    retries: int = 3,
    sleep: Callable[[float], None] | None = None,
    lost_wait: float | None = None,
) -> T:
    """Call ``fn`` and retry it on Drive's transient errors (errno 5, 107, ...) with backoff.

    On errno 107 ("Transport endpoint is not connected": DriveFS died) on
    Colab, Drive must be remounted before a retry can work. On the main
    thread this remounts once (however many operations failed at the same
    moment). On any other thread it marks Drive lost and waits up to
    ``lost_wait`` seconds for the main thread to remount (see
    :func:`recover_if_lost`), then retries; if no remount comes it raises
    :class:`~colabkit.errors.DriveLostError` so the caller can park the work,
    and warns once with the call that fixes it. ``fn`` must be safe to
    repeat (a read, or an atomic write).

    Args:
        fn: The operation, taking no arguments.
        retries: Extra attempts after the first.
        sleep: Sleep function between attempts (a seam for tests; default ``time.sleep``).
        lost_wait: Seconds a background thread waits for a remount (default :data:`LOST_WAIT`).

    Returns:
        What ``fn`` returns.

    Raises:
        DriveLostError: On a background thread, Drive stayed lost for ``lost_wait`` seconds.
        OSError: The last error, once retries are used up or for a non-transient error.

    Example:
        >>> data = drive_retry(lambda: Path("/content/drive/MyDrive/x.bin").read_bytes())  # doctest: +SKIP
    """
    if retries < 0:
        raise ArgumentError(f"drive_retry(retries={retries!r}): use 0 or more")
    wait = LOST_WAIT if lost_wait is None else lost_wait
    seen = [_loss.generation]

    def attempt() -> T:
        with _loss.cond:
            lost, seen[0] = _loss.lost, _loss.generation  # which mount this attempt runs on
        if lost and not _on_main_thread():
            # Never start on a mount the main thread is replacing: its folder is empty meanwhile.
            _wait_for_remount(seen[0], wait, runtime(), OSError(errno.ENOTCONN, "Google Drive is being remounted"))
            seen[0] = _loss.generation
        return fn()

    def on_retry(exc: BaseException, number: int) -> None:
        if isinstance(exc, OSError) and exc.errno == errno.ENOTCONN:
            _on_enotconn(exc, seen[0], wait)

    return _io.retry(attempt, retries=retries, on_retry=on_retry, sleep=sleep or time.sleep, should_retry=_retryable)


def is_drive_path(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` lies on Google Drive (or on the local stand-in for it).

    The one test colabkit uses everywhere. True under the runtime's Drive
    mountpoint (or stand-in), under the mountpoint last given to
    :func:`mount_drive`, or anywhere on a ``fuse.drive`` mount of the mount
    table, whoever mounted it.

    Args:
        path: Any path; it need not exist.
    """
    rt = runtime()
    target = Path(os.path.abspath(rt.host_path(os.fspath(path))))
    roots = {Path(os.path.abspath(rt.drive_mountpoint))}
    if rt.kind == "colab":
        roots.add(Path(os.path.abspath(rt.host_path(_last_mount.mountpoint))))
    roots |= {Path(os.path.abspath(host)) for host in _drive_entries(rt) or {}}
    return any(target == root or root in target.parents for root in roots)


_end_flush: list[Callable[..., None]] = []  # the armed hook, at most one per process


def flush_drive_when_script_ends(path: str | os.PathLike[str]) -> bool:
    """Under Google's ``colab`` command line, push Drive's cache when the script ends.

    ``colab run`` sends the script to the VM's kernel as one cell and, once it
    finishes, kills the kernel and releases the VM: ``atexit`` never runs, and
    whatever DriveFS still holds in its local cache is lost. So on a headless
    Colab runtime (:attr:`Runtime.headless`) this arms one hook on the kernel's
    ``post_run_cell`` event (interpreter exit without a kernel) that runs
    :func:`flush_drive` without remounting, after everything the script wrote.
    Anywhere else, or when ``path`` is not on Drive, it does nothing.

    Args:
        path: What must reach Drive (a checkpoint folder).

    Returns:
        Whether the flush is armed (now or by an earlier call).
    """
    rt = runtime()
    if not rt.headless or not is_drive_path(path):
        return False
    if _end_flush:
        return True
    shell = current_probe().ipython()
    events = getattr(shell, "events", None)

    def flush_at_end(*_: Any) -> None:
        if events is not None:
            with contextlib.suppress(ValueError):
                events.unregister("post_run_cell", flush_at_end)
        _end_flush.clear()
        try:
            flush_drive(remount=False)
        except Exception:
            _notify.logger.exception("flushing Drive as the script ended failed; recent writes may be lost")
            return
        _notify.say("Drive flushed and unmounted as the script ended, before the VM is released")

    if events is not None:
        events.register("post_run_cell", flush_at_end)
    else:
        import atexit

        atexit.register(flush_at_end)
    _end_flush.append(flush_at_end)
    _notify.say_once(
        "drive-flush-at-end",
        f"{path} is on Drive and this script runs under Google's colab command line: Drive will be flushed "
        "(and unmounted) when the script ends, so the checkpoints are on Drive before the VM is released",
    )
    return True


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
