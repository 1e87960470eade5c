"""tqdm.auto progress bars for fit(), evaluate() and predict(), updated only when the loop reads values."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["REFRESH_SECONDS", "Bars"]

#: Progress and log reads happen at most this often (each read waits for the GPU once).
REFRESH_SECONDS = 0.5


class Bars:
    """tqdm.auto bars for epochs and steps, updated only when the loop reads values (throttled)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.epoch_bar: Any = None
        self.step_bar: Any = None
        self.eval_bar: Any = None
        self._shown = 0

    def __enter__(self) -> Bars:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _tqdm(self, **kwargs: Any) -> Any:
        from tqdm.auto import tqdm

        kwargs.setdefault("mininterval", 0)  # the loop itself throttles step updates
        return tqdm(dynamic_ncols=True, **kwargs)

    def start_fit(self, epochs: int, done: int) -> None:
        if self.enabled:
            self.epoch_bar = self._tqdm(total=epochs, initial=done, desc="epochs", unit="epoch")

    def start_epoch(self, epoch: int, epochs: int, total: int | None, done: int) -> None:
        if self.enabled:
            self.step_bar = self._tqdm(
                total=total, initial=done, desc=f"epoch {epoch + 1}/{epochs}", unit="step", leave=False
            )
            self._shown = done

    def steps(self, done: int, postfix: Mapping[str, float]) -> None:
        if self.step_bar is not None:
            self.step_bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
            self.step_bar.update(done - self._shown)
            self._shown = done

    def end_epoch(self, record: Mapping[str, Any]) -> None:
        if self.step_bar is not None:
            self.step_bar.close()
            self.step_bar = None
        if self.epoch_bar is not None:
            shown = {k: f"{v:.4g}" for k, v in record.items() if k not in ("epoch", "time") and isinstance(v, float)}
            self.epoch_bar.set_postfix(shown, refresh=False)
            self.epoch_bar.update(1)

    def start_eval(self, desc: str, total: int | None) -> None:
        if self.enabled:
            self.eval_bar = self._tqdm(total=total, desc=desc, unit="batch", leave=False, mininterval=REFRESH_SECONDS)

    def eval_step(self) -> None:
        if self.eval_bar is not None:
            self.eval_bar.update(1)

    def end_eval(self) -> None:
        if self.eval_bar is not None:
            self.eval_bar.close()
            self.eval_bar = None

    def close(self) -> None:
        for bar in (self.eval_bar, self.step_bar, self.epoch_bar):
            if bar is not None:
                bar.close()
        self.eval_bar = self.step_bar = self.epoch_bar = None
