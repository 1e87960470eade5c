"""The notebook session: an honest heartbeat, the session clock, a clean end, downloads.

Free notebook runtimes end for three reasons: the idle timeout, the hard
session cap (Colab about 12 h, Kaggle 12 h or 9 h on TPU) and preemption.
Nothing here cheats those rules: there are no simulated clicks, no browser
JavaScript, no reconnect scripts. What it does is keep output flowing while a
long cell runs, say how much time is left, and make sure results are saved
before the end.

Seams (replaced in tests): :func:`_colab_module` returns ``google.colab``
submodules; :func:`_default_display` shows the heartbeat; the clock is the
runtime probe's (``colabkit.testing`` fakes take a ``now=``) or the
``clock=`` argument.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

from colabkit import _io, _notify, display
from colabkit.display import Handle
from colabkit.errors import ArgumentError, PathNotFoundError, PlatformError
from colabkit.runtime import current_probe, runtime

__all__ = [
    "DEFAULT_WARN_AT",
    "Keepalive",
    "PathNotFoundError",
    "SessionWatch",
    "download",
    "end_session",
    "keepalive",
    "session_time_left",
]

#: Time-left thresholds at which the heartbeat (and fit) warn.
DEFAULT_WARN_AT: tuple[timedelta, ...] = (timedelta(minutes=30), timedelta(minutes=10))

THREAD_NAME = "colabkit-keepalive"
_JOIN_TIMEOUT = 10.0
# files.download streams the file through the browser tab; past this it is slow and fragile.
_BIG_DOWNLOAD = 2 * 1024**3


# -- seams ----------------------------------------------------------------------------------------
def _colab_module(name: str) -> ModuleType:
    """``google.colab.<name>`` (``files``, ``runtime``): the seam tests replace."""
    import importlib

    try:
        return importlib.import_module(f"google.colab.{name}")
    except ImportError as exc:
        raise PlatformError(
            f"google.colab.{name} cannot be imported although this looks like Colab; run in a hosted Colab runtime"
        ) from exc


def _now() -> datetime:
    return current_probe().now()


#: A display function: shows ``obj`` once and returns a handle for in-place updates
#: (``IPython.display.display(obj, display_id=True)``), or None where it cannot.
DisplayFunction = Callable[[Any], "Handle | None"]


def _default_display(obj: Any) -> Handle | None:
    """Show ``obj`` in the notebook cell with a display id (:mod:`colabkit.display`); None elsewhere."""
    screen = display.screen()
    return screen.show(obj) if screen.notebook else None


# -- session clock --------------------------------------------------------------------------------
def session_time_left(*, now: datetime | None = None) -> timedelta | None:
    """Estimated time before the platform ends this session.

    The deadline is the runtime's start (the container's start, else system
    boot, which overestimates the session's age and so errs on the safe side)
    plus the platform's cap: Colab 12 h, Kaggle 12 h (9 h on TPU), or
    ``COLABKIT_SESSION_HOURS`` when set (e.g. 24 for Colab Pro+). Platforms
    do not publish their limits and free sessions often end earlier, so
    checkpoint on a wall-clock interval as well.

    Args:
        now: The current time (default: the runtime probe's clock).

    Returns:
        Time left (never negative), or None off Colab and Kaggle unless
        ``COLABKIT_SESSION_HOURS`` is set.

    Example:
        >>> left = colabkit.session_time_left()
        >>> left is None or left.total_seconds() >= 0
        True
    """
    deadline = runtime().session_deadline
    if deadline is None:
        return None
    return max(deadline - (now or _now()), timedelta(0))


def _format_delta(delta: timedelta) -> str:
    seconds = max(int(delta.total_seconds()), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"


def _thresholds(warn_at: Iterable[timedelta | float]) -> tuple[timedelta, ...]:
    out = []
    for value in warn_at:
        try:
            delta = value if isinstance(value, timedelta) else timedelta(minutes=float(value))
        except (TypeError, ValueError):
            raise ArgumentError(
                f"warn_at={value!r}: give thresholds as timedeltas or minutes, e.g. warn_at=(30, 10)"
            ) from None
        if delta <= timedelta(0):
            raise ArgumentError(f"warn_at={value!r}: thresholds must be positive (timedelta or minutes)")
        out.append(delta)
    return tuple(sorted(out, reverse=True))


class SessionWatch:
    """Tells once per threshold when the session's time left falls below it.

    The heartbeat uses it; so can a training loop (``fit(time_limit="session")``)::

        watch = SessionWatch()
        for epoch in ...:
            for message in watch.check():
                print(message)

    Args:
        warn_at: Thresholds as timedeltas or minutes (default 30 and 10 minutes).
        deadline: The session deadline (default: the runtime's, read now).
        clock: The current time (default: the runtime probe's clock).
    """

    def __init__(
        self,
        warn_at: Iterable[timedelta | float] = DEFAULT_WARN_AT,
        *,
        deadline: datetime | None = None,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.warn_at = _thresholds(warn_at)
        self.deadline = deadline if deadline is not None else runtime().session_deadline
        self._clock = clock or _now
        self._passed: set[timedelta] = set()

    def time_left(self) -> timedelta | None:
        """Time before the deadline (never negative), or None when unknown."""
        if self.deadline is None:
            return None
        return max(self.deadline - self._clock(), timedelta(0))

    def check(self) -> list[str]:
        """Warnings for thresholds crossed since the last call (usually none)."""
        left = self.time_left()
        if left is None:
            return []
        crossed = [limit for limit in self.warn_at if left <= limit and limit not in self._passed]
        if not crossed:
            return []
        self._passed.update(crossed)
        return [
            f"about {_format_delta(left)} of session time left (under {int(min(crossed).total_seconds() // 60)} "
            "min): save checkpoints and results to Drive now"
        ]


# -- keepalive ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class HeartbeatLine:
    """One heartbeat text; shows as plain text (no quotes) in notebooks."""

    text: str

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return self.text


_running_lock = threading.Lock()
_running: Keepalive | None = None


class Keepalive:
    """A heartbeat for long cells. Create it with :func:`keepalive`.

    What it does: while active, a daemon thread named ``colabkit-keepalive``
    refreshes one status line every ``interval`` seconds with the elapsed
    time and the session time left: in a notebook one display output updated
    in place, in a terminal one log line per interval. When the time left
    falls under a threshold (default 30 and 10 minutes) the line says so and a
    warning is logged.

    What it does not do: it does not defeat idle timeouts or session limits.
    It sends no clicks or key presses, runs no JavaScript (it never calls
    ``google.colab.output.eval_js``, which is not thread-safe) and does not
    reconnect anything. A running cell with an open tab is what keeps Colab
    busy; when the cap comes, the session ends regardless, so save
    checkpoints (``CheckpointManager``) and resume.

    Only one heartbeat runs per process: starting a second returns the
    running one, and stopping through a handle that did not start it does
    nothing. Errors inside the thread are logged to the ``colabkit`` logger.
    """

    def __init__(
        self,
        interval: float = 60,
        *,
        message: str | None = None,
        warn_at: Iterable[timedelta | float] = DEFAULT_WARN_AT,
        clock: Callable[[], datetime] | None = None,
        display: DisplayFunction | None = None,
    ) -> None:
        if not (isinstance(interval, (int, float)) and interval > 0):
            raise ArgumentError(f"keepalive(interval={interval!r}): give a positive number of seconds, e.g. 60")
        self.interval = float(interval)
        self.message = message
        self._warn_at = _thresholds(warn_at)
        self._clock = clock or _now
        self._display = display
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handle: Handle | None = None
        self._started_at: datetime | None = None
        self._watch: SessionWatch | None = None
        self._warnings: list[str] = []
        self._beat_lock = threading.Lock()
        self.beats = 0
        self.last_error: BaseException | None = None

    # -- lifecycle --------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """Whether this heartbeat's thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> Keepalive:
        """Start the heartbeat; returns the heartbeat that is running (maybe an earlier one)."""
        global _running
        if runtime().headless:
            # No browser tab to keep busy: google-colab-cli holds the VM for as long as the
            # script runs and releases it when the script ends.
            _notify.say_once(
                "keepalive-headless",
                "keepalive is not needed under Google's colab command line (colab run / colab exec): the CLI "
                "holds the VM while the script runs and releases it at the end; nothing was started",
            )
            return self
        with _running_lock:
            if _running is not None and _running.running:
                return _running
            # A fresh Event per run: a thread that outlived stop() (stuck in a display
            # call) must not be revived by a restart.
            self._stop = threading.Event()
            self._started_at = self._clock()
            self._watch = SessionWatch(self._warn_at, clock=self._clock)
            self._warnings = []
            self._check_session()  # started with little time left: say so at once
            # Shown from the calling (main) thread so it lands in this cell's output;
            # the heartbeat thread only updates it.
            show = self._display if self._display is not None else _default_display
            try:
                self._handle = show(HeartbeatLine(self._render()))
            except Exception:
                _notify.logger.exception("colabkit keepalive: cannot display the heartbeat; logging it instead")
                self._handle = None
            self._thread = threading.Thread(target=self._run, args=(self._stop,), name=THREAD_NAME, daemon=True)
            _running = self
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the heartbeat at once (if this handle started it) and show a final line."""
        global _running
        with _running_lock:
            thread = self._thread
            if thread is None:
                return
            self._stop.set()
            if thread is not threading.current_thread():
                # Event.wait returns at once; only a display call stuck mid-beat can delay this.
                thread.join(timeout=_JOIN_TIMEOUT)
                if thread.is_alive():
                    _notify.logger.warning("colabkit keepalive: the heartbeat thread is stuck in a display call")
            self._thread = None
            if _running is self:
                _running = None
        elapsed = _format_delta(self._clock() - self._started_at) if self._started_at else "0:00:00"
        self._emit(f"colabkit keepalive stopped after {elapsed}")

    def __enter__(self) -> Keepalive:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- the thread -------------------------------------------------------------------------------
    def _run(self, stop: threading.Event) -> None:
        # Event.wait, not sleep: stop() is answered at once.
        while not stop.wait(self.interval):
            self.beat()

    def beat(self) -> None:
        """Refresh the heartbeat line once (the thread calls this every ``interval``)."""
        with self._beat_lock:  # one beat at a time, even if called by hand
            try:
                self._check_session()
                self.beats += 1
                self._emit(self._render())
            except Exception as exc:
                self.last_error = exc
                _notify.logger.exception("colabkit keepalive: heartbeat failed (it keeps running)")

    def _check_session(self) -> None:
        if self._watch is None:
            return
        for warning in self._watch.check():
            self._warnings = [warning]
            _notify.logger.warning("colabkit: %s", warning)

    def _render(self) -> str:
        now = self._clock()
        started = self._started_at or now
        parts = [f"colabkit keepalive: running {_format_delta(now - started)}"]
        left = self._watch.time_left() if self._watch is not None else None
        if left is not None:
            parts.append(f"session left ~{_format_delta(left)}")
        if self.message:
            parts.append(self.message)
        parts.append(f"at {now.astimezone(timezone.utc):%H:%M:%S} UTC")
        line = " | ".join(parts)
        if self._warnings:
            line += f"\nWARNING: {self._warnings[-1]}"
        return line

    def _emit(self, text: str) -> None:
        if self._handle is not None:
            self._handle.update(HeartbeatLine(text))
        else:
            _notify.logger.info("%s", text)
            print(text, file=sys.stderr, flush=True)


def keepalive(
    interval: float = 60,
    *,
    message: str | None = None,
    warn_at: Iterable[timedelta | float] = DEFAULT_WARN_AT,
    clock: Callable[[], datetime] | None = None,
    display: DisplayFunction | None = None,
) -> Keepalive:
    """A heartbeat for long-running cells (see :class:`Keepalive` for what it does and does not do).

    Use it as a context manager, or call ``start()`` and ``stop()``::

        with colabkit.keepalive(message="training"):
            train()

    It keeps output flowing during long cells and warns before the session
    ends. It does NOT defeat idle or session limits and simulates no user
    activity.

    Args:
        interval: Seconds between heartbeats.
        message: Extra text shown on the heartbeat line.
        warn_at: Time-left thresholds that trigger a warning (timedeltas or minutes;
            default 30 and 10 minutes).
        clock: The current time (a seam for tests; default the runtime probe's clock).
        display: Display function for notebooks (a seam for tests; default
            ``IPython.display.display(..., display_id=True)``, log lines in a terminal).

    Returns:
        A :class:`Keepalive`, not yet started (``with`` or ``start()`` starts it).

    Raises:
        ArgumentError: ``interval`` or a threshold is not positive.
    """
    return Keepalive(interval, message=message, warn_at=warn_at, clock=clock, display=display)


def _stop_running_keepalive() -> bool:
    with _running_lock:
        running = _running
    if running is None:
        return False
    running.stop()
    return True


# -- end of session -------------------------------------------------------------------------------
def _pending_waiters() -> list[Callable[[], None]]:
    """The wait() of every live CheckpointManager (none when checkpoints were never imported)."""
    checkpoints = sys.modules.get("colabkit.checkpoint")
    if checkpoints is None:
        return []  # no manager can exist, and importing it would import torch
    return [manager.wait for manager in checkpoints.live_managers()]


def end_session(*, flush: bool = True, unassign: bool = False) -> None:
    """Finish the session cleanly: wait for saves, flush Drive, optionally release the runtime.

    In order: stops a running :func:`keepalive`; waits for pending work
    of every open ``CheckpointManager`` (commits and mirrors to Drive);
    with ``flush``, syncs disks and flushes Drive (Colab; Drive is remounted
    unless ``unassign`` follows); with ``unassign``, releases the Colab
    runtime (``google.colab.runtime.unassign()``) so the GPU quota is not
    burned idle. Each step that does not apply here is skipped and said so.

    Args:
        flush: Push pending Drive writes.
        unassign: Release the Colab runtime afterwards (this ends the session: unsaved
            variables and local files are gone).

    Raises:
        PlatformError: Colab refused to release the runtime.

    Example:
        >>> colabkit.end_session(unassign=True)  # doctest: +SKIP
    """
    rt = runtime()
    done: list[str] = []
    skipped: list[str] = []
    if _stop_running_keepalive():
        done.append("stopped the keepalive heartbeat")
    waiters = _pending_waiters()
    failures = 0
    for fn in waiters:
        try:
            fn()
        except Exception:
            failures += 1
            _notify.logger.exception("colabkit end_session: a pending save failed while waiting for it")
    if waiters:
        done.append(
            f"waited for {len(waiters)} pending save(s)" + (f", {failures} failed (see log)" if failures else "")
        )
    if unassign and failures and rt.kind == "colab":
        # Releasing the runtime now would delete the only good copy (the local one).
        unassign = False
        _notify.warn(
            f"end_session(unassign=True): not releasing the runtime because {failures} pending save(s) failed "
            "(see the log above); the local copies are still here. Fix the cause (e.g. free space on Drive), then "
            "call end_session(unassign=True) again: failed copies are retried"
        )
        skipped.append("releasing the runtime (a save failed; its local copy would be lost)")
    if flush:
        with contextlib.suppress(OSError):
            os.sync()
        if rt.kind == "colab":
            from colabkit.drive import drive_mounted, drive_mounts, flush_drive

            # Every Drive mount counts, a drive.mount('/content/gdrive') of the user's own too.
            mounts = drive_mounts()
            if mounts or drive_mounted():
                flush_drive(remount=not unassign)
                where = ", ".join(m.mountpoint for m in mounts)
                done.append(f"flushed Drive ({where})" if where else "flushed Drive")
                if not unassign:
                    done.append("remounted it")
            else:
                skipped.append("Drive flush (Drive is not mounted)")
        else:
            done.append("synced local disks")
            skipped.append(f"Drive flush (not on Colab: {rt.kind} has no Drive cache)")
    if unassign:
        if rt.kind == "colab":
            _notify.say("end_session: " + "; ".join([*done, "releasing the Colab runtime now"]))
            try:
                _colab_module("runtime").unassign()
            except Exception as exc:
                raise PlatformError(
                    f"Colab refused to release the runtime ({exc}); use Runtime > Disconnect and delete runtime"
                ) from exc
            return
        fix = "use the power button (Stop session)" if rt.kind == "kaggle" else "just stop the process"
        skipped.append(f"releasing the runtime (only Colab can do that from code; on {rt.kind}, {fix})")
    summary = "end_session: " + ("; ".join(done) if done else "nothing to do")
    if skipped:
        summary += "; skipped " + "; ".join(skipped)
    _notify.say(summary)


# -- downloads ------------------------------------------------------------------------------------
def _zip(folder: Path, out: Path, *, progress: bool) -> Path:
    from colabkit.data.archive import make_archive

    return make_archive(folder, out, progress=progress)


def download(path: str | os.PathLike[str]) -> Path:
    """Get a file or folder to your own computer (or as close as the runtime allows).

    On Colab the browser downloads it (``google.colab.files.download``; a
    folder is zipped first with :func:`colabkit.make_archive`; keep the tab
    open until it finishes). A process without a notebook kernel (a script
    started with ``!python``) cannot reach the browser, so there it says where
    the file is and how to download it from the file browser. On Kaggle it is
    copied into ``/kaggle/working`` (a folder as one zip) so it appears in the
    notebook's Output panel. Elsewhere it is already on this machine, so this
    only says where.

    Args:
        path: A file or folder.

    Returns:
        The path that was handed to the browser, copied to Kaggle's output, or found locally.

    Raises:
        PathNotFoundError: ``path`` does not exist.

    Example:
        >>> colabkit.download("results/metrics.csv")  # doctest: +SKIP
    """
    rt = runtime()
    source = rt.host_path(Path(path).expanduser())
    if not source.exists():
        raise PathNotFoundError(
            errno.ENOENT, f"download({os.fspath(path)!r}): no such file or folder (looked at {source.absolute()})"
        )
    if rt.kind == "colab":
        target = source
        if source.is_dir():
            spool = rt.host_path(Path(tempfile.gettempdir()) / "colabkit-downloads")
            target = _zip(source, spool / f"{source.name}.zip", progress=rt.in_notebook)
        # files.download talks to the browser through the kernel (get_ipython().kernel).
        if getattr(current_probe().ipython(), "kernel", None) is None:
            _notify.say(
                f"{target.absolute()} is ready, but this process has no notebook kernel (e.g. a script started "
                "with !python), so it cannot start a browser download. Open the Files panel (the folder icon on "
                f"the left), right-click {target.name} and choose Download, or run colabkit.download({str(target)!r}) "
                "in a notebook cell"
            )
            return target
        size = target.stat().st_size
        if size > _BIG_DOWNLOAD:
            _notify.say(
                f"{target.name} is {_io.human_bytes(size)}: browser downloads this big are slow and break easily; "
                "copying it to Drive (mount_drive()) is more reliable"
            )
        _colab_module("files").download(str(target))
        return target
    if rt.kind == "kaggle":
        working = rt.host_path("/kaggle/working")
        resolved = source.resolve()
        if resolved == working.resolve() or working.resolve() in resolved.parents:
            _notify.say(f"{source} is already in /kaggle/working: it appears in the notebook's Output panel")
            return source
        working.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            target = _zip(source, working / f"{source.name}.zip", progress=rt.in_notebook)
        else:
            target = working / source.name
            _io.copy_file(source, target)
        _notify.say(f"copied {source} to {target}: download it from the notebook's Output panel")
        return target
    _notify.say(f"{source.absolute()} is on this machine ({rt.kind}); nothing to download, open it from there")
    return source
