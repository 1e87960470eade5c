"""A rerun of fit() that changes the recipe: every setting gets the behaviour fit's docstring documents."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from colabkit.errors import CheckpointMismatchError, ColabkitWarning
from colabkit.train.callbacks import Callback, FitContext
from colabkit.train.loop import fit


def data(n: int = 32) -> torch.utils.data.TensorDataset:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(n, 5, generator=generator)
    return torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long())


def model(hidden: int = 8) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 2))


class Seen(Callback):
    """What the rerun trains with: the first step's optimizer and scheduler, batch sizes, steps."""

    def __init__(self) -> None:
        self.group: dict[str, Any] = {}
        self.optimizer: Any = None
        self.scheduler: Any = None
        self.last_epoch: int | None = None
        self.steps: list[int] = []
        self.dtypes: list[torch.dtype] = []

    def on_fit_start(self, ctx: FitContext) -> None:
        ctx.model.register_forward_hook(lambda module, args, output: self.dtypes.append(output.dtype))

    def on_step_end(self, ctx: FitContext) -> None:
        if not self.steps:
            self.group = {k: v for k, v in ctx.optimizer.param_groups[0].items() if k != "params"}
            self.optimizer = ctx.optimizer
            self.scheduler = ctx.scheduler
            self.last_epoch = getattr(ctx.scheduler, "last_epoch", None)
        self.steps.append(ctx.step)


BASE: dict[str, Any] = {"batch_size": 4, "seed": 0, "progress": False, "metrics": (), "save_every": "epoch"}


def first_then_rerun(
    tmp_path: Path, first: dict[str, Any], rerun: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> tuple[Seen, str]:
    folder = tmp_path / "ckpt"
    fit(model(), data(), epochs=1, checkpoint_dir=folder, **{**BASE, **first})
    capsys.readouterr()
    seen = Seen()
    fit(model(), data(), epochs=2, checkpoint_dir=folder, callbacks=[seen], **{**BASE, **rerun})
    assert seen.steps[0] == 9, "the rerun must resume after the first epoch (8 steps)"
    return seen, capsys.readouterr().out


def test_a_new_lr_applies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seen, out = first_then_rerun(tmp_path, {"lr": 0.001}, {"lr": 0.1}, capsys)
    assert seen.group["lr"] == pytest.approx(0.1)
    assert "lr was 0.001 when the checkpoint was saved and is 0.1 now" in out


def test_a_new_lr_under_a_scheduler_scales_the_schedule(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def step_lr(opt: torch.optim.Optimizer) -> Any:
        return torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    seen, out = first_then_rerun(
        tmp_path, {"lr": 0.1, "scheduler": step_lr}, {"lr": 0.01, "scheduler": step_lr}, capsys
    )
    # One epoch (one scheduler step) at base 0.1 gave 0.05; the new base 0.01 gives 0.005.
    assert seen.group["lr"] == pytest.approx(0.005)
    assert seen.scheduler.base_lrs == [pytest.approx(0.01)]
    assert "scaled to the new base lr" in out


def test_new_optimizer_settings_apply(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def adamw(wd: float) -> Any:
        return lambda params, lr: torch.optim.AdamW(params, lr=lr, weight_decay=wd)

    seen, out = first_then_rerun(tmp_path, {"optimizer": adamw(0.01)}, {"optimizer": adamw(0.2)}, capsys)
    assert seen.group["weight_decay"] == 0.2
    assert "weight_decay was 0.01" in out


def test_a_new_optimizer_class_starts_fresh(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seen, out = first_then_rerun(
        tmp_path, {}, {"optimizer": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9)}, capsys
    )
    assert isinstance(seen.optimizer, torch.optim.SGD)
    assert "betas" not in seen.group  # AdamW's state was not loaded into it
    assert not any("exp_avg" in state for state in seen.optimizer.state.values())
    assert "SGD starts with empty state" in out


def test_a_new_scheduler_starts_at_its_beginning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seen, out = first_then_rerun(
        tmp_path,
        {"lr": 0.1, "scheduler": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)},
        {"lr": 0.1, "scheduler": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)},
        capsys,
    )
    assert isinstance(seen.scheduler, torch.optim.lr_scheduler.CosineAnnealingLR)
    assert seen.last_epoch == 0 and not hasattr(seen.scheduler, "step_size")  # StepLR's state not loaded
    assert seen.group["lr"] == pytest.approx(0.1)  # its own start, not StepLR's 0.05
    assert "CosineAnnealingLR starts at its beginning" in out


def test_changed_scheduler_settings_keep_the_checkpoints(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def step_lr(size: int) -> Any:
        return lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=size, gamma=0.5)

    with pytest.warns(ColabkitWarning, match="checkpoint's value wins.*resume=False or a new checkpoint_dir"):
        seen, _ = first_then_rerun(tmp_path, {"scheduler": step_lr(1)}, {"scheduler": step_lr(7)}, capsys)
    assert seen.scheduler.step_size == 1
    # The next rerun with 7 is told again: the checkpoint records what really trains (1).
    with pytest.warns(ColabkitWarning, match="step_size was 1 when the checkpoint was saved and is 7 now"):
        fit(model(), data(), epochs=3, checkpoint_dir=tmp_path / "ckpt", scheduler=step_lr(7), **BASE)


def test_a_new_batch_size_applies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "ckpt"
    fit(model(), data(), epochs=1, checkpoint_dir=folder, **BASE)
    capsys.readouterr()
    seen = Seen()
    fit(model(), data(), epochs=2, checkpoint_dir=folder, callbacks=[seen], **{**BASE, "batch_size": 8})
    assert seen.steps == [9, 10, 11, 12]  # 32 samples in batches of 8
    assert "batch_size was 4 when the checkpoint was saved and is 8 now" in capsys.readouterr().out


def test_a_new_batch_size_inside_an_epoch_goes_on_from_the_same_sample(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "ckpt"
    fit(model(), data(), epochs=1, max_steps=4, checkpoint_dir=folder, **{**BASE, "save_every": 4})
    seen = Seen()
    fit(model(), data(), epochs=1, checkpoint_dir=folder, callbacks=[seen], **{**BASE, "batch_size": 8})
    # 16 of 32 samples done in batches of 4: the rest is 2 batches of 8.
    assert seen.steps == [5, 6]
    assert "same sample position" in capsys.readouterr().out


def test_a_new_grad_accum_applies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "ckpt"
    fit(model(), data(), epochs=1, checkpoint_dir=folder, **BASE)
    capsys.readouterr()
    seen = Seen()
    fit(model(), data(), epochs=2, checkpoint_dir=folder, callbacks=[seen], grad_accum=2, **BASE)
    assert seen.steps == [9, 10, 11, 12]  # 8 batches, 2 per step
    assert "grad_accum was 1 when the checkpoint was saved and is 2 now" in capsys.readouterr().out


def test_a_new_precision_applies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seen, out = first_then_rerun(tmp_path, {"precision": "fp32"}, {"precision": "bf16"}, capsys)
    assert set(seen.dtypes) == {torch.bfloat16}  # the rerun computes in bf16
    assert "precision was 'fp32' when the checkpoint was saved and is 'bf16' now" in out


def test_a_new_dataset_length_applies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "ckpt"
    fit(model(), data(), epochs=1, checkpoint_dir=folder, **BASE)
    capsys.readouterr()
    seen = Seen()
    fit(model(), data(48), epochs=2, checkpoint_dir=folder, callbacks=[seen], **BASE)
    assert seen.steps == list(range(9, 21))  # 48 samples in batches of 4
    assert "the training set's length was 32 when the checkpoint was saved and is 48 now" in capsys.readouterr().out


def test_another_model_or_other_param_groups_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    fit(model(), data(), epochs=1, checkpoint_dir=folder, **BASE)
    with pytest.raises(CheckpointMismatchError, match=r"another model.*resume=False"):
        fit(model(hidden=9), data(), epochs=2, checkpoint_dir=folder, **BASE)

    def two_groups(params: Any, lr: float) -> torch.optim.Optimizer:
        params = list(params)
        return torch.optim.AdamW([{"params": params[:2]}, {"params": params[2:]}], lr=lr)

    seen = Seen()
    with pytest.raises(CheckpointMismatchError, match=r"number of optimizer param groups was 1.*is 2 now"):
        fit(model(), data(), epochs=2, checkpoint_dir=folder, optimizer=two_groups, callbacks=[seen], **BASE)
    assert seen.steps == []


def test_the_same_recipe_says_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seen, out = first_then_rerun(tmp_path, {"lr": 0.01}, {"lr": 0.01}, capsys)
    assert "when the checkpoint was saved" not in out
    assert seen.group["lr"] == 0.01
