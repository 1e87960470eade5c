"""matplotlib for the result objects' ``.plot()``: imported on first use, figures returned as History.plot() does.

:func:`in_notebook` is the display seam: a figure made for a notebook cell is closed after
drawing, so it shows once, as the cell's result.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from colabkit.errors import missing_dependency

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["axes", "finish", "in_notebook", "pyplot"]


def pyplot(purpose: str) -> Any:
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise missing_dependency("matplotlib", "plot", purpose=purpose) from None
    return plt


def in_notebook() -> bool:
    """Whether an IPython kernel runs this code (Colab, Kaggle, Jupyter): the display seam."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return shell is not None and getattr(shell, "kernel", None) is not None


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
    if created and in_notebook():
        pyplot("plot()").close(figure)
    return figure
