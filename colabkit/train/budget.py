"""time_limit's bookkeeping: when fit() must stop so that the final save still ends before the limit.

The reserve kept free is two more steps, a validation and a whole save (RAM copy, commit and
copies, as timed at the first save of the run; estimated from the model's size before that).
The loop hands in clock readings; this class never reads a clock itself.
"""

from __future__ import annotations

import torch

__all__ = ["SLOW_WRITE_BYTES_PER_SECOND", "TimeBudget"]

#: Write speed assumed for a checkpoint (Drive) until a save has been timed.
SLOW_WRITE_BYTES_PER_SECOND = 20e6


class TimeBudget:
    """Costs of steps, validations and saves, measured as they happen, against a deadline.

    Args:
        limit: Seconds the run may take (None: no limit; costs are still tracked).
        save_guess: What a save is assumed to cost until one has been timed.
    """

    def __init__(self, limit: float | None, save_guess: float) -> None:
        self.limit = limit
        self.deadline: float | None = None
        self.step_cost = 0.0
        self.val_cost = 0.0
        self.save_cost = save_guess
        self.flush_cost: float | None = None  # commit + copies after a save, measured once (time_limit only)
        self._last_step_end = 0.0

    @staticmethod
    def guess_save_cost(model: torch.nn.Module) -> float:
        """Before the first save is timed: a few seconds plus writing model and optimizer state slowly."""
        model_bytes = sum(
            t.numel() * t.element_size() for t in model.state_dict().values() if isinstance(t, torch.Tensor)
        )
        return 5.0 + 3 * model_bytes / SLOW_WRITE_BYTES_PER_SECOND

    def start(self, now: float) -> None:
        """The run starts: the limit counts from ``now``."""
        self.deadline = None if self.limit is None else now + self.limit
        self._last_step_end = now

    def epoch_started(self, now: float) -> None:
        self._last_step_end = now

    def step_ended(self, now: float) -> None:
        # A slowly decaying maximum of the step time: what the next step may cost.
        self.step_cost = max(self.step_cost * 0.9, now - self._last_step_end)
        self._last_step_end = now

    def reserve(self) -> float:
        """Seconds to keep free before the deadline: two more steps, a validation and a save, with margin."""
        return 2 * self.step_cost + 1.5 * self.save_cost + self.val_cost

    def expired(self, now: float) -> bool:
        """Whether the run must stop now to finish its last save before the deadline."""
        return self.deadline is not None and now + self.reserve() >= self.deadline

    def saved(self, seconds: float) -> None:
        """A save took ``seconds`` until it returned (its commit and copies may still run)."""
        self.save_cost = seconds + (self.flush_cost or 0.0)

    @property
    def times_flush(self) -> bool:
        """Whether the next save should wait for its commit and copies to time them (once, time_limit only)."""
        return self.deadline is not None and self.flush_cost is None

    def flushed(self, seconds: float) -> None:
        """The run's end waits for the commit and the copies (Drive) as well: count them in each save."""
        self.flush_cost = seconds
        self.save_cost += seconds
