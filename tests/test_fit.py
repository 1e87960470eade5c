"""fit(), evaluate(), predict(): training behaviour, options, bad input, signals, time limits, precision."""

from __future__ import annotations

import itertools
import os
import signal
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset
from witness import StepLog

from colabkit import device as colabkit_device
from colabkit.errors import ArgumentError, CheckpointMismatchError, NonFiniteLossError
from colabkit.train import loop, options
from colabkit.train.callbacks import Callback, FitContext
from colabkit.train.loop import evaluate, fit, parse_duration, predict
from colabkit.train.precision import resolve_precision


def blobs(n: int = 64, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=generator)
    y = (x[:, 0] + x[:, 1] > 0).long()
    return TensorDataset(x, y)


def mlp(outputs: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, outputs))


def params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


class Steps(Callback):
    """Counts optimizer steps; optionally does something at one of them."""

    def __init__(self, at: int | None = None, action: Any = None) -> None:
        self.steps = 0
        self.at = at
        self.action = action

    def on_step_end(self, ctx: FitContext) -> None:
        self.steps += 1
        if ctx.step == self.at and self.action is not None:
            self.action(ctx)


def test_fit_learns_and_reports(tmp_path: Path) -> None:
    model = mlp()
    history = fit(model, blobs(), blobs(seed=1), epochs=8, batch_size=16, lr=0.05, seed=0, progress=False)
    assert history.stop_reason == "completed" and len(history) == 8
    assert history.keys()[:5] == ["epoch", "loss", "accuracy", "val_loss", "val_accuracy"]
    assert {"lr", "time", "samples_per_sec"} <= set(history.keys())
    assert history["loss"][-1] < history["loss"][0] * 0.7
    assert history[-1]["accuracy"] > 0.85
    result = evaluate(model, blobs(seed=1), progress=False)
    assert result["loss"] == pytest.approx(history[-1]["val_loss"], rel=1e-5)
    assert result["accuracy"] == pytest.approx(history[-1]["val_accuracy"])
    logits = predict(model, blobs(seed=1).tensors[0], progress=False)
    assert logits.shape == (64, 2) and not logits.requires_grad
    assert model.training  # evaluate/predict put the mode back


def test_predict_accepts_datasets_with_or_without_targets() -> None:
    model = mlp()
    data = blobs()
    with_targets = predict(model, data, batch_size=10, progress=False)
    inputs_only = predict(model, TensorDataset(data.tensors[0]), batch_size=7, progress=False)
    assert torch.allclose(with_targets, inputs_only)


def test_progress_false_prints_nothing(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    fit(mlp(), blobs(), blobs(), epochs=2, batch_size=8, checkpoint_dir=tmp_path, progress=False)
    steps = StepLog()
    fit(mlp(), blobs(), blobs(), epochs=3, batch_size=8, checkpoint_dir=tmp_path, callbacks=[steps], progress=False)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert steps.span == (17, 24)  # it did resume (8 steps an epoch), silently


def test_progress_in_a_log_is_one_line_per_epoch_and_a_resumed_run_repeats_earlier_ones(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    fit(mlp(), blobs(), epochs=2, batch_size=8, checkpoint_dir=tmp_path)
    fit(mlp(), blobs(), epochs=3, batch_size=8, checkpoint_dir=tmp_path)
    out, err = capfd.readouterr()
    epochs = [line.split("  ")[0] for line in out.splitlines() if line.startswith("epoch ")]
    assert epochs == ["epoch 1/2", "epoch 2/2", "epoch 1/3", "epoch 2/3", "epoch 3/3"]
    assert all(" loss " in line and " accuracy " in line for line in out.splitlines() if line.startswith("epoch "))
    assert "resuming from" in out
    assert "\r" not in out + err and "\x1b[" not in out + err  # pytest's capture is no terminal: no bars


def test_dict_batches_and_custom_loss() -> None:
    class Pairs(Dataset):  # type: ignore[type-arg]
        def __len__(self) -> int:
            return 20

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            x = torch.full((4,), float(i) / 20)
            return {"x": x, "labels": x.sum(0, keepdim=True)}

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x)

    history = fit(
        Net(),
        Pairs(),
        epochs=3,
        batch_size=5,
        loss_fn=torch.nn.MSELoss(),
        metrics=("mae",),
        num_workers=0,
        progress=False,
    )
    assert history.keys()[:3] == ["epoch", "loss", "mae"]


def test_max_steps_and_optimizer_count() -> None:
    counter = Steps()
    history = fit(mlp(), blobs(), epochs=5, batch_size=8, max_steps=11, callbacks=[counter], progress=False)
    assert counter.steps == 11 and history.stop_reason == "max_steps" and len(history) == 1


def test_grad_accumulation_steps_less_often() -> None:
    counter = Steps()
    fit(mlp(), blobs(n=40), epochs=1, batch_size=4, grad_accum=3, callbacks=[counter], progress=False)
    assert counter.steps == 4  # 10 batches: 3 + 3 + 3 + 1


def test_optimizer_and_scheduler_factories() -> None:
    model = mlp()
    history = fit(
        model,
        blobs(),
        epochs=3,
        batch_size=16,
        lr=0.1,
        optimizer=torch.optim.SGD,
        scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
        progress=False,
    )
    assert history["lr"] == pytest.approx([0.1, 0.05, 0.025])  # the rate each epoch trained with


def test_per_step_scheduler() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=8)
    history = fit(model, blobs(), epochs=1, batch_size=8, optimizer=opt, scheduler=sched, progress=False)
    assert sched.last_epoch == 8 and history["lr"][0] == pytest.approx(sched.get_last_lr()[0])
    plateau_model = mlp()
    plateau_opt = torch.optim.SGD(plateau_model.parameters(), lr=1.0)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(plateau_opt, mode="max", patience=0)
    fit(plateau_model, blobs(), epochs=2, batch_size=8, optimizer=plateau_opt, scheduler=(plateau, "epoch"),
        monitor="loss", progress=False)  # fmt: skip
    assert plateau_opt.param_groups[0]["lr"] < 1.0  # "max" mode on a falling loss: reduced


def test_clip_grad_norm_and_channels_last_run() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 6, 6, generator=generator) * 10  # large inputs: gradient norms well above the cap
    y = torch.randint(0, 2, (16,), generator=generator)

    def run(**kwargs: Any) -> tuple[torch.nn.Module, list[float], set[tuple[bool, bool]]]:
        """The trained model, the gradient norm each optimizer step used, and (input, weight) channels-last
        as the convolution saw them."""
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 2))
        conv = model[0]
        layouts: set[tuple[bool, bool]] = set()

        def seen(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            layout = torch.channels_last
            layouts.add((args[0].is_contiguous(memory_format=layout), conv.weight.is_contiguous(memory_format=layout)))

        conv.register_forward_pre_hook(seen)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        norms: list[float] = []

        def before_step(*_: Any) -> None:  # the gradients the update uses (clipped already, if clipping)
            grads = [p.grad.detach().flatten() for p in model.parameters() if p.grad is not None]
            norms.append(float(torch.cat(grads).norm()))

        optimizer.register_step_pre_hook(before_step)
        history = fit(model, TensorDataset(x, y), batch_size=4, optimizer=optimizer, seed=0, progress=False, **kwargs)
        assert history.stop_reason == "completed"
        return model, norms, layouts

    plain, plain_norms, plain_layouts = run()
    clipped, clipped_norms, clipped_layouts = run(clip_grad_norm=0.5, channels_last=True)
    assert max(plain_norms) > 1.0  # unclipped, the norms pass the cap...
    assert len(clipped_norms) == len(plain_norms) and max(clipped_norms) <= 0.5 + 1e-4  # ...clipped, none does
    assert not all(torch.equal(a, b) for a, b in zip(plain.parameters(), clipped.parameters(), strict=True))
    assert plain_layouts == {(False, False)}
    assert clipped_layouts == {(True, True)}  # inputs and weights channels-last inside forward


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epochs": 0}, "epochs=0"),
        ({"grad_accum": 0}, "grad_accum=0"),
        ({"precision": "fp8"}, "precision='fp8'"),
        ({"metrics": ("f1",)}, "'f1' is unknown"),
        ({"save_every": "often"}, "save_every='often'"),
        ({"time_limit": "2 parsecs"}, "time_limit="),
        ({"clip_grad_norm": -1}, "clip_grad_norm=-1"),
        ({"seed": -3}, "seed=-3"),
        ({"early_stopping": 0}, "early_stopping=0"),
        ({"optimizer": "adam"}, "optimizer='adam'"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"num_workers": -1}, "num_workers=-1"),
    ],
)
def test_bad_arguments_fail_before_training(kwargs: dict[str, Any], match: str) -> None:
    model = mlp()
    before = params(model)
    with pytest.raises(ArgumentError, match=match):
        fit(model, blobs(), **{"progress": False, **kwargs})
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_bad_model_and_data() -> None:
    with pytest.raises(ArgumentError, match=r"not a torch\.nn\.Module"):
        fit(lambda x: x, blobs())  # type: ignore[arg-type]
    with pytest.raises(ArgumentError, match="empty"):
        fit(mlp(), TensorDataset(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)), progress=False)
    with pytest.raises(ArgumentError, match="pass a torch Dataset or DataLoader"):
        fit(mlp(), 42, progress=False)
    empty_loader = DataLoader(TensorDataset(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)))
    with pytest.raises(ArgumentError, match="empty"):
        fit(mlp(), empty_loader, progress=False)


class Batches(torch.utils.data.IterableDataset):  # type: ignore[type-arg]
    """An iterable dataset of ``count`` batches, readable ``reads`` times."""

    def __init__(self, count: int, reads: int = 1000) -> None:
        self.count, self.reads = count, reads

    def __iter__(self) -> Any:
        self.reads -= 1
        if self.reads < 0:
            return iter(())
        return iter([(torch.randn(4), torch.tensor(1))] * self.count)


def test_an_iterable_without_batches_is_an_error(tmp_path: Path) -> None:
    model = mlp()
    before = params(model)
    with pytest.raises(ArgumentError, match="no batches in epoch 1; check that the dataset yields"):
        fit(model, Batches(0), checkpoint_dir=tmp_path, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    with pytest.raises(ArgumentError, match=r"no batches in epoch 2 .*read only once"):
        fit(mlp(), Batches(3, reads=1), epochs=2, batch_size=2, num_workers=0, progress=False)


@pytest.mark.parametrize(
    ("labels", "loss_fn", "match"),
    [
        (torch.rand(32), None, "integer class indices"),
        (torch.randint(0, 2, (32, 1)), None, r"do not fit outputs"),
        (torch.randint(0, 7, (32,)), None, "model outputs 2 classes"),
        (torch.randint(0, 2, (32,)), lambda out, y: (out[:, 0] - y) ** 2, "not a scalar"),
        (torch.randint(0, 2, (32,)), torch.nn.MSELoss(), "loss_fn failed on the first batch"),
    ],
    ids=["float-labels", "label-shape", "label-range", "non-scalar-loss", "loss-error"],
)
@pytest.mark.filterwarnings("ignore:Using a target size")
def test_bad_labels_and_losses_fail_before_the_first_step(labels: torch.Tensor, loss_fn: Any, match: str) -> None:
    model = mlp()
    before = params(model)
    data = TensorDataset(torch.randn(32, 4), labels)
    with pytest.raises(ArgumentError, match=match):
        fit(model, data, loss_fn=loss_fn, metrics=(), progress=False, batch_size=8)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert all(p.grad is None for p in model.parameters())


def test_metric_that_does_not_fit_the_task() -> None:
    data = TensorDataset(torch.randn(8, 4), torch.randn(8, 2))
    with pytest.raises(ArgumentError, match="metric 'top5_accuracy' cannot be computed"):
        fit(mlp(), data, loss_fn=torch.nn.MSELoss(), metrics=("top5_accuracy",), progress=False)


def test_bad_data_with_a_checkpoint_changes_nothing(tmp_path: Path) -> None:
    fit(mlp(), blobs(), epochs=1, batch_size=16, checkpoint_dir=tmp_path, progress=False)
    fresh = mlp()
    before = params(fresh)
    with pytest.raises(ArgumentError, match="empty"):
        fit(fresh, TensorDataset(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)), checkpoint_dir=tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(before, fresh.parameters(), strict=True))
    # The checkpoints are as they were: a rerun with good data resumes after the first run's 4 steps.
    steps = StepLog()
    fit(fresh, blobs(), epochs=2, batch_size=16, checkpoint_dir=tmp_path, callbacks=[steps], progress=False)
    assert steps.span == (5, 8)


def test_evaluate_needs_targets() -> None:
    with pytest.raises(ArgumentError, match=r"need \(inputs, targets\) pairs"):
        evaluate(mlp(), TensorDataset(torch.randn(4, 4)), progress=False)


def test_checkpoint_of_another_model(tmp_path: Path) -> None:
    fit(mlp(), blobs(), epochs=1, batch_size=16, checkpoint_dir=tmp_path, progress=False)
    bigger = mlp(outputs=3)
    before = params(bigger)
    with pytest.raises(CheckpointMismatchError, match=r"another model .*resume=False"):
        fit(bigger, blobs(), epochs=2, checkpoint_dir=tmp_path, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, bigger.parameters(), strict=True))
    history = fit(bigger, blobs(), epochs=1, checkpoint_dir=tmp_path, resume=False, progress=False)
    assert history.stop_reason == "completed"


def test_nan_loss_names_the_step_and_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    x = torch.randn(64, 4)
    x[37] = float("nan")  # batch 5 of 8 when not shuffled
    loader = DataLoader(TensorDataset(x, torch.zeros(64, dtype=torch.long)), batch_size=8)
    with pytest.raises(NonFiniteLossError, match=r"optimizer step 5 .*step 3\) is intact.*lower learning rate"):
        fit(mlp(), loader, checkpoint_dir=tmp_path, save_every=3, progress=False)
    from colabkit.checkpoint import CheckpointManager

    state = CheckpointManager(tmp_path).load()
    assert state["fit"]["position"]["step"] == 3
    assert all(torch.isfinite(v).all() for v in state["model_state_dict"].values())
    # That checkpoint is the one a rerun goes on from, once the bad sample is fixed: after step 3.
    x[37] = 0.0
    steps = StepLog()
    fit(mlp(), DataLoader(TensorDataset(x, torch.zeros(64, dtype=torch.long)), batch_size=8),
        checkpoint_dir=tmp_path, save_every=3, callbacks=[steps], progress=False)  # fmt: skip
    assert steps.span == (4, 8)


def test_interrupt_saves_and_returns_history_then_resumes(tmp_path: Path) -> None:
    reference = mlp()
    fit(reference, blobs(), epochs=2, batch_size=8, seed=1, progress=False)

    model = mlp()
    interrupt = Steps(at=3, action=lambda ctx: os.kill(os.getpid(), signal.SIGINT))
    history = fit(model, blobs(), epochs=2, batch_size=8, seed=1, checkpoint_dir=tmp_path, callbacks=[interrupt],
                  progress=False)  # fmt: skip
    assert history.stop_reason == "interrupted" and interrupt.steps == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler put back

    resumed = mlp()
    steps = StepLog()
    history = fit(resumed, blobs(), epochs=2, batch_size=8, seed=1, checkpoint_dir=tmp_path, callbacks=[steps],
                  progress=False)  # fmt: skip
    assert history.stop_reason == "completed" and len(history) == 2 and steps.span == (4, 16)
    assert all(torch.equal(a, b) for a, b in zip(reference.parameters(), resumed.parameters(), strict=True))


class InterruptingVal(Dataset):  # type: ignore[type-arg]
    """A validation set that 'presses stop' while sample 20 loads, once."""

    def __init__(self) -> None:
        self.data = blobs(seed=1)
        self.sent = False

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Any:
        if index == 20 and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGINT)
        return self.data[index]


def test_interrupt_during_validation_resumes_into_that_validation(tmp_path: Path) -> None:
    reference = mlp()
    expected = fit(reference, blobs(), blobs(seed=1), epochs=2, batch_size=8, seed=1, progress=False)
    val = InterruptingVal()
    options: dict[str, Any] = {"epochs": 2, "batch_size": 8, "seed": 1, "num_workers": 0, "progress": False}
    stopped = fit(mlp(), blobs(), val, checkpoint_dir=tmp_path, **options)
    assert stopped.stop_reason == "interrupted" and len(stopped) == 0
    from colabkit.checkpoint import CheckpointManager

    position = CheckpointManager(tmp_path).load()["fit"]["position"]
    assert (position["epoch"], position["batch"]) == (0, 8)  # all batches done, epoch not closed
    resumed = mlp()
    steps = StepLog()
    history = fit(resumed, blobs(), val, checkpoint_dir=tmp_path, callbacks=[steps], **options)
    assert steps.span == (9, 16)  # the first epoch's training was not repeated
    assert [r["val_loss"] for r in history] == [r["val_loss"] for r in expected]
    assert [r["loss"] for r in history] == [r["loss"] for r in expected]
    assert all(torch.equal(a, b) for a, b in zip(reference.parameters(), resumed.parameters(), strict=True))


def test_second_interrupt_stops_at_once(tmp_path: Path) -> None:
    def twice(ctx: FitContext) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        fit(mlp(), blobs(), batch_size=8, checkpoint_dir=tmp_path, callbacks=[Steps(at=2, action=twice)],
            progress=False)  # fmt: skip


def test_sigterm_saves_at_the_next_step(tmp_path: Path) -> None:
    term = Steps(at=4, action=lambda ctx: os.kill(os.getpid(), signal.SIGTERM))
    history = fit(mlp(), blobs(), epochs=3, batch_size=8, checkpoint_dir=tmp_path, callbacks=[term], progress=False)
    assert history.stop_reason == "interrupted"
    from colabkit.checkpoint import CheckpointManager

    assert CheckpointManager(tmp_path).load()["fit"]["position"] == {"epoch": 0, "batch": 4, "step": 4, "samples": 32}


class FakeClock:
    def __init__(self, tick: float) -> None:
        self.now = 1000.0
        self.tick = tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def test_time_limit_stops_with_a_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loop, "_clock", FakeClock(1.0))
    history = fit(mlp(), blobs(), epochs=4, batch_size=8, checkpoint_dir=tmp_path, time_limit="30s", progress=False)
    assert history.stop_reason == "time_limit"
    from colabkit.checkpoint import CheckpointManager

    state = CheckpointManager(tmp_path).load()
    saved = state["fit"]["position"]["step"]
    assert 0 < saved < 32
    steps = StepLog()
    again = fit(mlp(), blobs(), epochs=4, batch_size=8, checkpoint_dir=tmp_path, time_limit=3600, callbacks=[steps],
                progress=False)  # fmt: skip
    assert again.stop_reason == "completed" and len(again) == 4 and steps.span == (saved + 1, 32)


def test_time_limit_session(monkeypatch: pytest.MonkeyPatch) -> None:
    from colabkit import session

    monkeypatch.setattr(session, "session_time_left", lambda: timedelta(minutes=10, seconds=30))
    assert options.parse_time_limit("session") == pytest.approx(30.0)
    monkeypatch.setattr(session, "session_time_left", lambda: None)
    with pytest.warns(UserWarning, match="no effect here"):
        assert options.parse_time_limit("session") is None


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("2h30m", 9000), ("90min", 5400), ("45s", 45), ("1.5h", 5400), ("1d", 86400), (120, 120), ("600", 600)],
)
def test_parse_duration(text: Any, seconds: float) -> None:
    assert parse_duration(text, argument="time_limit") == seconds


def test_time_based_saves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loop, "_clock", FakeClock(1.0))
    fit(mlp(), blobs(), epochs=1, batch_size=8, checkpoint_dir=tmp_path, save_every="5s", keep_last=10, progress=False)
    from colabkit.checkpoint import CheckpointManager

    steps = [info.step for info in CheckpointManager(tmp_path, keep_last=10).checkpoints()]
    assert len(steps) >= 2 and steps[-1] == 8


def test_precision_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu).name == "fp32"
    assert resolve_precision("auto", cpu).make_scaler() is None
    monkeypatch.setattr(colabkit_device.backend, "cuda_capability", lambda index: (7, 5))  # T4
    t4 = resolve_precision("auto", torch.device("cuda"))
    assert (t4.name, t4.dtype, t4.scaler) == ("fp16", torch.float16, True)
    monkeypatch.setattr(colabkit_device.backend, "cuda_capability", lambda index: (8, 0))  # A100
    a100 = resolve_precision("auto", torch.device("cuda"))
    assert (a100.name, a100.dtype, a100.scaler) == ("bf16", torch.bfloat16, False)
    assert resolve_precision("16-mixed", cpu).name == "fp16"
    with pytest.raises(ArgumentError, match="precision='half'"):
        resolve_precision("half", cpu)


def test_bf16_on_cpu_trains() -> None:
    model = mlp()
    dtypes: set[torch.dtype] = set()
    model[0].register_forward_hook(lambda module, args, output: dtypes.add(output.dtype))
    history = fit(model, blobs(), epochs=2, batch_size=16, precision="bf16", lr=0.05, progress=False)
    assert history["loss"][1] < history["loss"][0]
    assert dtypes == {torch.bfloat16}  # the forward pass ran under bf16 autocast
    assert model[0].weight.dtype == torch.float32  # the weights stay fp32


def test_no_value_is_read_back_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """colabkit reads losses from the device in batches, not once per step (optimizers may, on their own)."""
    reads = itertools.count()

    def counted(method: Any) -> Any:
        def wrapper(self: torch.Tensor, *args: Any) -> Any:
            if "colabkit" in sys._getframe(1).f_code.co_filename:
                next(reads)
            return method(self, *args)

        return wrapper

    for name in ("tolist", "item", "__float__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, counted(getattr(torch.Tensor, name)))
    fit(mlp(), blobs(n=256), epochs=1, batch_size=4, progress=False)  # 64 steps
    assert next(reads) < 8


# -- clean ends: closing the checkpoint manager, time limits that include the whole save


def test_an_error_while_closing_does_not_hide_the_training_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from colabkit.checkpoint import CheckpointManager
    from colabkit.errors import CheckpointError, ColabkitWarning

    def failing_wait(self: CheckpointManager) -> None:
        raise CheckpointError(5, "copy to Drive failed")

    monkeypatch.setattr(CheckpointManager, "wait", failing_wait)
    x = torch.randn(64, 4)
    x[37] = float("nan")
    loader = DataLoader(TensorDataset(x, torch.zeros(64, dtype=torch.long)), batch_size=8)
    with (
        pytest.raises(NonFiniteLossError, match="optimizer step 5"),
        pytest.warns(ColabkitWarning, match=r"while closing after an error: .*copy to Drive failed"),
    ):
        fit(mlp(), loader, checkpoint_dir=tmp_path, save_every=3, progress=False)


def test_the_manager_is_closed_when_resuming_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from colabkit.checkpoint import CheckpointManager

    fit(mlp(), blobs(), epochs=1, batch_size=16, checkpoint_dir=tmp_path, progress=False)
    closed: list[CheckpointManager] = []
    original = CheckpointManager.close

    def close(self: CheckpointManager) -> None:
        closed.append(self)
        original(self)

    monkeypatch.setattr(CheckpointManager, "close", close)
    with pytest.raises(CheckpointMismatchError, match="another model"):
        fit(mlp(outputs=3), blobs(), epochs=2, checkpoint_dir=tmp_path, progress=False)
    assert len(closed) == 1
    assert closed[0]._closed


class OnStep(Callback):
    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def on_step_end(self, ctx: FitContext) -> None:
        self.fn(ctx)


class SlowCommits:
    """A fake clock (seconds) where each step takes 1 s and a checkpoint is committed ``commit`` s after save()."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, commit: float) -> None:
        from colabkit.checkpoint import CheckpointManager

        self.now = 0.0
        self.done_at = 0.0  # when the newest commit finishes
        monkeypatch.setattr(loop, "_clock", lambda: self.now)
        save, wait = CheckpointManager.save, CheckpointManager.wait

        def slow_save(manager: CheckpointManager, *args: Any, **kwargs: Any) -> Any:
            self.now = max(self.now, self.done_at)  # save() waits for the previous commit
            path = save(manager, *args, **kwargs)
            self.done_at = self.now + commit
            return path

        def slow_wait(manager: CheckpointManager) -> None:
            wait(manager)
            self.now = max(self.now, self.done_at)

        monkeypatch.setattr(CheckpointManager, "save", slow_save)
        monkeypatch.setattr(CheckpointManager, "wait", slow_wait)

    def step(self, ctx: FitContext) -> None:
        self.now += 1.0


def test_time_limit_leaves_room_for_the_commit_and_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = SlowCommits(monkeypatch, commit=10.0)
    history = fit(
        mlp(),
        blobs(),
        epochs=20,
        batch_size=8,
        checkpoint_dir=tmp_path,
        save_every=30,
        time_limit=100,
        callbacks=[OnStep(clock.step)],
        progress=False,
    )
    assert history.stop_reason == "time_limit"
    assert clock.now <= 100  # the last checkpoint is committed before the limit, close() included
    from colabkit.checkpoint import CheckpointManager

    assert CheckpointManager(tmp_path).load()["fit"]["position"]["step"] > 30


class WallAndMonotonic:
    """One fake time for the session clock (datetime) and fit's clock (seconds)."""

    def __init__(self) -> None:
        from datetime import datetime, timezone

        self.base = datetime(2026, 1, 1, tzinfo=timezone.utc)
        self.seconds = 0.0

    def wall(self) -> Any:
        return self.base + timedelta(seconds=self.seconds)

    def on_step_end(self, ctx: FitContext) -> None:
        self.seconds += 30.0


@pytest.mark.parametrize(
    ("left", "warning"), [(timedelta(minutes=31), "under 30 min"), (timedelta(minutes=10.5), "under 10 min")]
)
def test_time_limit_session_warns_before_the_end(
    monkeypatch: pytest.MonkeyPatch, left: timedelta, warning: str
) -> None:
    from colabkit.errors import ColabkitWarning
    from colabkit.testing import fake_colab

    clock = WallAndMonotonic()
    monkeypatch.setattr(loop, "_clock", lambda: clock.seconds)
    start = clock.base - timedelta(hours=12) + left
    with fake_colab(now=clock.wall, session_start=start), pytest.warns(ColabkitWarning, match=warning):
        fit(
            mlp(),
            blobs(),
            epochs=1,
            batch_size=8,
            time_limit="session",
            callbacks=[OnStep(clock.on_step_end)],
            progress=False,
        )


def test_fp16_steps_skipped_by_the_grad_scaler_are_not_errors() -> None:
    model = mlp()
    first = next(model.parameters())
    calls = []

    def overflow_once(grad: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return grad * float("inf") if len(calls) == 1 else grad

    first.register_hook(overflow_once)
    history = fit(model, blobs(), batch_size=8, precision="fp16", progress=False)
    assert history.stop_reason == "completed" and len(calls) == 8
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the overflowing step was skipped


class CountingLoss:
    """A stateful loss: counts its calls (as a loss keeping running statistics would see them)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.nn.functional.cross_entropy(output, target)


class CountingModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.net(x)


def test_a_stateful_loss_is_called_once_per_forward_pass() -> None:
    """The first-batch check of loss_fn uses the real call: no extra call on the first batch."""
    model, loss = CountingModel(), CountingLoss()
    fit(model, blobs(), blobs(32, seed=1), epochs=2, batch_size=8, loss_fn=loss, metrics=(), progress=False)
    assert model.calls == 2 * (8 + 4)  # two epochs of 8 training and 4 validation batches
    assert loss.calls == model.calls
    checked = CountingLoss()
    evaluate(model, blobs(32, seed=1), batch_size=8, loss_fn=checked, progress=False)
    assert checked.calls == 4
