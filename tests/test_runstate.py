"""RunState: the run's state saved and restored whole; a checkpoint written before the split still resumes."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset
from witness import StepLog

from colabkit.checkpoint import load_checkpoint
from colabkit.train.history import History
from colabkit.train.loop import fit
from colabkit.train.runstate import RunState
from colabkit.train.state import TrainPosition

#: Written by fit() on main before the trainer was split (commit 99f912f), with the arguments of
#: :func:`_fit` and ``max_steps=11``: it stopped inside the second epoch (batch 3 of 8, step 11).
MAIN_FOLDER = Path(__file__).parent / "data" / "fit_checkpoint_main"


class Remembers:
    """A callback with state (as EarlyStopping has)."""

    def __init__(self) -> None:
        self.seen = 0

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = int(state["seen"])


def test_the_run_state_round_trips_whole() -> None:
    callback = Remembers()
    callback.seen = 7
    state = RunState(["accuracy"], {"batch_size": 8, "grad_accum": 2}, [callback])
    state.pos = TrainPosition(epoch=2, batch=5, step=21, samples=168)
    state.history = History([{"epoch": 0, "loss": 0.9}, {"epoch": 1, "loss": 0.7}], hints=[{"name": "lr"}])
    state.seed, state.backoff.chunks = 1234, 4
    state.totals.add(torch.tensor(0.5), 8, (21, 2, 5))
    state.totals.add_metric(0, torch.tensor(6.0), 8)
    state.totals.drain()
    state.elapsed_before, state.epoch_start = 3.0, 100.0
    state.epoch_rng = [{"torch": torch.zeros(3)}, {"torch": torch.ones(3)}]  # every rank's, as gathered
    saved = state.state_dict(rngs=[{"python": None}, {"python": None}], now=110.0)
    assert saved["world_size"] == 2 and saved["epoch_seconds"] == 13.0
    assert "grad_accum" not in saved and saved["recipe"]["grad_accum"] == 2  # saved once, in the recipe

    restored_callback = Remembers()
    back = RunState.from_checkpoint(
        saved, metric_names=["accuracy"], recipe=saved["recipe"], callbacks=[restored_callback], rank=1, world_size=2
    )
    assert back.pos == state.pos and back.seed == 1234 and back.backoff.chunks == 4
    assert back.history.records == state.history.records and back.history.hints == [{"name": "lr"}]
    assert back.totals.state_dict() == state.totals.state_dict()
    assert back.elapsed_before == 13.0 and back.pending_rng == {"python": None}
    assert torch.equal(back.epoch_rng["torch"], torch.ones(3))  # rank 1's
    assert restored_callback.seen == 7


def test_a_new_batch_size_moves_the_position_to_the_same_sample() -> None:
    state = RunState([], {"batch_size": 8}, ())
    state.pos = TrainPosition(epoch=0, batch=4, step=4, samples=32)
    saved = state.state_dict(rngs=[{}], now=0.0)
    back = RunState.from_checkpoint(
        saved, metric_names=[], recipe={"batch_size": 16}, callbacks=(), rank=0, world_size=1
    )
    assert back.pos.batch == 2


def _blobs(n: int = 64, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=generator)
    return TensorDataset(x, (x[:, 0] + x[:, 1] > 0).long())


def _fit(folder: Path, **extra: Any) -> tuple[torch.nn.Module, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    history = fit(
        model,
        _blobs(),
        _blobs(16, 1),
        epochs=2,
        batch_size=8,
        seed=0,
        checkpoint_dir=folder,
        keep_last=1,
        scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5),
        progress=False,
        **extra,
    )
    return model, history


def test_a_checkpoint_written_before_the_split_resumes_exactly(tmp_path: Path) -> None:
    folder = tmp_path / "main"
    shutil.copytree(MAIN_FOLDER, folder)
    assert load_checkpoint(folder)["fit"]["position"]["step"] == 11
    steps = StepLog()
    resumed, history = _fit(folder, callbacks=[steps])
    assert steps.span == (12, 16)  # went on after step 11, inside the second epoch
    assert history.stop_reason == "completed" and len(history) == 2
    whole, _ = _fit(tmp_path / "whole")
    for a, b in zip(resumed.parameters(), whole.parameters(), strict=True):
        if _fused_adamw_on_cpu():
            assert torch.equal(a, b)
        else:  # the floor's torch: steps 1-11 ran main's fused kernel, the rest plain AdamW
            torch.testing.assert_close(a, b)


def _fused_adamw_on_cpu() -> bool:
    """Whether this torch has the fused CPU AdamW kernel the fixture's run used (torch 2.4+)."""
    try:
        torch.optim.AdamW([torch.zeros(1, requires_grad=True)], fused=True)
    except RuntimeError:
        return False
    return True
