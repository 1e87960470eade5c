"""Where colabkit's output goes and how it looks: notebook or terminal, live bars, numbers for people.

The same call looks right everywhere because the output's destination
decides its form (:func:`screen` tells which):

- ``"widgets"``: a Jupyter kernel (Colab, Kaggle, JupyterLab, VS Code) with
  ipywidgets importable. Bars are ``tqdm.notebook`` widgets.
- ``"notebook"``: a kernel without ipywidgets. A bar is one text output
  replaced in place through a display handle, at most twice a second. No
  cursor-movement escape codes ever: a notebook does not interpret them
  (tqdm's text fallback fills the cell with ``\\x1b[A`` otherwise).
- ``"terminal"``: stderr is a TTY. Bars are tqdm's text bars, one at a time.
- ``"log"``: neither, e.g. a script piped into a file or a CI log, or a script
  that Google's ``colab run`` sends to a Colab kernel (its output reaches a
  terminal as text). No bars; a plain line now and then (every
  :data:`LOG_SECONDS`) for long work.

Seam: every touch of ``IPython.display``, ``sys.stdout``/``sys.stderr`` and
``tqdm.notebook`` goes through a :class:`Screen`. Tests install a fake one
with :func:`use_screen` (:class:`colabkit.testing.FakeScreen` records what a
notebook would receive).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import io
import math
import sys
import threading
from collections.abc import Iterable, Iterator
from typing import Any, Literal, Protocol, TypeVar

__all__ = [
    "LOG_SECONDS",
    "NOTEBOOK_SECONDS",
    "Bar",
    "Handle",
    "Kind",
    "Screen",
    "Text",
    "bar",
    "detect",
    "format_about",
    "format_count",
    "format_duration",
    "format_memory",
    "format_value",
    "in_notebook",
    "screen",
    "use_screen",
    "widgets_available",
]

Kind = Literal["widgets", "notebook", "terminal", "log"]
T = TypeVar("T")

#: A notebook bar is redrawn at most this often (each redraw is a message to the browser;
#: faster refreshes have crashed Colab tabs, see Lightning #3786).
NOTEBOOK_SECONDS = 0.5
#: In a log, a long task prints a progress line at most this often.
LOG_SECONDS = 60.0
#: Width of a notebook text bar, in characters.
NOTEBOOK_COLUMNS = 100


class Handle(Protocol):
    """What ``IPython.display.display(obj, display_id=True)`` returns: an output replaced in place."""

    def update(self, obj: Any) -> None: ...


class Text:
    """Plain text for a display output (shown without quotes, in a monospace font)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text

    def __str__(self) -> str:
        return self.text


# -- the seam -------------------------------------------------------------------------------------


class Screen:
    """The outside world of output: the kind of destination and the calls that reach it.

    Args:
        kind: Where output goes (default: :func:`detect`, read once).
    """

    def __init__(self, kind: Kind | None = None) -> None:
        self.kind: Kind = detect() if kind is None else kind

    @property
    def notebook(self) -> bool:
        """Whether output lands in a notebook cell (``"widgets"`` or ``"notebook"``)."""
        return self.kind in ("widgets", "notebook")

    def show(self, obj: Any) -> Handle:
        """Show ``obj`` as a new output of the running cell; the handle replaces it later (notebooks only)."""
        from IPython.display import display

        handle: Handle = display(obj, display_id=True)
        return handle

    def line(self, text: str) -> None:
        """Print a line that stays (above a terminal bar, which is redrawn below it)."""
        if self.kind == "terminal":
            from tqdm.std import tqdm

            tqdm.write(text, file=sys.stdout)
            sys.stdout.flush()
        else:
            print(text, file=sys.stdout, flush=True)

    def text_bar(self, **options: Any) -> Any:
        """tqdm's text bar on stderr (terminals)."""
        from tqdm.std import tqdm

        return tqdm(file=sys.stderr, dynamic_ncols=True, **options)

    def widget_bar(self, **options: Any) -> Any:
        """A ``tqdm.notebook`` widget bar (kernels with ipywidgets)."""
        from tqdm.notebook import tqdm

        return tqdm(**options)


def detect() -> Kind:
    """The kind of place output goes to now (see the module docstring)."""
    module = sys.modules.get("IPython")  # never import IPython just to ask
    getter = getattr(module, "get_ipython", None)
    shell = getter() if callable(getter) else None
    if shell is not None and getattr(shell, "kernel", None) is not None:
        from colabkit.runtime import headless

        if headless():
            # `colab run` streams the kernel's output to a terminal as text: a widget never
            # renders there and a redrawn line is repeated, so progress comes as log lines.
            return "log"
        return "widgets" if widgets_available() else "notebook"
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        tty = bool(isatty()) if callable(isatty) else False
    except ValueError:  # a closed stream
        tty = False
    return "terminal" if tty else "log"


@functools.lru_cache(maxsize=1)
def widgets_available() -> bool:
    """Whether ipywidgets imports (with the classes tqdm.notebook needs)."""
    try:
        from ipywidgets import HTML, FloatProgress, HBox  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return False
    return True


_override: contextvars.ContextVar[Screen | None] = contextvars.ContextVar("colabkit_screen", default=None)


def screen() -> Screen:
    """The screen in force: the one :func:`use_screen` installed, else the real one, detected now."""
    installed = _override.get()
    return installed if installed is not None else Screen()


@contextlib.contextmanager
def use_screen(fake: Screen) -> Iterator[Screen]:
    """Send colabkit's output to ``fake`` inside the ``with`` block (nestable; this thread only)."""
    token = _override.set(fake)
    try:
        yield fake
    finally:
        _override.reset(token)


def in_notebook() -> bool:
    """Whether colabkit's output lands in a notebook cell (Colab, Kaggle, Jupyter)."""
    return screen().notebook


# -- bars -----------------------------------------------------------------------------------------


class Bar:
    """A live progress bar that suits where it is shown; create it with :func:`bar`.

    Counting, rates and ETA are tqdm's; only the drawing differs by destination.
    """

    def __init__(self, backend: Any) -> None:
        self._tqdm = backend

    def update(self, n: float = 1) -> None:
        """Advance by ``n``."""
        if self._tqdm is not None:
            self._tqdm.update(n)

    def each(self, items: Iterable[T]) -> Iterator[T]:
        """``items``, counting one as each is done; the bar closes when they run out (or the loop is left)."""
        try:
            for item in items:
                yield item
                self.update(1)
        finally:
            self.close()

    def note(self, text: str) -> None:
        """Replace the note after the numbers (what is being done now), redrawn with the next update."""
        if self._tqdm is not None:
            self._tqdm.set_postfix_str(text, refresh=False)

    def set(self, n: float, *, note: str | None = None) -> None:
        """Move to count ``n`` (and replace the note after the numbers), redrawing if due."""
        if self._tqdm is None:
            return
        if note is not None:
            self.note(note)
        self._tqdm.update(n - self._tqdm.n)

    def restart(self, total: float | None, *, desc: str, done: float = 0) -> None:
        """Reuse the bar for new work (the next epoch, a validation pass): one bar, not a new one."""
        if self._tqdm is None:
            return
        self._tqdm.set_description_str(desc, refresh=False)
        self._tqdm.set_postfix_str("", refresh=False)
        self._tqdm.reset(total=total)
        if done:
            self._tqdm.update(done)

    def close(self) -> None:
        """Finish the bar (a bar made with ``leave=False`` disappears)."""
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def bar(
    total: float | None = None,
    *,
    desc: str = "",
    unit: str = "it",
    unit_scale: bool | None = None,
    leave: bool = False,
    enabled: bool = True,
    initial: float = 0,
    on: Screen | None = None,
) -> Bar:
    """A progress bar for the current :func:`screen`: a widget, an in-place text output, a terminal bar or log lines.

    Args:
        total: Expected count (None: unknown, the bar counts up).
        desc: Label in front of the numbers.
        unit: What is counted (``"B"`` with ``unit_scale=True`` shows kB, MB...).
        unit_scale: Scale large counts (k, M, G; powers of 1024 for bytes); default: for ``unit="B"``.
        leave: Keep the finished bar on screen (default: it disappears).
        enabled: False gives a bar that shows nothing.
        initial: Count to start at (resumed work).
        on: The screen to draw on (default: :func:`screen`).

    Returns:
        A :class:`Bar`; use it as a context manager, or call ``close()``.
    """
    if not enabled:
        return Bar(None)
    where = on if on is not None else screen()
    options: dict[str, Any] = {
        "total": total,
        "desc": desc,
        "unit": unit,
        "unit_scale": unit == "B" if unit_scale is None else unit_scale,
        "unit_divisor": 1024 if unit == "B" else 1000,
        "leave": leave,
        "initial": initial,
    }
    if where.kind == "widgets":
        return Bar(where.widget_bar(**options))
    if where.kind == "terminal":
        return Bar(where.text_bar(**options))
    handle_tqdm, log_tqdm = _drawn_elsewhere()
    return Bar((handle_tqdm if where.kind == "notebook" else log_tqdm)(where, **options))


@functools.lru_cache(maxsize=1)
def _drawn_elsewhere() -> tuple[type, type]:
    """tqdm subclasses that draw through the screen instead of writing ``\\r`` and escape codes to a file.

    Built on first use, so importing this module does not import tqdm. Both set
    ``monitor_interval = 0`` (no tqdm thread redraws them) and draw only from the
    main thread: a display handle belongs to the cell the main thread runs.
    """
    from tqdm.std import tqdm

    class HandleTqdm(tqdm):
        """Notebook without ipywidgets: one text output replaced in place, at most every NOTEBOOK_SECONDS."""

        monitor_interval = 0

        def __init__(self, where: Screen, **options: Any) -> None:
            self._screen = where
            self._handle: Handle | None = None
            self._shown = ""
            super().__init__(
                file=io.StringIO(),
                ncols=NOTEBOOK_COLUMNS,
                ascii=False,  # notebooks render the block characters (tqdm assumes ASCII for a StringIO)
                mininterval=NOTEBOOK_SECONDS,
                miniters=1,
                **options,
            )

        def display(self, msg: str | None = None, pos: int | None = None) -> bool:
            if threading.current_thread() is not threading.main_thread():
                return False
            text = str(self) if msg is None else msg
            if self._handle is None:
                if text:
                    self._handle = self._screen.show(Text(text))
            elif text != self._shown:
                self._handle.update(Text(text))
            self._shown = text
            return True

        def clear(self, nolock: bool = False) -> None:
            """Nothing to clear: the next display replaces the output."""

    class LogTqdm(tqdm):
        """A log: no bar, a plain progress line at most every LOG_SECONDS (none for short work)."""

        monitor_interval = 0

        def __init__(self, where: Screen, **options: Any) -> None:
            self._screen = where
            self._next_line = float("inf")  # set below, once tqdm's clock is known
            super().__init__(file=io.StringIO(), ncols=0, mininterval=LOG_SECONDS, miniters=1, **options)
            self._next_line = self._time() + LOG_SECONDS

        def display(self, msg: str | None = None, pos: int | None = None) -> bool:
            # Also reached from reset() and close(): a line only when one is due.
            now = self._time()
            if msg is None and now >= self._next_line and threading.current_thread() is threading.main_thread():
                self._screen.line(str(self))
                self._next_line = now + LOG_SECONDS
            return True

        def clear(self, nolock: bool = False) -> None:
            """Lines stay; nothing to clear."""

    return HandleTqdm, LogTqdm


# -- numbers for people ---------------------------------------------------------------------------

_SUFFIXES = ("", "k", "M", "G", "T", "P")


def format_count(value: float) -> str:
    """Three significant digits with a k/M/G suffix: ``11490 -> "11.5k"``, ``812 -> "812"``, ``0.42 -> "0.42"``."""
    if not math.isfinite(value):
        return str(value)
    scaled = float(value)
    for suffix in _SUFFIXES:
        text = f"{scaled:.3g}"
        if abs(float(text)) < 1000 or suffix == _SUFFIXES[-1]:
            if "e" in text:  # tiny values: keep them readable
                return f"{scaled:.2g}{suffix}"
            return f"{text}{suffix}"
        scaled /= 1000
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    """Compact elapsed time: ``0.42s``, ``8.3s``, ``45s``, ``1m 32s``, ``1h 05m``, ``2d 03h``."""
    if not math.isfinite(seconds):
        return "?"
    seconds = max(seconds, 0.0)
    if seconds < 10:
        return f"{seconds:.2g}s" if seconds < 1 else f"{seconds:.1f}s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours:02d}h"


def format_about(seconds: float) -> str:
    """A rough duration for sentences: ``"under a minute"``, ``"about 7 min"``, ``"about 1 h 40 min"``."""
    if not math.isfinite(seconds):
        return "an unknown time"
    minutes = seconds / 60
    if minutes < 1:
        return "under a minute"
    if minutes < 10:
        return f"about {round(minutes)} min"
    if minutes < 60:
        step = 5 * round(minutes / 5)
        return f"about {step} min" if step < 60 else "about 1 h"
    tens = 10 * round(minutes / 10)
    hours, rest = divmod(tens, 60)
    return f"about {hours} h {rest} min" if rest else f"about {hours} h"


def format_memory(used: float, total: float | None = None) -> str:
    """GPU memory in GB (as Colab's resource panel counts them, 2**30 bytes): ``"4.2/15.0 GB"``."""
    gib = 2**30
    if total:
        return f"{used / gib:.1f}/{total / gib:.1f} GB"
    return f"{used / gib:.1f} GB"


def format_value(value: Any) -> str:
    """A loss or metric: four decimals (``0.6931``), or four significant digits when tiny or huge."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "nan"
    if 1e-3 <= abs(value) < 1e3:
        return f"{value:.4f}"  # fixed decimals line up in a column: 0.6931, 1.0000
    return f"{value:.4g}"
