"""The one registry of live checkpoint managers: flushed at exit, forgotten in forked children.

:func:`end_session` in colabkit.session waits for :func:`live_managers` before it
flushes Drive; the exit hook closes each one so background commits and copies finish.
"""

from __future__ import annotations

import atexit
import os
import threading
import weakref
from pathlib import Path
from typing import Protocol

from colabkit import _notify

__all__ = ["Flushable", "forget", "is_live", "live_managers", "register"]


class Flushable(Protocol):
    """What the registry needs of a manager."""

    directory: Path

    def wait(self) -> None: ...

    def close(self) -> None: ...

    def detach_after_fork(self) -> None: ...


_LIVE: weakref.WeakSet[Flushable] = weakref.WeakSet()
_LOCK = threading.Lock()
_hooks_installed = False


def _flush_all_at_exit() -> None:
    for manager in live_managers():
        try:
            manager.close()
        except Exception as exc:
            _notify.say(f"checkpoints in {manager.directory} may be incomplete at exit: {exc}")


def _forget_in_child() -> None:
    # A forked child (a DataLoader worker, say) has none of the parent's threads:
    # its copies of the managers must not wait for them or write for them.
    for manager in list(_LIVE):
        manager.detach_after_fork()
    _LIVE.clear()


def register(manager: Flushable) -> None:
    """Track ``manager`` (weakly) until :func:`forget`; installs the exit and fork hooks once."""
    global _hooks_installed
    with _LOCK:
        if not _hooks_installed:
            atexit.register(_flush_all_at_exit)
            if hasattr(os, "register_at_fork"):
                os.register_at_fork(after_in_child=_forget_in_child)
            _hooks_installed = True
        _LIVE.add(manager)


def forget(manager: Flushable) -> None:
    """Stop tracking ``manager`` (it has nothing left to flush)."""
    with _LOCK:
        _LIVE.discard(manager)


def is_live(manager: Flushable) -> bool:
    """Whether ``manager`` is still tracked (its flush at exit is still due)."""
    with _LOCK:
        return manager in _LIVE


def live_managers() -> list[Flushable]:
    """Every manager not yet closed, in no particular order."""
    with _LOCK:
        return list(_LIVE)
