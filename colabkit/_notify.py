"""How colabkit talks to the person at the notebook: notices and warnings, some only once.

Notices (:func:`say`) are printed on stdout: advice and news, such as "no GPU in this
runtime, here is how to switch one on", shown as plain output in Colab, Kaggle, Jupyter
and terminals alike. Problems the caller may want to filter (:func:`warn`) go through
:mod:`warnings`, attributed to the caller's own line, the first frame outside colabkit: a
notebook shows the user's cell and line, never a file or source line inside the library.
The "once" memory is process-wide and reset by :mod:`colabkit.testing` fakes.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from types import FrameType

from colabkit.errors import ColabkitWarning

__all__ = ["log_once", "logger", "reset_once", "say", "say_once", "warn", "warn_once"]

logger = logging.getLogger("colabkit")

_said: set[str] = set()


def say(message: str) -> None:
    """Print a one-line notice prefixed with ``colabkit:``."""
    print(f"colabkit: {message}", file=sys.stdout, flush=True)


def say_once(key: str, message: str) -> None:
    """:func:`say` the message the first time ``key`` is seen in this process."""
    if key not in _said:
        _said.add(key)
        say(message)


def warn(message: str) -> None:
    """Issue a :class:`ColabkitWarning`, attributed to the first frame outside colabkit (:func:`_user_stacklevel`)."""
    warnings.warn(message, ColabkitWarning, stacklevel=_user_stacklevel())


def warn_once(key: str, message: str) -> None:
    """:func:`warn` the first time ``key`` is seen in this process."""
    if key not in _said:
        _said.add(key)
        warn(message)


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
#: Standard modules that only pass a call through (a ``with`` block's exit, a thread's start,
#: ``python -m``): the line they show would be theirs, not the user's.
_PASS_THROUGH = frozenset({"contextlib", "threading", "runpy"})


def _user_stacklevel() -> int:
    """The ``stacklevel`` that makes a ``warnings.warn`` made by this function's caller name the user's line.

    Counted from the caller's frame (level 1) up to the first frame neither in the colabkit
    package nor in a pass-through module. When there is none (a background thread, the
    ``colabkit`` command), the level lies beyond the stack and :mod:`warnings` names ``sys``:
    still no line of colabkit's own.
    """
    frame: FrameType | None = sys._getframe(1)  # the frame that calls warnings.warn: level 1
    level = 1
    while frame is not None and _internal(frame):
        frame = frame.f_back
        level += 1
    return level


def _internal(frame: FrameType) -> bool:
    module = str(frame.f_globals.get("__name__", ""))
    if module == "colabkit" or module.startswith("colabkit.") or module in _PASS_THROUGH:
        return True
    return os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE)


def log_once(key: str, message: str, *, level: int = logging.WARNING) -> None:
    """Log ``message`` on the ``colabkit`` logger the first time ``key`` is seen in this process.

    For advice that must never fail a warnings-as-errors run; shown on stderr by default
    and silenced with ``logging.getLogger("colabkit").setLevel(logging.ERROR)``.
    """
    if key not in _said:
        _said.add(key)
        logger.log(level, "%s", message)


def reset_once() -> None:
    """Forget which once-only notices were given (tests and fakes)."""
    _said.clear()
