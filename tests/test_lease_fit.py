"""One writer per checkpoint folder, with real processes; rotation that leaves no bytes in a trash;
a deleted Drive folder starts over; a folder that cannot take checkpoints fails before training."""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from colabkit import _io
from colabkit.checkpoint import CheckpointListing, CheckpointManager, load_checkpoint
from colabkit.checkpoint.lease import LEASE_NAME, STALE_PERIODS, Holder, read_holder
from colabkit.errors import CheckpointError, CheckpointInUseError, ColabkitWarning, InsufficientSpaceError
from colabkit.train.loop import fit

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lease_worker import data, model
from test_lease import Children, read_line
from witness import StepLog

WORKER = Path(__file__).with_name("lease_worker.py")


def train(folder: Path, steps: StepLog, *, epochs: int = 1, net: torch.nn.Module | None = None, **options: Any) -> None:
    """fit() the tiny run on ``folder``, on the CPU and quietly; ``steps`` records what it trained."""
    fit(
        net or model(), data(), epochs=epochs, batch_size=4, checkpoint_dir=folder, device="cpu", progress=False,
        callbacks=[steps], **options,
    )  # fmt: skip


@pytest.fixture
def worker(subprocess_env: dict[str, str]) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    children = Children(subprocess_env)
    yield lambda *args: children.start(str(WORKER), *args)
    children.close()


def wait_progress(proc: subprocess.Popen[str]) -> None:
    while True:
        line = read_line(proc)
        if not line:
            raise AssertionError(f"the child ended before making progress: {proc.communicate()[1][-2000:]}")
        if line.strip() == "progress":
            return


def test_two_processes_one_folder_the_second_is_refused(
    tmp_path: Path, worker: Callable[..., subprocess.Popen[str]]
) -> None:
    folder, gate = tmp_path / "ckpt", tmp_path / "gate"
    first = worker(str(folder), "--gate", str(gate))
    wait_progress(first)  # first epoch trained and checkpointed; the run waits, lease held
    before = sorted(p.name for p in folder.iterdir())
    second = worker(str(folder))
    out, err = second.communicate(timeout=300)
    assert second.returncode == 3, err
    assert f"pid {first.pid}" in err and "takeover=True" in err and "another checkpoint folder" in err
    assert "trained steps 0-0" in out  # refused before training a single step
    assert sorted(p.name for p in folder.iterdir()) == before  # and changed nothing
    gate.touch()
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert "trained steps 1-12" in out
    latest = load_checkpoint(folder)  # reading needs no lease
    assert latest["fit"]["position"]["step"] == 12
    assert not (folder / LEASE_NAME).exists()  # released at the end


def test_reading_needs_no_lease(tmp_path: Path, worker: Callable[..., subprocess.Popen[str]]) -> None:
    from colabkit import evaluate, load_for_inference

    folder, gate = tmp_path / "ckpt", tmp_path / "gate"
    first = worker(str(folder), "--gate", str(gate))
    wait_progress(first)
    net = load_for_inference(folder, model(), device="cpu", monitor=None)
    assert "loss" in evaluate(net, data(), device="cpu", progress=False)
    gate.touch()
    first.communicate(timeout=300)
    assert first.returncode == 0


READER = textwrap.dedent(
    """
    import sys
    from colabkit.checkpoint import CheckpointManager

    manager = CheckpointManager(sys.argv[1])  # opened once, held for the whole process

    def newest():
        latest = manager.latest()
        return -1 if latest is None else manager.load(latest)["fit"]["position"]["step"]

    print("read", newest(), flush=True)
    for line in sys.stdin:  # each line asks for another read
        if line.strip() == "quit":
            break
        print("read", newest(), flush=True)
    manager.close()
    print("closed", flush=True)
    """
)


class Reader:
    """A process that holds a CheckpointManager of a folder open and reads its newest step on demand."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", READER, str(folder)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        self.first = self._answer()

    def _answer(self) -> int:
        line = read_line(self.proc, timeout=120)
        assert line.startswith("read "), (line, self.proc.stderr.read() if not line else "")
        return int(line.split()[1])

    def newest(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.write("again\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        out, err = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0 and "closed" in out, err


@pytest.fixture
def reader(subprocess_env: dict[str, str]) -> Iterator[Callable[[Path], Reader]]:
    readers: list[Reader] = []

    def start(folder: Path) -> Reader:
        readers.append(Reader(folder, subprocess_env))
        return readers[-1]

    yield start
    for one in readers:
        if one.proc.poll() is None:
            one.proc.kill()
        one.proc.communicate()


def holder_pid(folder: Path) -> int | None:
    found, _problem = read_holder(folder)
    return None if found is None else found.pid


def test_readers_opened_before_during_and_after_a_writer_never_block_it(
    tmp_path: Path, worker: Callable[..., subprocess.Popen[str]], reader: Callable[[Path], Reader]
) -> None:
    from colabkit import load_for_inference

    folder, gate = tmp_path / "ckpt", tmp_path / "gate"
    # Before: a reader process and a manager in this process, both open on the empty folder.
    before = reader(folder)
    here = CheckpointManager(folder)
    assert before.first == -1 and here.latest() is None and here.restore(model()) == {}
    assert holder_pid(folder) is None  # opening and reading took no lease
    writer = worker(str(folder), "--gate", str(gate))
    wait_progress(writer)  # not refused: the first epoch is trained and saved, the lease held
    assert holder_pid(folder) == writer.pid

    # During: every way of reading, from readers opened before and now, in other processes and this one.
    during = reader(folder)
    assert during.first == before.newest() == 4
    assert [info.step for info in here.checkpoints()] == [4]
    net = model()
    assert here.restore(net)["fit"]["position"]["step"] == 4
    assert here.load()["fit"]["position"]["step"] == 4
    assert load_checkpoint(folder)["fit"]["position"]["step"] == 4
    load_for_inference(folder, model(), device="cpu", monitor=None)
    with CheckpointManager(folder) as closed_at_once:
        assert closed_at_once.latest() is not None
    assert holder_pid(folder) == writer.pid  # no reader took, broke or released the writer's lease

    gate.touch()
    out, err = writer.communicate(timeout=300)
    assert writer.returncode == 0, err
    assert "trained steps 1-12" in out  # the whole run, never refused or stopped
    assert not (folder / LEASE_NAME).exists()  # the writer released it; no reader left one

    # After: the readers see the end, and a rerun with more epochs writes again while they stay open.
    after = reader(folder)
    assert after.first == before.newest() == during.newest() == here.load()["fit"]["position"]["step"] == 12
    rerun = worker(str(folder), "--epochs", "4")
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert "trained steps 13-16" in out  # resumed, not refused
    assert before.newest() == after.newest() == 16
    for one in (before, during, after):
        one.close()
    here.close()
    assert not (folder / LEASE_NAME).exists()


def test_a_writer_killed_while_a_reader_holds_a_manager_does_not_block_the_next_writer(
    tmp_path: Path, worker: Callable[..., subprocess.Popen[str]], reader: Callable[[Path], Reader]
) -> None:
    folder, gate = tmp_path / "ckpt", tmp_path / "gate"
    writer = worker(str(folder), "--gate", str(gate))
    wait_progress(writer)
    watcher = reader(folder)  # a notebook cell watching the run, in its own process
    here = CheckpointManager(folder)
    assert watcher.first == here.load()["fit"]["position"]["step"] == 4
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=60)
    assert holder_pid(folder) == writer.pid  # the kill left the dead writer's lease behind
    # The readers read on after the kill, and keep their managers open.
    assert watcher.newest() == 4 and here.latest() is not None
    assert holder_pid(folder) == writer.pid  # reading neither took nor cleared it
    nxt = worker(str(folder))
    out, err = nxt.communicate(timeout=300)
    assert nxt.returncode == 0, err
    assert "its process is gone" in out  # the dead writer's lease taken over at once
    assert "trained steps 5-12" in out  # resumed after the killed run's checkpoint
    assert watcher.newest() == here.load()["fit"]["position"]["step"] == 12
    watcher.close()
    here.close()
    assert not (folder / LEASE_NAME).exists()


def test_a_sigkilled_holder_is_taken_over_at_once_by_a_rerun(
    tmp_path: Path, worker: Callable[..., subprocess.Popen[str]]
) -> None:
    folder, gate = tmp_path / "ckpt", tmp_path / "gate"
    first = worker(str(folder), "--gate", str(gate))
    wait_progress(first)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    assert (folder / LEASE_NAME).exists()  # the kill left the lease behind
    rerun = worker(str(folder))
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert "its process is gone" in out
    assert "trained steps 5-12" in out  # resumed after the first epoch, not refused, not restarted


def write_lease(folder: Path, *, host: str, age: float, period: float = 60.0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    renewed = time.time() - age
    holder = Holder("0123456789ab", host, "another-machine", 4242, "", "train.py", renewed - 100, renewed, period)
    (folder / LEASE_NAME).write_bytes(holder.to_bytes())


def test_another_hosts_stale_heartbeat_is_taken_over_and_a_fresh_one_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "ckpt"
    write_lease(folder, host="other-runtime", age=10)
    steps = StepLog()
    with pytest.raises(CheckpointInUseError, match="other-runtime"):
        train(folder, steps)
    assert steps.steps == []
    assert not list(folder.glob("step-*"))
    write_lease(folder, host="other-runtime", age=STALE_PERIODS * 60 + 30)
    train(folder, steps)
    assert steps.span == (1, 4)
    assert "heartbeat is older than" in capsys.readouterr().out


def test_takeover_passes_through_fit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "ckpt"
    write_lease(folder, host="other-runtime", age=1)
    steps = StepLog()
    train(folder, steps, takeover=True)
    assert steps.span == (1, 4)
    assert "takeover=True" in capsys.readouterr().out
    assert not (folder / LEASE_NAME).exists()  # released at the end


def test_a_manager_holds_the_lease_until_closed_and_stops_saving_once_taken_over(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    write_lease(folder, host="other-runtime", age=1)
    refused = CheckpointManager(folder)  # reading needs no lease...
    assert refused.latest() is None
    with pytest.raises(CheckpointInUseError, match="other-runtime"):
        refused.save(tiny(0), step=0)  # ...writing does
    refused.close()
    first = CheckpointManager(folder, takeover=True)
    first.save(tiny(1), step=1, blocking=True)
    assert Holder.from_bytes((folder / LEASE_NAME).read_bytes()).pid == os.getpid()
    # The same cell run again: a second manager on the folder takes over from the first at its first save.
    second = CheckpointManager(folder)
    assert second.latest() is not None
    first.save(tiny(2), step=2, blocking=True)  # a second manager that only read took nothing
    second.save(tiny(3), step=3, blocking=True)
    with pytest.raises(CheckpointInUseError, match="taken over"):
        first.save(tiny(4), step=4)
    first.close()
    assert (folder / LEASE_NAME).exists()  # the first does not remove the second's lease
    second.close()
    assert not (folder / LEASE_NAME).exists()
    assert sorted(info.step for info in CheckpointListing(folder).checkpoints()) == [2, 3]


def tiny(step: int) -> dict[str, object]:
    return {"model_state_dict": {"w": torch.full((50_000,), float(step))}, "epoch": step}


def test_rotation_empties_files_before_deleting_them(tmp_path: Path) -> None:
    # A hard link stands in for Drive's trash, which keeps a deleted file's bytes for 30 days.
    local, mirror, trash = tmp_path / "local", tmp_path / "mirror", tmp_path / "trash"
    trash.mkdir()
    with CheckpointManager(local, keep_last=1, mirror=mirror) as ckpt:
        ckpt.save(tiny(1), step=1, blocking=True)
        ckpt.wait()
        (old_local,) = local.glob("step-*.pt")
        (old_mirror,) = mirror.glob("step-*.pt")
        os.link(old_local, trash / "local.pt")
        os.link(old_mirror, trash / "mirror.pt")
        assert (trash / "local.pt").stat().st_size > 200_000
        ckpt.save(tiny(2), step=2, blocking=True)
        ckpt.wait()
        assert not old_local.exists() and not old_mirror.exists()
    assert (trash / "local.pt").stat().st_size == 0
    assert (trash / "mirror.pt").stat().st_size == 0


def test_temporary_leftovers_are_emptied_before_cleanup(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    tmp_path.joinpath("ckpt").mkdir()
    leftover = tmp_path / "ckpt" / f".step-000000001-00000000.pt{_io.TEMP_MARK}{pid}-deadbeef"
    leftover.write_bytes(b"x" * 10_000)
    os.link(leftover, tmp_path / "trash")
    with CheckpointManager(tmp_path / "ckpt") as ckpt:
        ckpt.acquire()  # the writer's start cleans up
    assert not leftover.exists()
    assert (tmp_path / "trash").stat().st_size == 0


def test_deleting_the_drive_folder_between_two_fits_starts_over(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from colabkit import mount_drive
    from colabkit.testing import fake_colab

    with fake_colab(root=tmp_path) as colab:
        mount_drive()
        target = colab.path("/content/drive/MyDrive/run1/checkpoints")
        first = StepLog()
        train(target, first)
        assert first.span == (1, 4)
        assert list(target.glob("step-*.json"))  # the Drive copy completed
        shutil.rmtree(target)  # the user deletes the folder on Drive: "start over"
        second = StepLog()
        train(target, second)
        assert second.span == (1, 4)  # started over, did not resume the local staged copy
        assert "no longer on Drive" in capsys.readouterr().out
        # And a plain rerun now resumes as usual (nothing left to train: finished).
        third = StepLog()
        train(target, third)
        assert third.steps == []


def test_a_drive_that_is_not_mounted_proves_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from colabkit.testing import fake_colab

    with fake_colab(root=tmp_path) as colab:  # Colab, but Drive not mounted now
        target = colab.path("/content/drive/MyDrive/run1/checkpoints")
        first = StepLog()
        train(target, first)
        shutil.rmtree(target)  # what an unmounted Drive looks like
        second = StepLog()
        train(target, second, epochs=2)
        assert second.span == (5, 8)  # the local staged copy resumed
        assert "no longer on Drive" not in capsys.readouterr().out


def test_a_local_checkpoint_whose_drive_copy_never_completed_is_resumed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from colabkit import mount_drive
    from colabkit.checkpoint import mirror as mirror_module
    from colabkit.testing import fake_colab

    with fake_colab(root=tmp_path) as colab:
        mount_drive()
        target = colab.path("/content/drive/MyDrive/run1/checkpoints")

        def broken_copy(*args: object, **kwargs: object) -> int:
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(mirror_module._io, "copy_file", broken_copy)
        first = StepLog()
        with pytest.raises(CheckpointError), pytest.warns(ColabkitWarning, match="could not copy"):
            train(target, first, epochs=1)
        monkeypatch.undo()
        assert not list(target.glob("step-*.json"))  # never reached Drive
        second = StepLog()
        train(target, second, epochs=2)
        assert second.span == (5, 8)  # the local copy was the only good state: resumed


# --------------------------------------------------------------------------- bad checkpoint folders


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """A real, small filesystem (tmpfs) mounted inside tmp_path; skipped where mounting is not allowed."""
    mounted: list[Path] = []

    def mount(size: str, name: str = "disk") -> Path:
        point = tmp_path / name
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def test_a_checkpoint_dir_that_is_a_file_fails_before_training(tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    path.write_text("my notes")
    steps = StepLog()
    with pytest.raises(CheckpointError, match="is a file, not a folder"):
        train(path, steps)
    assert steps.steps == []
    assert path.read_text() == "my notes"


def test_a_read_only_checkpoint_dir_fails_before_training_and_keeps_the_last_checkpoint(
    tmp_path: Path, small_disk: Callable[..., Path]
) -> None:
    disk = small_disk("8m")
    folder = disk / "ckpt"
    train(folder, StepLog())
    good = load_checkpoint(folder)["fit"]["position"]["step"]
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    steps = StepLog()
    with pytest.raises(CheckpointError, match="writable"):
        train(folder, steps, epochs=2)
    assert steps.steps == []
    subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
    assert load_checkpoint(folder)["fit"]["position"]["step"] == good
    # Writable again, the rerun goes on from that checkpoint.
    train(folder, steps, epochs=2)
    assert steps.first == good + 1


def test_a_full_disk_fails_before_training_with_numbers_that_add_up(
    tmp_path: Path, small_disk: Callable[..., Path]
) -> None:
    disk = small_disk("2m")
    big = torch.nn.Sequential(torch.nn.Linear(5, 200_000), torch.nn.Linear(200_000, 2))  # ~6.4 MB of weights
    steps = StepLog()
    with pytest.raises(InsufficientSpaceError) as info:
        train(disk / "ckpt", steps, net=big)
    assert steps.steps == []
    message = str(info.value)
    # "needs N plus M kept free as a safety margin, N+M in all, but ... has F free": it adds up.
    needed, margin, total, free = (int(n) for n in re.findall(r"\((\d+) bytes\)", message))
    assert needed + margin == total > free, message
    assert "safety margin" in message
    assert margin <= 2 * 1024 * 1024 // 20  # sized to this 2 MB disk, not a fixed 64 MB
    assert not list((disk / "ckpt").glob("step-*"))


def test_a_manager_dropped_without_close_lets_go_of_the_folder(tmp_path: Path) -> None:
    import gc

    CheckpointManager(tmp_path).save(tiny(1), step=1, blocking=True)
    assert not (tmp_path / LEASE_NAME).exists()  # at once: nothing keeps the dropped manager alive
    CheckpointManager(tmp_path, mirror=tmp_path / "mirror").save(tiny(2), step=2, blocking=True)
    gc.collect()
    assert not (tmp_path / LEASE_NAME).exists()
    CheckpointManager(tmp_path).close()  # and nobody is refused
