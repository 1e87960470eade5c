"""Where a fit() run stands: everything a checkpoint carries besides the weights, saved and restored whole.

A :class:`RunState` is the position (epoch, batches done in it, optimizer steps, samples), the
History, the run seed, the out-of-memory micro-batching, the partial epoch's sums and seconds,
the RNG states and the recipe (:mod:`colabkit.train.recipe`), plus the callbacks' states.
:meth:`RunState.state_dict` is the ``"fit"`` entry of every checkpoint (primitives and tensors
only, so it loads with ``weights_only=True``); :meth:`RunState.from_checkpoint` reads it back.
Model, optimizer, scheduler and scaler states are :mod:`colabkit.train.resume`'s.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from colabkit import _notify
from colabkit.train import distributed as _dist
from colabkit.train.datapath import Batches
from colabkit.train.history import History
from colabkit.train.metrics import Totals
from colabkit.train.oom import Backoff
from colabkit.train.recipe import samples_to_batches
from colabkit.train.state import TrainPosition, capture_rng_state, restore_rng_state

__all__ = ["CHECKPOINT_VERSION", "RunState", "capture_rngs"]

#: The ``"fit"`` entry's format (``version`` in it).
CHECKPOINT_VERSION = 1


@dataclasses.dataclass
class RunState:
    """One run's state, as the loop updates it and as a checkpoint holds it.

    Attributes:
        metric_names: The metrics summed in :attr:`totals`.
        recipe: What the run trains with (a rerun compares against it).
        callbacks: The callbacks whose ``state_dict()`` / ``load_state_dict()`` travel with the run.
        pos: Where the run is.
        history: Every finished epoch's record, and the hints given.
        seed: The run seed (data order, augmentation); the checkpoint's wins on a resume.
        backoff: Micro-batches per batch after out-of-memory errors.
        totals: This epoch's sums so far (on the device until read).
        elapsed_before: Seconds of this epoch spent before a resume.
        epoch_start: The clock's reading when this epoch started (or resumed) in this call.
        pending_rng: RNG states to put back right before the first new batch after a resume.
        epoch_rng: RNG states at the epoch's start, for a sampler that draws its order from them.
    """

    metric_names: list[str]
    recipe: dict[str, Any]
    callbacks: Sequence[Any] = ()
    pos: TrainPosition = dataclasses.field(default_factory=TrainPosition)
    history: History = dataclasses.field(default_factory=History)
    seed: int = 0
    backoff: Backoff = dataclasses.field(default_factory=Backoff)
    totals: Totals = dataclasses.field(init=False)
    elapsed_before: float = 0.0
    epoch_start: float = 0.0
    pending_rng: Any = None
    epoch_rng: Any = None

    def __post_init__(self) -> None:
        self.totals = Totals(self.metric_names)

    # -- the clock of an epoch

    def start_epoch(self, now: float) -> None:
        """The epoch starts (or goes on after a resume) at ``now``; a new epoch starts from zero sums."""
        if not self.pos.batch:
            self.new_epoch()
        self.epoch_start = now

    def new_epoch(self) -> None:
        self.totals = Totals(self.metric_names)
        self.elapsed_before = 0.0

    def epoch_seconds(self, now: float) -> float:
        """Seconds this epoch has taken until ``now``, across resumes."""
        return self.elapsed_before + now - self.epoch_start

    def epoch_batches(self, batches: Batches, epoch: int) -> Iterator[Any]:
        """This epoch's batches from where the run stands: the one place an epoch's data comes from.

        The finished batches are skipped without being read; after a resume the RNG states are
        put back right before the first new batch (and, for a sampler that draws its order from
        the global RNG, those of the epoch's start before the order is drawn again).
        """
        if batches.needs_epoch_rng:
            if self.pos.batch and self.epoch_rng is not None:
                restore_rng_state(self.epoch_rng)  # the unknown sampler draws this epoch's order again
            self.epoch_rng = capture_rngs()
        else:
            self.epoch_rng = None
        iterator = batches.epoch(epoch, skip=self.pos.batch)
        if self.pending_rng is not None:
            restore_rng_state(self.pending_rng)  # after skipping, right before the first new batch
            self.pending_rng = None
        return iterator

    # -- saved whole

    def state_dict(self, *, rngs: list[Any], now: float) -> dict[str, Any]:
        """The checkpoint's ``"fit"`` entry; ``rngs`` holds every rank's RNG states (one per rank)."""
        inside = bool(self.pos.batch)
        return {
            "version": CHECKPOINT_VERSION,
            "recipe": self.recipe,
            "position": self.pos.state_dict(),
            "seed": self.seed,
            "chunks": self.backoff.chunks,
            "world_size": len(rngs),
            "rng": rngs,
            "epoch_rng": self.epoch_rng if inside else None,
            "totals": self.totals.state_dict(),
            "epoch_seconds": self.epoch_seconds(now) if inside else 0.0,
            "history": self.history.state_dict(),
            "callbacks": [_callback_state(callback) for callback in self.callbacks],
        }

    @classmethod
    def from_checkpoint(
        cls,
        fit_state: Mapping[str, Any],
        *,
        metric_names: list[str],
        recipe: dict[str, Any],
        callbacks: Sequence[Any],
        rank: int,
        world_size: int,
    ) -> RunState:
        """This rank's state from a checkpoint's ``"fit"`` entry; the callbacks get their states back.

        Args:
            fit_state: What :meth:`state_dict` wrote.
            metric_names: This call's metrics (the partial epoch's sums are theirs).
            recipe: The recipe the run goes on with (:func:`colabkit.train.resume.restore_weights`);
                a new batch size moves a mid-epoch position to the same sample.
            callbacks: This call's callbacks, in the order of the saved states.
            rank: This process's rank.
            world_size: Processes in this run (a different count is warned about).
        """
        rngs = fit_state.get("rng", [])
        if len(rngs) != world_size:
            _notify.warn(
                f"the checkpoint was written by {len(rngs)} process(es), this run has {world_size}; "
                "training continues, but random numbers will not repeat exactly"
            )
        epoch_rngs = fit_state.get("epoch_rng") or []
        state = cls(
            metric_names=list(metric_names),
            recipe=recipe,
            callbacks=callbacks,
            pos=TrainPosition.from_state_dict(fit_state["position"]),
            history=History.from_state_dict(fit_state.get("history", {})),
            seed=int(fit_state["seed"]),
            elapsed_before=float(fit_state.get("epoch_seconds", 0.0)),
            pending_rng=rngs[min(rank, len(rngs) - 1)] if rngs else None,
            epoch_rng=epoch_rngs[min(rank, len(epoch_rngs) - 1)] if epoch_rngs else None,
        )
        state.history.stop_reason = ""
        state.totals.load_state_dict(fit_state["totals"])
        state.backoff.chunks = int(fit_state.get("chunks", 1))
        saved_recipe = fit_state.get("recipe") or {}
        state.pos.batch = samples_to_batches(state.pos.batch, saved_recipe.get("batch_size"), recipe.get("batch_size"))
        for callback, saved in zip(callbacks, fit_state.get("callbacks", []), strict=False):
            load = getattr(callback, "load_state_dict", None)
            if callable(load) and saved:
                load(saved)
        return state


def _callback_state(callback: Any) -> dict[str, Any]:
    method = getattr(callback, "state_dict", None)
    return dict(method()) if callable(method) else {}


def capture_rngs() -> list[Any]:
    """Every rank's RNG states (python, numpy, torch, CUDA), gathered on every rank."""
    return _dist.gather_objects(capture_rng_state())
