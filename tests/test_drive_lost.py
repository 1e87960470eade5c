"""Drive lost (errno 107) in background work: one remount, on the main thread, and nothing lost.

Colab's ``drive.mount`` asks the browser for authorisation through a channel that is
not thread safe, so the checkpoint mirror and stage()'s copy pool must never
remount; the main thread does, once, at its next Drive touch.
"""

from __future__ import annotations

import errno
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import TensorDataset

from colabkit import _io, drive
from colabkit.checkpoint import CheckpointManager
from colabkit.testing import FakePlatform, fake_colab
from colabkit.train.callbacks import Callback, FitContext
from colabkit.train.loop import fit


@pytest.fixture(autouse=True)
def _fresh_drive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(drive, "_last_mount", drive._MountOptions())
    monkeypatch.setattr(drive, "_modes", {})
    monkeypatch.setattr(drive, "_loss", drive._LossState())


class DriveDiesInACopy:
    """colabkit's file operations, where DriveFS dies the first time a background thread opens a file
    in ``folder`` (for writing, or with ``when="r"`` for reading)."""

    def __init__(self, inner: Any, colab: FakePlatform, folder: Path, when: str = "w") -> None:
        self.inner, self.colab, self.folder, self.when = inner, colab, str(folder), when
        self.fired_in: str | None = None

    def open(self, path: Any, mode: str) -> Any:
        background = threading.current_thread() is not threading.main_thread()
        if self.fired_in is None and background and self.when in mode and str(path).startswith(self.folder):
            self.fired_in = threading.current_thread().name
            self.colab.kill_drive()
            raise OSError(errno.ENOTCONN, "Transport endpoint is not connected", str(path))
        return self.inner.open(path, mode)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture
def colab(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[FakePlatform, list[tuple[bool, str]]]]:
    """A fake Colab whose drive.mount records (force_remount, thread name) of every call."""
    with fake_colab() as platform:
        from google.colab import drive as colab_drive

        real_mount = colab_drive.mount
        mounts: list[tuple[bool, str]] = []

        def mount(
            mountpoint: str, force_remount: bool = False, timeout_ms: int = 120000, readonly: bool = False
        ) -> None:
            mounts.append((force_remount, threading.current_thread().name))
            real_mount(mountpoint, force_remount, timeout_ms, readonly)

        monkeypatch.setattr(colab_drive, "mount", mount)
        yield platform, mounts


def _steps(folder: Path) -> list[int]:
    return sorted(json.loads(p.read_text())["step"] for p in folder.glob("step-*.json"))


class WaitForTheLoss(Callback):
    """At step ``at``, waits until the copy thread has hit errno 107 and marked Drive lost (or it was
    remounted already); remembers the last finished step."""

    def __init__(self, at: int, dies: DriveDiesInACopy, mounts: list[tuple[bool, str]]) -> None:
        self.at, self.dies, self.mounts, self.step = at, dies, mounts, 0

    def on_step_end(self, ctx: FitContext) -> None:
        self.step = ctx.step
        if ctx.step == self.at:
            deadline = time.monotonic() + 60  # waits for progress; a loaded machine only makes it slower
            while not self._seen() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert self._seen(), "the checkpoint copy never hit errno 107"

    def _seen(self) -> bool:
        return self.dies.fired_in is not None and (drive.drive_lost() or len(self.mounts) > 1)


def test_errno_107_in_a_checkpoint_copy_during_fit_remounts_once_on_the_main_thread(
    colab: tuple[FakePlatform, list[tuple[bool, str]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    platform, mounts = colab
    run = drive.mount_drive() / "run"
    dies = DriveDiesInACopy(_io.ops, platform, run)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=generator)
    data = TensorDataset(x, (x[:, 0] > 0).long())
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    # Checkpoints at steps 4, 8, 12, 16 (8 steps an epoch); the first copy (step 4) loses Drive.
    waiter = WaitForTheLoss(5, dies, mounts)
    remounted_after: list[int] = []
    real_mount = drive.mount_drive

    def mount_drive(*args: Any, **kwargs: Any) -> Path:
        remounted_after.append(waiter.step)
        return real_mount(*args, **kwargs)

    with monkeypatch.context() as patch:  # undone while the fake still runs
        patch.setattr(_io, "ops", dies)
        patch.setattr(drive, "mount_drive", mount_drive)
        history = fit(
            model,
            data,
            epochs=2,
            batch_size=8,
            save_every=4,
            keep_last=50,
            checkpoint_dir=run,
            callbacks=[waiter],
            device="cpu",
            progress=False,
            seed=0,
        )

    assert history.stop_reason == "completed" and len(history) == 2
    assert dies.fired_in is not None and dies.fired_in != threading.main_thread().name  # 107 hit a copy thread
    # The first mount, then exactly one remount, made on the main thread...
    assert mounts == [(False, "MainThread"), (True, "MainThread")]
    # ...at the first step boundary after the loss (step 5's or 6's: the copy thread may be quick or
    # slow to reach Drive), not at the next save (step 8) or the end of fit.
    assert remounted_after in ([4], [5])
    assert not drive.drive_lost()
    # Every checkpoint is on Drive too, verified by its manifest.
    with CheckpointManager(run) as manager:
        local = _steps(manager.local_dir)
    assert local == [4, 8, 12, 16]
    assert _steps(run) == local
    assert (run / "history.csv").is_file()


def test_a_copy_after_fit_returned_is_parked_with_the_fix_and_copied_at_the_next_wait(
    colab: tuple[FakePlatform, list[tuple[bool, str]]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Nothing on the main thread will come: the copy must not fail the save, and must not hang.
    platform, mounts = colab
    run = drive.mount_drive() / "run"
    monkeypatch.setattr(drive, "LOST_WAIT", 0.3)
    dies = DriveDiesInACopy(_io.ops, platform, run)
    with monkeypatch.context() as patch:  # undone while the fake still runs
        patch.setattr(_io, "ops", dies)
        manager = CheckpointManager(run)
        manager.save({"epoch": 1, "w": torch.ones(3)}, step=1, blocking=True)
        manager._mirror.lane.join()  # the background copy gives up (no main thread serves it)
        assert dies.fired_in is not None
        assert mounts == [(False, "MainThread")]  # the copy thread did not mount
        out = capsys.readouterr().out
        assert "colabkit.mount_drive('/content/drive', force_remount=True)" in out
        assert "checkpoint step 1 is not yet on" in out and "intact" in out
        assert _steps(manager.local_dir) == [1]  # the save itself stands
        manager.close()  # a main-thread touch: remounts once, then copies the parked checkpoint
    assert mounts == [(False, "MainThread"), (True, "MainThread")]
    assert _steps(run) == [1]


def test_stage_copy_pool_waits_for_the_main_thread_remount(
    colab: tuple[FakePlatform, list[tuple[bool, str]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from colabkit.data import sources

    platform, mounts = colab
    monkeypatch.setattr(drive, "LOST_WAIT", 10.0)  # without the main thread's help the copies would give up
    folder = drive.mount_drive() / "images"
    folder.mkdir()
    for index in range(16):
        (folder / f"{index}.txt").write_text(str(index))
    out = platform.path("/content/data/images")
    out.mkdir(parents=True)
    dies = DriveDiesInACopy(_io.ops, platform, folder, when="r")
    with monkeypatch.context() as patch:  # undone while the fake still runs
        patch.setattr(_io, "ops", dies)
        files, _ = sources.copy_tree(folder, out, workers=4, progress=False)
    assert files == 16 and dies.fired_in is not None and dies.fired_in != "MainThread"
    assert sorted(p.read_text() for p in out.iterdir()) == sorted(str(i) for i in range(16))
    assert mounts == [(False, "MainThread"), (True, "MainThread")]


def test_fit_writes_history_into_a_drive_folder_that_its_mirror_has_not_made_yet() -> None:
    # history.csv is written at the epoch's end, before that epoch's checkpoint is copied
    # (the copy is what creates the folder on Drive).
    with fake_colab():
        run = drive.mount_drive() / "new-run"
        x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
        fit(
            torch.nn.Linear(4, 2),
            TensorDataset(x, (x[:, 0] > 0).long()),
            checkpoint_dir=run,
            device="cpu",
            progress=False,
        )
        assert (run / "history.csv").read_text().startswith("epoch,")
