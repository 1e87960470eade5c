"""fit() says the warning signs once each, with the fix, and the finish against the session's end.

Each crafted run provokes one sign for real (a flat loss, a memorised tiny
dataset, a dataset that sleeps); a healthy run provokes none.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from colabkit import fit
from colabkit.display import use_screen
from colabkit.testing import FakeScreen, fake_colab
from colabkit.train.fastpath import dataloader_reason
from colabkit.train.history import History


def _blobs(n: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=generator)
    x = torch.randn(n, 8, generator=generator) * 0.5 + (y[:, None] * 2.0 - 1.0)
    return TensorDataset(x, y)


def _mlp(width: int = 32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, width), torch.nn.ReLU(), torch.nn.Linear(width, 2))


def _fit(*args: Any, **kwargs: Any) -> tuple[History, FakeScreen]:
    screen = FakeScreen("log")
    with use_screen(screen):
        history = fit(*args, **{"seed": 0, **kwargs})
    return history, screen


def _hints(history: History, screen: FakeScreen) -> list[str]:
    """Hint names given, after checking each was said exactly once (as a line) with its message."""
    for hint in history.hints:
        assert [line for line in screen.lines if hint["message"] in line] != []
        assert sum(hint["message"] in line for line in screen.lines) == 1
    return [hint["name"] for hint in history.hints]


class _Hooked(torch.nn.Module):
    """A linear model that runs ``before(x)`` first in training (sleeps, allocates...)."""

    def __init__(self, before: Callable[[torch.Tensor], None]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(8, 2)
        self.before = before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.before(x)
        return self.fc(x)


class _Slow(Dataset):  # type: ignore[type-arg]
    """Samples that take 0.1 s (or ``seconds``) each to load, as from a slow disk (sleeping: slow even on a busy
    machine)."""

    def __init__(self, data: TensorDataset, seconds: float = 0.1) -> None:
        self.data = data
        self.seconds = seconds

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Any:
        time.sleep(self.seconds)
        return self.data[index]


def test_healthy_run_gives_no_hint() -> None:
    history, screen = _fit(_mlp(256), _blobs(512, 0), _blobs(256, 1), epochs=4, batch_size=64, lr=0.01)
    assert history["loss"][-1] < history["loss"][0] / 2
    assert _hints(history, screen) == [], history.hints
    assert all(0 <= wait < 0.5 for wait in history["data_wait"])


def test_flat_loss_gives_the_lr_hint_once() -> None:
    model = _mlp()
    history, screen = _fit(
        model, _blobs(256, 0), epochs=5, batch_size=32, optimizer=torch.optim.SGD(model.parameters(), lr=0.0)
    )
    assert _hints(history, screen) == ["lr"]
    assert history.hints[0]["epoch"] == 2 and "lr_find" in history.hints[0]["message"]


def test_memorised_tiny_dataset_gives_the_overfitting_hint_once() -> None:
    generator = torch.Generator().manual_seed(0)
    noise = TensorDataset(torch.randn(48, 8, generator=generator), torch.randint(0, 2, (48,), generator=generator))
    unseen = TensorDataset(torch.randn(256, 8, generator=generator), torch.randint(0, 2, (256,), generator=generator))
    history, screen = _fit(_mlp(512), noise, unseen, epochs=10, batch_size=16, lr=0.01)
    assert history["accuracy"][-1] > 0.9  # memorised: random labels learnt
    assert _hints(history, screen) == ["overfitting"]
    assert "early_stopping" in history.hints[0]["message"]


def test_advice_leaves_out_what_fit_was_told_already() -> None:
    model = _mlp()
    flat = torch.optim.SGD(model.parameters(), lr=0.0)
    history, screen = _fit(model, _blobs(128, 0), epochs=3, batch_size=32, optimizer=flat)
    (message,) = [hint["message"] for hint in history.hints]
    assert "create your optimizer with lr=result.suggestion" in message  # fit(lr=) does not reach it
    generator = torch.Generator().manual_seed(0)
    noise = TensorDataset(torch.randn(48, 8, generator=generator), torch.randint(0, 2, (48,), generator=generator))
    unseen = TensorDataset(torch.randn(256, 8, generator=generator), torch.randint(0, 2, (256,), generator=generator))
    history, screen = _fit(_mlp(512), noise, unseen, epochs=10, batch_size=16, lr=0.01, early_stopping=20)
    assert _hints(history, screen) == ["overfitting"]
    assert (
        history.hints[0]["message"].startswith("overfitting: ") and "early_stopping" not in history.hints[0]["message"]
    )


def test_slow_dataset_gives_the_input_hint_once() -> None:
    history, screen = _fit(_mlp(), _Slow(_blobs(24, 0)), epochs=2, batch_size=4, num_workers=0, lr=0.01)
    assert _hints(history, screen) == ["input"]
    assert history.hints[0]["epoch"] == 0
    assert history["data_wait"][0] > 0.5
    assert "num_workers (now 0)" in history.hints[0]["message"]


class _SlowTensors(TensorDataset):
    """Tensors in memory with a per-sample step that sleeps 0.1 s (a subclass: the DataLoader path)."""

    def __getitem__(self, index: int) -> Any:
        time.sleep(0.1)
        return super().__getitem__(index)


class _SlowRows(torch.Tensor):
    """A tensor whose rows take 0.25 s to gather, as from a memory-mapped file on a slow disk."""

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in (torch.Tensor.index_select, torch.index_select):
            time.sleep(0.25)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


def _input_hints(history: History, screen: FakeScreen) -> list[str]:
    """The input hint's message, if given (said once, as every hint)."""
    names = _hints(history, screen)
    return [hint["message"] for name, hint in zip(names, history.hints, strict=True) if name == "input"]


def test_an_epoch_too_short_to_time_gives_no_input_hint() -> None:
    # The shape: an epoch of 4 batches, most of it spent waiting for data. With so few
    # batches the share is the loader's start and one step's noise, whatever the seconds.
    slow = _Slow(_blobs(16, 0))
    history, screen = _fit(_mlp(), slow, epochs=2, batch_size=4, num_workers=0, lr=0.01, hints=["input"])
    assert history["data_wait"][0] > 0.5  # the sign, in an epoch too short to time
    assert _input_hints(history, screen) == []
    # The issue's own case: 64 tensors on the in-memory fast path, 4 batches of a few ms.
    history, screen = _fit(_mlp(), _blobs(64, 0), epochs=3, batch_size=16, lr=0.01, hints=["input"])
    assert history.hints == []


def test_input_hint_on_tensors_with_a_per_sample_step_says_workers_not_tensordataset() -> None:
    data = _SlowTensors(*_blobs(24, 0).tensors)
    assert dataloader_reason(data, device=torch.device("cpu")) is not None  # the DataLoader path runs
    history, screen = _fit(_mlp(), data, epochs=1, batch_size=4, lr=0.01, hints=["input"])
    (message,) = _input_hints(history, screen)
    assert "num_workers (now 0)" in message and "whole batches" in message
    assert "TensorDataset" not in message  # it is one already


def test_slow_rows_on_the_in_memory_fast_path_give_no_workers_advice() -> None:
    x, y = _blobs(48, 0).tensors
    data = TensorDataset(x.as_subclass(_SlowRows), y)
    assert dataloader_reason(data, device=torch.device("cpu")) is None  # the in-memory fast path runs
    history, screen = _fit(_mlp(), data, epochs=1, batch_size=8, lr=0.01)
    assert history["data_wait"][0] > 0.5 and history["time"][0] > 1.0  # waited, long enough to time
    # Tensors in memory cut by indexing on the CPU: neither workers nor a TensorDataset would help.
    assert _input_hints(history, screen) == []


def test_hints_can_be_silenced() -> None:
    model = _mlp()
    flat = torch.optim.SGD(model.parameters(), lr=0.0)
    history, screen = _fit(model, _Slow(_blobs(16, 0)), epochs=3, batch_size=4, optimizer=flat, hints=False)
    assert history.hints == [] and not any("hint" in line for line in screen.lines)
    history, screen = _fit(model, _Slow(_blobs(16, 0)), epochs=3, batch_size=4, optimizer=flat, hints=["lr"])
    assert _hints(history, screen) == ["lr"]


def test_a_hint_survives_a_resume_and_the_table_starts_with_earlier_epochs(tmp_path: Path) -> None:
    model = _mlp()
    flat = torch.optim.SGD(model.parameters(), lr=0.0)
    history, _ = _fit(model, _blobs(128, 0), epochs=3, batch_size=32, optimizer=flat, checkpoint_dir=tmp_path)
    assert [h["name"] for h in history.hints] == ["lr"]

    screen = FakeScreen("notebook")
    with use_screen(screen):
        model = _mlp()
        resumed = fit(model, _blobs(128, 0), epochs=5, batch_size=32, seed=0, checkpoint_dir=tmp_path,
                      optimizer=torch.optim.SGD(model.parameters(), lr=0.0))  # fmt: skip
    assert resumed.hints == history.hints  # kept from the checkpoint, not said again
    table = screen.outputs[0]
    assert table.versions[0]["text/html"].count("<tr>") == 1 + 3  # header + the three earlier epochs, at once
    assert table.current["text/html"].count("<tr>") == 1 + 5
    assert not any("lr_find" in text for text in table.current.values())


def test_finish_against_a_colab_session_that_ends_too_soon() -> None:
    def sleep(x: torch.Tensor) -> None:
        time.sleep(0.05)  # a slow model: each epoch takes a while

    # The session started 11 h 59 min 59 s ago: one second of Colab's 12 h is left (on the real
    # clock); the run needs at least 3 more epochs of 8 batches of 0.05 s.
    with fake_colab(session_start=datetime.now(timezone.utc) - timedelta(hours=12) + timedelta(seconds=1)):
        history, screen = _fit(_Hooked(sleep), _blobs(64, 0), epochs=4, batch_size=8, lr=0.01, device="cpu")
    said = [line for line in screen.lines if "session ends" in line]
    assert len(said) == 1, screen.lines
    assert "will not finish before the Colab session ends in under a minute" in said[0]
    assert "checkpoint_dir=" in said[0] and "time_limit='session'" in said[0]
    assert screen.lines.index(said[0]) == 1  # right after the first epoch's line
    assert len(history) == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_peak_gpu_memory_is_recorded_and_near_full_gives_the_memory_hint() -> None:
    total = torch.cuda.get_device_properties(0).total_memory

    def allocate(x: torch.Tensor) -> None:
        torch.empty(int(total * 0.93), dtype=torch.uint8, device=x.device)  # a huge activation

    history, screen = _fit(_Hooked(allocate), _blobs(64, 0), epochs=2, batch_size=16, lr=0.01, device="cuda")
    assert history["gpu_total_gb"][0] == pytest.approx(total / 2**30, abs=0.01)
    assert history["peak_gpu_gb"][0] > 0.9 * history["gpu_total_gb"][0]
    assert _hints(history, screen) == ["memory"]
    assert " GPU " in screen.lines[0] and "GB" in screen.lines[0]
