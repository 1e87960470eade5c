"""matplotlib for every ``.plot()``: imported on first use, axes that read true, figures shown once.

In a notebook (:func:`colabkit.display.in_notebook`) a figure made for the cell is closed
after drawing, so it shows once, as the cell's result.

Axes read true: bars start at zero on a linear axis, so twice as tall is twice as much;
only when the values span orders of magnitude (:data:`LOG_SPREAD`) is the axis
logarithmic, so the short bars stay visible. Tick labels are plain numbers ("0.15",
"1,000"), never "1.5 × 10⁻¹" or an offset; a count such as the epoch gets whole-number ticks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from colabkit import display
from colabkit.errors import missing_dependency

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["LOG_SPREAD", "axes", "bar_scale", "finish", "pyplot", "whole_numbers"]

#: A bar chart's value axis turns logarithmic only when its largest value is more than this
#: many times its smallest: below it a linear axis shows every bar, and heights compare directly.
LOG_SPREAD = 100.0


def pyplot(purpose: str) -> Any:
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise missing_dependency("matplotlib", "plot", purpose=purpose) from None
    return plt


def axes(ax: Axes | None, purpose: str, figsize: tuple[float, float] = (7.0, 4.0)) -> tuple[Axes, bool]:
    """The Axes to draw on, and whether this call created its figure."""
    if ax is not None:
        return ax, False
    _, new = pyplot(purpose).subplots(figsize=figsize)
    return new, True


def finish(ax: Axes, path: str | Path | None, *, created: bool) -> Figure:
    """Lay out, save to ``path`` if given, and return the figure, as History.plot() does.

    A figure this call created is closed in a notebook: the returned Figure is then shown
    once, as the cell's result, not a second time by the inline backend at the cell's end.
    A figure the caller passed an Axes of is left open: it is theirs.
    """
    figure: Any = ax.figure
    figure = getattr(figure, "figure", figure)  # the root Figure, also when ax sits in a SubFigure
    if created or path is not None:
        figure.tight_layout()
    if path is not None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(target, dpi=120)
    if created and display.in_notebook():
        pyplot("plot()").close(figure)
    return figure


def bar_scale(ax: Axes, values: Sequence[float], *, headroom: float = 0.15) -> bool:
    """Scale the value (y) axis of a bar chart of ``values``; True when it was made logarithmic.

    Linear from zero, with ``headroom`` above the tallest bar for its label, unless the
    positive finite values span more than :data:`LOG_SPREAD`; either way with plain tick labels.
    """
    from matplotlib import ticker

    shown = [v for v in values if 0 < v < math.inf]
    if shown and max(shown) > LOG_SPREAD * min(shown):
        ax.set_yscale("log")
        ax.set_ylim(min(shown) / 2, max(shown) * 4)  # room for labels above the tallest bar
        ax.yaxis.set_major_locator(ticker.LogLocator(base=10))
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: _plain_number(value)))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())  # unlabelled minor ticks: no "3 × 10⁻²"
        return True
    ax.set_yscale("linear")
    ax.margins(y=headroom)
    ax.set_ylim(bottom=0)
    ax.ticklabel_format(axis="y", style="plain", useOffset=False)
    return False


def _plain_number(value: float) -> str:
    """A tick value as people write it: ``"1,000"``, ``"1"``, ``"0.01"`` (no exponent)."""
    if value >= 1 or value <= 0:
        return f"{value:,.0f}"
    return f"{value:.{-math.floor(math.log10(value))}f}"


def whole_numbers(ax: Axes) -> None:
    """Tick the x axis at whole numbers only (epochs, steps): one epoch is "1", not 0.96 ... 1.04."""
    from matplotlib import ticker

    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True, min_n_ticks=1))
    low, high = ax.get_xlim()
    if high - low < 2:  # one or two points: half a unit beyond each, not a zoom onto fractions
        ax.set_xlim(math.floor(low + 0.5) - 0.5, math.ceil(high - 0.5) + 0.5)
