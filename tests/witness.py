"""Witnesses that a fit() run really resumed (not a test module).

A resumed run and a run restarted from scratch end with the same weights when the
model and the seed are fixed, so comparing weights alone cannot tell them apart.
:class:`StepLog` records the global step of every optimizer step a run took: a run
that resumed after step N starts at N + 1, one that started over starts at 1.
"""

from __future__ import annotations

from colabkit.train.callbacks import Callback, FitContext


class StepLog(Callback):
    """Records ``ctx.step`` (optimizer steps so far, across resumes) after every step of one run."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_step_end(self, ctx: FitContext) -> None:
        self.steps.append(ctx.step)

    @property
    def span(self) -> tuple[int, int]:
        """(first, last) step this run trained; (0, 0) when it trained none."""
        return (self.steps[0], self.steps[-1]) if self.steps else (0, 0)

    @property
    def first(self) -> int:
        return self.span[0]
