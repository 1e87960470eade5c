"""Callbacks: hook order, stopping, EarlyStopping (also across a resume), CSVLogger."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import TensorDataset
from witness import StepLog

from colabkit.errors import ArgumentError
from colabkit.train.callbacks import Callback, CSVLogger, EarlyStopping, FitContext
from colabkit.train.loop import fit


def blobs(n: int = 32) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=generator)
    return TensorDataset(x, (x[:, 0] > 0).long())


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


class Recorder(Callback):
    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []

    def on_fit_start(self, ctx: FitContext) -> None:
        self.calls.append(("fit_start", ctx.epoch, ctx.step))

    def on_epoch_start(self, ctx: FitContext) -> None:
        self.calls.append(("epoch_start", ctx.epoch, ctx.step))

    def on_step_end(self, ctx: FitContext) -> None:
        assert ctx.loss is not None and ctx.loss.dim() == 0
        self.calls.append(("step_end", ctx.epoch, ctx.step))

    def on_epoch_end(self, ctx: FitContext) -> None:
        assert "loss" in ctx.logs and ctx.logs["epoch"] == ctx.epoch
        self.calls.append(("epoch_end", ctx.epoch, ctx.step))

    def on_fit_end(self, ctx: FitContext) -> None:
        self.calls.append(("fit_end", ctx.epoch, ctx.step))


def test_hooks_run_in_order() -> None:
    recorder = Recorder()
    fit(mlp(), blobs(16), epochs=2, batch_size=8, callbacks=[recorder], progress=False)
    names = [name for name, _, _ in recorder.calls]
    assert names == ["fit_start", "epoch_start", "step_end", "step_end", "epoch_end",
                     "epoch_start", "step_end", "step_end", "epoch_end", "fit_end"]  # fmt: skip
    assert [step for name, _, step in recorder.calls if name == "step_end"] == [1, 2, 3, 4]


def test_duck_typed_callback_can_stop_training() -> None:
    class Stopper:  # no base class: only the hooks it needs
        def on_epoch_end(self, ctx: Any) -> None:
            if ctx.epoch == 1:
                ctx.stop("enough")

    history = fit(mlp(), blobs(), epochs=5, batch_size=8, callbacks=[Stopper()], progress=False)
    assert len(history) == 2 and history.stop_reason == "enough"


def test_stop_from_a_step_saves_mid_epoch(tmp_path: Path) -> None:
    class StopAt(Callback):
        def on_step_end(self, ctx: FitContext) -> None:
            if ctx.step == 3:
                ctx.stop()

    history = fit(mlp(), blobs(), epochs=2, batch_size=4, checkpoint_dir=tmp_path, callbacks=[StopAt()], progress=False)
    assert history.stop_reason == "callback" and len(history) == 0
    from colabkit.checkpoint import CheckpointManager

    assert CheckpointManager(tmp_path).load()["fit"]["position"]["step"] == 3


def test_early_stopping_stops_after_patience() -> None:
    # mode="max" on a falling training loss: the first epoch stays the best.
    stopper = EarlyStopping("loss", patience=2, mode="max")
    history = fit(mlp(), blobs(), epochs=10, batch_size=8, lr=0.05, callbacks=[stopper], progress=False)
    assert len(history) == 3 and history.stop_reason == "early_stopping"
    assert stopper.best_epoch == 0 and stopper.wait == 2


def test_early_stopping_restores_best_weights() -> None:
    model = mlp()
    snapshots: list[list[torch.Tensor]] = []

    class Snap(Callback):
        def on_epoch_end(self, ctx: FitContext) -> None:
            snapshots.append([p.detach().clone() for p in ctx.model.parameters()])

    stopper = EarlyStopping("loss", patience=1, mode="max", restore_best_weights=True)
    fit(model, blobs(), epochs=5, batch_size=8, lr=0.05, callbacks=[Snap(), stopper], progress=False)
    assert all(torch.equal(a, b) for a, b in zip(snapshots[0], model.parameters(), strict=True))


def test_early_stopping_state_survives_resume(tmp_path: Path) -> None:
    # mode="max" on a falling loss: epoch 0 stays best, so "wait" counts every later epoch.
    first = EarlyStopping("loss", patience=3, mode="max")
    fit(mlp(), blobs(), epochs=2, batch_size=8, lr=0.05, callbacks=[first], checkpoint_dir=tmp_path, progress=False)
    assert first.wait == 1
    again = EarlyStopping("loss", patience=3, mode="max")
    steps = StepLog()
    history = fit(mlp(), blobs(), epochs=10, batch_size=8, lr=0.05, callbacks=[again, steps], checkpoint_dir=tmp_path,
                  progress=False)  # fmt: skip
    # Resumed after epoch 2 (4 steps an epoch); a fresh EarlyStopping state would run to 6 epochs.
    assert history.stop_reason == "early_stopping" and len(history) == 4 and steps.span == (9, 16)
    assert again.best_epoch == 0


def test_early_stopping_as_a_patience_number() -> None:
    history = fit(mlp(), blobs(), blobs(), epochs=2, batch_size=8, early_stopping=3, progress=False)
    assert history.stop_reason == "completed"


def test_early_stopping_needs_a_recorded_monitor() -> None:
    with pytest.raises(ArgumentError, match=r"monitor='val_loss'.*pass val="):
        fit(mlp(), blobs(), callbacks=[EarlyStopping("val_loss")], progress=False)
    with pytest.raises(ArgumentError, match="patience=0"):
        EarlyStopping(patience=0)


def test_csv_logger_rewrites_whole_history(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "run.csv"
    fit(mlp(), blobs(), epochs=2, batch_size=8, callbacks=[CSVLogger(path)], checkpoint_dir=tmp_path / "c",
        progress=False)  # fmt: skip
    steps = StepLog()
    fit(mlp(), blobs(), epochs=3, batch_size=8, callbacks=[CSVLogger(path), steps], checkpoint_dir=tmp_path / "c",
        progress=False)  # fmt: skip
    assert steps.span == (9, 12)  # resumed: the first two epochs' rows came from the checkpoint
    with path.open() as file:
        rows = list(csv.DictReader(file))
    assert [row["epoch"] for row in rows] == ["0", "1", "2"]
    assert float(rows[2]["loss"]) > 0


def test_callback_class_instead_of_instance() -> None:
    with pytest.raises(ArgumentError, match=r"pass an instance: CSVLogger\(\)"):
        fit(mlp(), blobs(), callbacks=[CSVLogger], progress=False)  # type: ignore[list-item]
