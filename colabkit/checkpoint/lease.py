"""One writer per checkpoint folder: a lease file renewed by a heartbeat.

A run that writes checkpoints holds ``.colabkit-lease`` in the folder. It
names the host, the process (pid and its start time), the program, a run id,
when the lease was taken and when it was last renewed. A heartbeat thread
renews it every :data:`PERIOD` seconds; a clean exit removes it.

A second writer is refused with :class:`~colabkit.errors.CheckpointInUseError`
unless the lease is stale, which it is when

* its holder ran on this host and its process is gone (or the pid now belongs
  to a younger process): taken over at once;
* its heartbeat is older than :data:`STALE_PERIODS` of the holder's own renewal
  periods, on any host: Drive has no locks that work across runtimes, so time
  is the only signal there;
* the file is torn or unreadable.

``takeover=True`` takes a live lease too; the previous holder finds out at its
next renewal and stops saving (its next save raises the same error).

Races. Every read-decide-write on the lease (acquire, renew, release) runs
under an ``flock`` of the folder itself, which serialises the processes of one
machine, also on a FUSE mount. Across machines (two Colab runtimes on one
Drive folder) there is no lock: the acquirer writes, waits ``settle`` seconds,
reads the lease back and only holds it if its own run id is still there.

The lease is written atomically but not fsynced: after a power cut a lost or torn
lease only means a dead holder, which is taken over anyway. Reading checkpoints
never needs the lease. Everything that touches the world
(clock, host name, processes, sleeping, the folder lock) goes through
:class:`LeaseSystem`, so tests can play another host or a later time.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import errno
import json
import math
import os
import socket
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType

from colabkit import _io, _notify
from colabkit.errors import CheckpointError, CheckpointInUseError

__all__ = [
    "LEASE_NAME",
    "PERIOD",
    "STALE_PERIODS",
    "SYSTEM",
    "Holder",
    "Lease",
    "LeaseSystem",
    "acquire",
    "read_holder",
]

#: The lease file's name inside the checkpoint folder.
LEASE_NAME = ".colabkit-lease"

#: Seconds between heartbeats.
PERIOD = 60.0

#: A heartbeat older than this many of its holder's periods is stale. Generous, because
#: Drive may take a minute or more to show one runtime's write to another.
STALE_PERIODS = 5

FORMAT = "colabkit.lease"

# How long acquire waits for the folder lock before going on without it.
_GUARD_SECONDS = 30.0


class LeaseSystem:
    """The outside world as the lease sees it: the seam tests replace."""

    def now(self) -> float:
        """Wall-clock seconds since the epoch (comparable across machines)."""
        return time.time()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def host(self) -> str:
        return socket.gethostname()

    def machine(self) -> str:
        """What makes two processes comparable by pid: boot id and pid namespace (Linux), else ''."""
        parts = []
        with contextlib.suppress(OSError):
            parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
        with contextlib.suppress(OSError):
            parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
        return "/".join(parts)

    def pid(self) -> int:
        return os.getpid()

    def process_start(self, pid: int) -> str | None:
        """An id of the process's start (``/proc/<pid>/stat`` field 22); None if no such process.

        '' when the process exists but its start cannot be read (no ``/proc``).
        """
        if not _io.pid_alive(pid):
            return None
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            return None if sys.platform.startswith("linux") else ""
        except OSError:
            return ""
        fields = stat.rsplit(")", 1)[-1].split()
        return fields[19] if len(fields) > 19 else ""

    @contextlib.contextmanager
    def guard(self, folder: Path) -> Iterator[None]:
        """Exclusive among this machine's processes while inside: ``flock`` of the folder.

        Where that is impossible (no ``fcntl``, a filesystem without flock) the block
        runs unguarded; the settle-and-read-back of :func:`acquire` still catches a race.
        """
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            yield
            return
        try:
            fd = os.open(folder, os.O_RDONLY)
        except OSError:
            yield
            return
        try:
            deadline = time.monotonic() + _GUARD_SECONDS
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        break  # a holder stuck in I/O: go on rather than hang
                    time.sleep(0.02)
                except OSError:
                    break
            yield
        finally:
            os.close(fd)  # also drops the lock


SYSTEM = LeaseSystem()


@dataclasses.dataclass(frozen=True)
class Holder:
    """Who holds a lease, as its file says."""

    run_id: str
    host: str
    machine: str
    pid: int
    pid_start: str
    program: str
    started: float
    renewed: float
    period: float

    def to_bytes(self) -> bytes:
        return json.dumps({"format": FORMAT, "version": 1, **dataclasses.asdict(self)}, indent=1).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Holder:
        """Parse a lease file; ValueError when it is torn or not a lease."""
        try:
            raw = json.loads(data)
            if not isinstance(raw, dict) or raw.get("format") != FORMAT:
                raise ValueError("not a colabkit lease")
            holder = cls(
                run_id=str(raw["run_id"]),
                host=str(raw["host"]),
                machine=str(raw.get("machine", "")),
                pid=int(raw["pid"]),
                pid_start=str(raw.get("pid_start", "")),
                program=str(raw.get("program", "")),
                started=float(raw["started"]),
                renewed=float(raw["renewed"]),
                period=float(raw["period"]),
            )
        except (KeyError, TypeError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"unreadable lease ({type(exc).__name__}: {exc})") from None
        if not holder.run_id or not (0 < holder.period < math.inf) or not math.isfinite(holder.renewed):
            raise ValueError("unreadable lease (bad run_id, period or renewal time)")
        return holder

    def describe(self, now: float) -> str:
        """``pid 42 on host 'abc' (train.py, run 1f3a9c0d), started ... ago, renewed ... ago``."""
        program = f"{self.program}, " if self.program else ""
        return (
            f"pid {self.pid} on host {self.host!r} ({program}run {self.run_id}), "
            f"started {_when(self.started, now)}, last renewed {_ago(now - self.renewed)}"
        )


def _when(stamp: float, now: float) -> str:
    moment = datetime.fromtimestamp(stamp, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"{moment} ({_ago(now - stamp)})"


def _ago(seconds: float) -> str:
    if seconds < 0:
        return "in the future (clocks differ)"
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def read_holder(folder: str | os.PathLike[str]) -> tuple[Holder | None, str | None]:
    """The lease in ``folder``: (holder, None), (None, why it is unreadable) or (None, None) if absent."""
    path = Path(folder) / LEASE_NAME
    try:
        data = _io.retry(path.read_bytes, should_retry=_io.is_transient)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"it cannot be read ({exc})"
    try:
        return Holder.from_bytes(data), None
    except ValueError as exc:
        return None, str(exc)


# Leases held by this process, released at exit.
_HELD: weakref.WeakSet[Lease] = weakref.WeakSet()
_atexit_registered = False


def _release_all() -> None:
    for lease in list(_HELD):
        with contextlib.suppress(Exception):
            lease.release()


class Lease:
    """A held lease on a folder; see :func:`acquire`.

    Use it as a context manager or call :meth:`release`. :meth:`check` raises once
    another run took the lease over.
    """

    def __init__(self, folder: Path, holder: Holder, *, system: LeaseSystem) -> None:
        self.folder = folder
        self.path = folder / LEASE_NAME
        self.holder = holder
        self._system = system
        self._owner_pid = os.getpid()
        self._lock = threading.Lock()
        self._lost: Holder | None = None
        self._released = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._renew_error_said = False

    def __repr__(self) -> str:
        state = "released" if self._released else "lost" if self._lost else "held"
        return f"Lease({str(self.folder)!r}, run {self.holder.run_id}, {state})"

    @property
    def held(self) -> bool:
        """Whether this run still holds the lease (not released, not taken over)."""
        return not self._released and self._lost is None

    def start_heartbeat(self) -> None:
        """Renew every ``holder.period`` seconds in a daemon thread until released or lost."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._beat, name="colabkit-lease-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.holder.period):
            try:
                if not self.renew():
                    return
            except Exception as exc:
                # A Drive hiccup: keep beating; the lease only goes stale after several misses.
                if not self._renew_error_said:
                    self._renew_error_said = True
                    _notify.warn(f"could not renew the checkpoint lease {self.path} ({exc}); retrying")

    def renew(self) -> bool:
        """Write a fresh heartbeat; False (and the lease is lost) when another run holds it now."""
        with self._lock:
            if not self.held:
                return False
            with self._system.guard(self.folder):
                current, _problem = read_holder(self.folder)
                if current is not None and current.run_id != self.holder.run_id:
                    self._mark_lost(current)
                    return False
                if not self.folder.is_dir():
                    return True  # the folder was deleted: nothing to renew until a save recreates it
                self.holder = dataclasses.replace(self.holder, renewed=self._system.now())
                _io.atomic_write_bytes(self.path, self.holder.to_bytes(), durable=False)
            self._renew_error_said = False
            return True

    def _mark_lost(self, current: Holder) -> None:
        self._lost = current
        self._stop.set()
        message = (
            f"another run took over the checkpoint folder {self.folder}: {current.describe(self._system.now())}; "
            "this run no longer saves checkpoints there"
        )
        _notify.say(message)
        _notify.logger.info(message)

    def check(self) -> None:
        """Raise :class:`CheckpointInUseError` if another run took this lease over."""
        lost = self._lost
        if lost is not None:
            raise CheckpointInUseError(
                errno.EBUSY,
                f"the checkpoint folder {self.folder} was taken over by another run "
                f"({lost.describe(self._system.now())}); this run stopped saving there so the two do not mix. "
                "Let that run finish, or rerun this one with another checkpoint folder "
                "(or takeover=True to take the folder back)",
            )

    def release(self) -> None:
        """Stop the heartbeat and remove the lease file if it is still this run's. Idempotent."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self._lock:
            if self._released:
                return
            self._released = True
            _HELD.discard(self)
            if os.getpid() != self._owner_pid or self._lost is not None:
                return  # a forked child, or the lease is someone else's now
            with contextlib.suppress(OSError), self._system.guard(self.folder):
                current, _problem = read_holder(self.folder)
                if current is not None and current.run_id == self.holder.run_id:
                    _io.discard(self.path)

    def _take_from_this_process(self, successor: Holder) -> None:
        """Another writer in this process takes over (a notebook cell run again)."""
        with self._lock:
            if self.held:
                self._lost = successor
                self._stop.set()

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _verdict(holder: Holder, now: float, system: LeaseSystem) -> str:
    """'dead', 'stale', 'this process' or 'live'."""
    if holder.host == system.host() and holder.machine == system.machine():
        start = system.process_start(holder.pid)
        if start is None or (holder.pid_start and start and start != holder.pid_start):
            return "dead"
        if holder.pid == system.pid():
            return "this process"
    if now - holder.renewed > STALE_PERIODS * holder.period:
        return "stale"
    return "live"


def acquire(
    folder: str | os.PathLike[str],
    *,
    takeover: bool = False,
    period: float = PERIOD,
    settle: float = 0.0,
    heartbeat: bool = True,
    system: LeaseSystem = SYSTEM,
) -> Lease:
    """Take the lease on ``folder`` (which must exist) for this run.

    Args:
        folder: The checkpoint folder.
        takeover: Take the lease even from a live holder, which stops saving at its next renewal.
        period: Seconds between heartbeats.
        settle: Seconds to wait before reading the lease back to confirm it is ours. Use a
            few seconds on shared storage without locks (Drive); 0 on a local disk.
        heartbeat: Start the renewing thread (tests renew by hand).
        system: The seam to the clock, host and processes.

    Returns:
        The held :class:`Lease`; release it (or use it as a context manager) when done.

    Raises:
        CheckpointInUseError: A live run holds the lease and ``takeover`` is False, or another
            run took the lease in the same instant.
        CheckpointError: The lease file cannot be written (a read-only folder, say).
    """
    root = Path(folder)
    path = root / LEASE_NAME
    now = system.now()
    pid = system.pid()
    ours = Holder(
        run_id=uuid.uuid4().hex[:12],
        host=system.host(),
        machine=system.machine(),
        pid=pid,
        pid_start=system.process_start(pid) or "",
        program=Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "",
        started=now,
        renewed=now,
        period=float(period),
    )
    notice = ""
    with system.guard(root):
        current, problem = read_holder(root)
        if problem is not None:
            notice = f"the lease file {path} was unreadable ({problem}); treating it as stale and taking over"
        elif current is not None:
            verdict = _verdict(current, now, system)
            if verdict == "live" and not takeover:
                raise CheckpointInUseError(errno.EBUSY, _in_use_message(root, current, now))
            if verdict == "this process":
                for lease in list(_HELD):
                    if lease.holder.run_id == current.run_id:
                        lease._take_from_this_process(ours)
                notice = (
                    f"taking over the checkpoint folder {root} from an earlier writer in this process "
                    "that was not closed (a cell run again?); that one no longer saves there"
                )
            else:
                why = {
                    "dead": "its process is gone",
                    "stale": f"its heartbeat is older than {STALE_PERIODS} renewal periods",
                    "live": "takeover=True",
                }[verdict]
                notice = f"taking over the checkpoint folder {root} from {current.describe(now)}: {why}" + (
                    "; that run stops saving at its next heartbeat" if verdict == "live" else ""
                )
        try:
            _io.atomic_write_bytes(path, ours.to_bytes(), durable=False)
        except OSError as exc:
            raise CheckpointError(
                exc.errno or errno.EIO,
                f"cannot write the lease file {path} ({exc}); the checkpoint folder must be a writable folder",
            ) from exc
    if settle > 0:
        system.sleep(settle)
        back, _problem = read_holder(root)
        if back is None or back.run_id != ours.run_id:
            raise CheckpointInUseError(
                errno.EBUSY,
                f"another run started on the checkpoint folder {root} at the same moment"
                + (f" ({back.describe(system.now())})" if back is not None else "")
                + " and holds it now. Stop one of the two runs, or pass another checkpoint folder",
            )
    if notice:
        _notify.say(notice)
        _notify.logger.info(notice)
    lease = Lease(root, ours, system=system)
    global _atexit_registered
    if not _atexit_registered:
        atexit.register(_release_all)
        _atexit_registered = True
    _HELD.add(lease)
    if heartbeat:
        lease.start_heartbeat()
    return lease


def _in_use_message(folder: Path, holder: Holder, now: float) -> str:
    limit = STALE_PERIODS * holder.period
    return (
        f"the checkpoint folder {folder} is in use by another run: {holder.describe(now)}. "
        "Only one run may write a checkpoint folder. Either stop the other run (interrupt its cell, "
        "or end its process or runtime) and run this again, pass another checkpoint folder, or pass "
        "takeover=True to take this one over (the other run then stops saving at its next heartbeat). "
        f"A run that died lets go by itself {_duration(limit)} after its last heartbeat"
    )


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"
