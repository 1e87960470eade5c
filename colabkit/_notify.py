"""How colabkit talks to the person at the notebook: notices and warnings, some only once.

Notices are printed (visible in Colab, Kaggle, Jupyter and terminals alike);
problems the caller may want to filter go through :mod:`warnings`. The
"once" memory is process-wide and reset by :mod:`colabkit.testing` fakes.
"""

from __future__ import annotations

import logging
import sys
import warnings

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


def warn(message: str, *, stacklevel: int = 3) -> None:
    """Issue a :class:`ColabkitWarning`."""
    warnings.warn(message, ColabkitWarning, stacklevel=stacklevel)


def warn_once(key: str, message: str, *, stacklevel: int = 3) -> None:
    """:func:`warn` the first time ``key`` is seen in this process."""
    if key not in _said:
        _said.add(key)
        warn(message, stacklevel=stacklevel + 1)


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
