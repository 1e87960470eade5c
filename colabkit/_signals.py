"""Turn SIGTERM / SIGINT into a flag a training loop checks at a safe point.

Saving inside a signal handler can run in the middle of a backward pass and
write a half-updated state (Lightning #21406), so the handler here only sets
attributes: no I/O, no locks, no allocation-heavy work. The loop checks
``flag.requested`` at each step boundary, saves, and exits with
``flag.exit_code`` (143 for SIGTERM, 130 for SIGINT).
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

__all__ = ["SignalFlag", "save_on_signal"]

Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


# The seam: tests (and unusual hosts) can replace these two.
def _get_handler(signum: int) -> Handler:
    return signal.getsignal(signum)


def _set_handler(signum: int, handler: Handler) -> Handler:
    return signal.signal(signum, handler)


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@dataclasses.dataclass
class SignalFlag:
    """What :func:`save_on_signal` has seen.

    Attributes:
        requested: True once a watched signal arrived: save and stop at the next safe point.
        signal: Name of the first signal that arrived (``"SIGTERM"``, ``"SIGINT"``), or None.
        count: How many watched signals arrived.
        installed: False when the handlers could not be installed (not the main thread);
            the flag then never turns on by itself.
    """

    requested: bool = False
    signal: str | None = None
    count: int = 0
    installed: bool = False
    signum: int | None = None

    @property
    def exit_code(self) -> int:
        """The conventional exit status after this signal: 128 + its number (0 when none arrived)."""
        return 0 if self.signum is None else 128 + self.signum

    def request(self, signum: int) -> None:
        """Record a signal (also usable by hand, e.g. from a callback that wants a clean stop)."""
        self.count += 1
        if not self.requested:
            self.requested = True
            self.signum = signum
            self.signal = signal.Signals(signum).name


@contextlib.contextmanager
def save_on_signal(signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[SignalFlag]:
    """Catch SIGTERM and SIGINT as a flag for the duration of the block.

    The first signal sets ``flag.requested``; the caller finishes the current
    step, saves, and stops. A second SIGINT raises ``KeyboardInterrupt`` at once
    (and a second SIGTERM ``SystemExit(143)``), so an impatient user or a
    scheduler can still stop a loop that never checks the flag. The previous
    handlers are put back on exit. Signals currently ignored stay ignored. Off
    the main thread, where Python cannot install handlers, the block runs
    unchanged and the flag stays off.

    Args:
        signals: Which signals to watch.

    Yields:
        The :class:`SignalFlag`.

    Example:
        >>> with save_on_signal() as stop:  # doctest: +SKIP
        ...     for step in range(start, steps):
        ...         train_step()
        ...         if stop.requested:
        ...             ckpt.save(state(), step=step); ckpt.close()
        ...             raise SystemExit(stop.exit_code)
    """
    flag = SignalFlag()
    if not _on_main_thread():
        yield flag
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        # Runs between bytecodes of the main thread: attribute stores only.
        again = flag.requested
        flag.request(signum)
        if again:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)

    previous: dict[int, Handler] = {}
    try:
        for signum in signals:
            current = _get_handler(signum)
            if current is signal.SIG_IGN:
                continue  # deliberately ignored (e.g. SIGINT of a background job): keep it that way
            previous[signum] = current
            _set_handler(signum, handler)
        flag.installed = True
        yield flag
    finally:
        for signum, old in previous.items():
            # getsignal() gives None for handlers installed outside Python; default is the best restore.
            _set_handler(signum, signal.SIG_DFL if old is None else old)
