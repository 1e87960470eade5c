from __future__ import annotations

import gc
import logging
import threading
import types
import zipfile
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, ClassVar

import pytest

from colabkit import drive, session
from colabkit.checkpoint import registry
from colabkit.drive import mount_drive
from colabkit.errors import PlatformError
from colabkit.session import (
    HeartbeatLine,
    PathNotFoundError,
    SessionWatch,
    download,
    end_session,
    keepalive,
    session_time_left,
)
from colabkit.testing import fake_colab, fake_kaggle

T0 = datetime(2026, 11, 21, 8, 0, tzinfo=timezone.utc)


def _keepalive_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == session.THREAD_NAME]


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(drive, "_last_mount", drive._MountOptions())
    monkeypatch.setattr(drive, "_modes", {})
    monkeypatch.delenv("COLABKIT_SESSION_HOURS", raising=False)
    yield
    for pending in PendingSave.made:
        registry.forget(pending)
    PendingSave.made.clear()
    running = session._running
    if running is not None:
        running.stop()
    assert _keepalive_threads() == [], "a keepalive thread was left behind"


class PendingSave:
    """Stands in for a CheckpointManager with work in flight: what end_session() waits for."""

    directory = Path("checkpoints")
    made: ClassVar[list[PendingSave]] = []  # the registry holds managers weakly; the test's fixture drops these

    def __init__(self, wait: Any, *, keep: bool = True) -> None:
        self._wait = wait
        registry.register(self)
        if keep:
            PendingSave.made.append(self)

    def wait(self) -> None:
        self._wait()

    def close(self) -> None:
        registry.forget(self)

    def detach_after_fork(self) -> None:
        pass


class Clock:
    """A settable clock."""

    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kwargs: float) -> None:
        self.now += timedelta(**kwargs)


class FakeHandle:
    def __init__(self, display: FakeDisplay) -> None:
        self.display = display

    def update(self, obj: Any) -> None:
        self.display.updates.append(obj)
        if len(self.display.updates) >= self.display.wait_for:
            self.display.enough.set()
        if self.display.fail_updates:
            raise RuntimeError("display broke")


class FakeDisplay:
    """Records what is shown and every in-place update."""

    def __init__(self, wait_for: int = 3) -> None:
        self.shown: list[Any] = []
        self.updates: list[Any] = []
        self.wait_for = wait_for
        self.enough = threading.Event()
        self.fail_updates = False

    def __call__(self, obj: Any) -> FakeHandle:
        self.shown.append(obj)
        return FakeHandle(self)


# -- session clock ----------------------------------------------------------------------------------
def test_session_time_left_on_colab_and_kaggle() -> None:
    with fake_colab(session_start=T0, now=lambda: T0 + timedelta(hours=2)):
        assert session_time_left() == timedelta(hours=10)
        assert session_time_left(now=T0 + timedelta(hours=13)) == timedelta(0)
    with fake_kaggle(tpu=True, session_start=T0, now=lambda: T0 + timedelta(hours=1)):
        assert session_time_left() == timedelta(hours=8)
    with fake_colab(session_start=T0, now=lambda: T0, environ={"COLABKIT_SESSION_HOURS": "24"}):
        assert session_time_left() == timedelta(hours=24)


def test_session_time_left_is_none_off_platform_unless_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    assert session_time_left() is None
    monkeypatch.setenv("COLABKIT_SESSION_HOURS", "2")
    left = session_time_left()
    assert left is not None
    assert timedelta(0) <= left <= timedelta(hours=2)


def test_session_watch_warns_once_per_threshold() -> None:
    clock = Clock(T0)
    deadline = T0 + timedelta(hours=1)
    watch = SessionWatch(deadline=deadline, clock=clock)
    assert watch.check() == []
    clock.now = deadline - timedelta(minutes=29)
    (first,) = watch.check()
    assert "0:29:00" in first
    assert "under 30 min" in first
    assert watch.check() == []
    clock.now = deadline - timedelta(minutes=2)
    (second,) = watch.check()
    assert "under 10 min" in second
    assert watch.check() == []
    assert SessionWatch(deadline=None, clock=clock).check() == []
    with pytest.raises(ValueError, match=r"warn_at=0"):
        SessionWatch([0], deadline=deadline)
    with pytest.raises(ValueError, match=r"warn_at='half an hour'.*warn_at=\(30, 10\)"):
        SessionWatch(["half an hour"], deadline=deadline)


# -- keepalive --------------------------------------------------------------------------------------
def test_heartbeat_updates_one_display_in_place_and_stops() -> None:
    clock = Clock()
    display = FakeDisplay(wait_for=3)
    with fake_colab(session_start=T0, now=clock) as colab:
        with keepalive(0.01, message="training", clock=clock, display=display) as beat:
            threads = _keepalive_threads()
            assert len(threads) == 1
            assert threads[0].daemon
            assert display.enough.wait(10), "the heartbeat never updated the display"
        assert not beat.running
        assert _keepalive_threads() == []
        assert len(display.shown) == 1
        assert all(isinstance(update, HeartbeatLine) for update in display.updates)
        assert "training" in str(display.shown[0])
        assert "session left ~12:00:00" in str(display.updates[0])
        assert str(display.updates[-1]).startswith("colabkit keepalive stopped after")
        # Never JavaScript from the heartbeat (the fake raises if called off the main thread).
        assert colab.calls_to("output.eval_js") == []


def test_stop_is_immediate_even_with_a_long_interval() -> None:
    display = FakeDisplay()
    beat = keepalive(3600, display=display, clock=Clock()).start()
    assert beat.running
    # With a sleep-based loop this join would block for an hour (and hit the test timeout).
    beat.stop()
    assert not beat.running
    assert beat.beats == 0
    beat.stop()  # twice is fine


def test_elapsed_time_and_session_warnings_follow_the_clock(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    display = FakeDisplay()
    deadline = T0 + timedelta(hours=12)
    with fake_colab(session_start=T0, now=clock), keepalive(3600, clock=clock, display=display) as beat:
        clock.advance(minutes=5)
        beat.beat()
        assert "running 0:05:00" in str(display.updates[-1])
        assert "WARNING" not in str(display.updates[-1])
        clock.now = deadline - timedelta(minutes=25)
        with caplog.at_level(logging.WARNING, logger="colabkit"):
            beat.beat()
            beat.beat()
        assert "WARNING: about 0:25:00 of session time left" in str(display.updates[-1])
        assert len([r for r in caplog.records if "session time left" in r.getMessage()]) == 1
        clock.now = deadline - timedelta(minutes=5)
        beat.beat()
        assert "under 10 min" in str(display.updates[-1])


def test_heartbeat_started_near_the_end_warns_at_once() -> None:
    clock = Clock(T0 + timedelta(hours=11, minutes=55))
    display = FakeDisplay()
    with fake_colab(session_start=T0, now=clock), keepalive(3600, clock=clock, display=display):
        assert "WARNING: about 0:05:00 of session time left (under 10 min)" in str(display.shown[0])


def test_only_one_heartbeat_runs_and_a_second_handle_cannot_stop_it() -> None:
    display = FakeDisplay()
    first = keepalive(3600, display=display, clock=Clock())
    with first:
        with keepalive(3600, display=display, clock=Clock()) as second:
            assert second is first
        assert first.running
        assert len(_keepalive_threads()) == 1
        assert len(display.shown) == 1
    assert not first.running


def test_a_restart_does_not_revive_a_thread_stuck_past_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    entered = threading.Event()

    class StuckHandle:
        def update(self, obj: Any) -> None:
            if threading.current_thread().name == session.THREAD_NAME and not release.is_set():
                entered.set()
                release.wait(10)  # a display call that hangs (no browser attached, say)

    monkeypatch.setattr(session, "_JOIN_TIMEOUT", 0.05)
    beat = keepalive(0.01, display=lambda obj: StuckHandle(), clock=Clock()).start()
    assert entered.wait(10)
    (stuck,) = _keepalive_threads()
    beat.stop()  # gives up waiting for the stuck thread
    assert stuck.is_alive()
    beat.start()
    release.set()
    stuck.join(10)
    assert not stuck.is_alive(), "the stuck thread kept beating after stop()"
    assert len(_keepalive_threads()) == 1
    beat.stop()


def test_errors_in_the_thread_are_logged_and_it_keeps_going(caplog: pytest.LogCaptureFixture) -> None:
    display = FakeDisplay(wait_for=3)
    display.fail_updates = True
    with caplog.at_level(logging.ERROR, logger="colabkit"):
        beat = keepalive(0.01, display=display, clock=Clock()).start()
        try:
            assert display.enough.wait(10)
        finally:
            display.fail_updates = False
            beat.stop()
    assert isinstance(beat.last_error, RuntimeError)
    failures = [r for r in caplog.records if "heartbeat failed" in r.getMessage()]
    assert len(failures) >= 2
    assert failures[0].exc_info is not None


def test_terminal_heartbeat_logs_lines(capsys: pytest.CaptureFixture[str]) -> None:
    clock = Clock()
    with keepalive(3600, clock=clock, display=lambda obj: None) as beat:
        clock.advance(seconds=61)
        beat.beat()
    err = capsys.readouterr().err
    assert "colabkit keepalive: running 0:01:01" in err
    assert "stopped after 0:01:01" in err


def test_default_display_outside_a_kernel_falls_back_to_lines(capsys: pytest.CaptureFixture[str]) -> None:
    with keepalive(3600, clock=Clock()) as beat:
        beat.beat()
    assert capsys.readouterr().err.count("colabkit keepalive") == 2


def test_bad_interval() -> None:
    with pytest.raises(ValueError, match=r"interval=0"):
        keepalive(0)


# -- end_session ------------------------------------------------------------------------------------
def test_end_session_on_colab_waits_flushes_and_unassigns(capsys: pytest.CaptureFixture[str]) -> None:
    order: list[str] = []
    with fake_colab() as colab:
        mydrive = mount_drive()
        (mydrive / "final.pt").write_bytes(b"w")
        PendingSave(lambda: order.append("mirror done"))
        beat = keepalive(3600, display=FakeDisplay(), clock=Clock()).start()
        end_session(unassign=True)
        assert not beat.running
        assert order == ["mirror done"]
        assert colab.calls_to("drive.flush_and_unmount")
        assert len(colab.calls_to("drive.mount")) == 1  # not remounted: the runtime is going away
        assert colab.unassigned
        assert (colab.drive_storage / "final.pt").read_bytes() == b"w"
    out = capsys.readouterr().out
    assert "releasing the Colab runtime" in out


def test_end_session_without_unassign_remounts_drive() -> None:
    with fake_colab() as colab:
        mount_drive()
        end_session()
        assert colab.calls_to("drive.flush_and_unmount")
        assert len(colab.calls_to("drive.mount")) == 2
        assert drive.drive_mounted()
        assert not colab.unassigned


def test_end_session_elsewhere_says_what_it_skipped(capsys: pytest.CaptureFixture[str]) -> None:
    called: list[int] = []
    with fake_kaggle():
        PendingSave(lambda: called.append(1))
        end_session(unassign=True)
    assert called == [1]
    out = capsys.readouterr().out
    assert "waited for 1 pending save" in out
    assert "skipped Drive flush (not on Colab" in out
    assert "releasing the runtime (only Colab" in out


def test_end_session_survives_a_failing_waiter_and_skips_unmounted_drive(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken() -> None:
        raise OSError("mirror copy failed")

    later: list[int] = []
    with fake_colab() as colab, caplog.at_level(logging.ERROR, logger="colabkit"):
        PendingSave(broken)
        PendingSave(lambda: later.append(1))
        end_session()
        assert colab.calls_to("drive.flush_and_unmount") == []
    assert later == [1]
    assert any("pending save failed" in r.getMessage() for r in caplog.records)
    out = capsys.readouterr().out
    assert "1 failed" in out
    assert "Drive flush (Drive is not mounted)" in out


def test_end_session_keeps_the_runtime_when_a_save_failed(capsys: pytest.CaptureFixture[str]) -> None:
    def broken() -> None:
        raise OSError("could not copy checkpoint step 9 to Drive")

    with fake_colab() as colab:
        mount_drive()
        PendingSave(broken)
        with pytest.warns(UserWarning, match=r"not releasing the runtime because 1 pending save\(s\) failed"):
            end_session(unassign=True)
        assert not colab.unassigned  # the local copy is the only good one
        assert colab.calls_to("drive.flush_and_unmount")
        assert drive.drive_mounted()  # remounted, since the session goes on
    assert "skipped releasing the runtime (a save failed" in capsys.readouterr().out


def test_end_session_forgets_dropped_and_closed_managers() -> None:
    waited: list[str] = []
    kept = PendingSave(lambda: waited.append("kept"))
    PendingSave(lambda: waited.append("dropped"), keep=False)
    gc.collect()
    PendingSave(lambda: waited.append("closed")).close()
    with fake_kaggle():
        end_session(flush=False)
    assert waited == ["kept"]
    assert kept in registry.live_managers()


def test_unassign_failure_is_a_platform_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse() -> None:
        raise RuntimeError("RuntimeManagementError: 403")

    with fake_colab():
        monkeypatch.setattr(session, "_colab_module", lambda name: types.SimpleNamespace(unassign=refuse))
        with pytest.raises(PlatformError, match=r"Disconnect and delete runtime"):
            end_session(flush=False, unassign=True)


# -- download ---------------------------------------------------------------------------------------
def _results(root: Path) -> Path:
    folder = root / "results"
    (folder / "plots").mkdir(parents=True)
    (folder / "metrics.csv").write_text("a,b\n")
    (folder / "plots" / "loss.txt").write_text("0.1")
    return folder


def test_download_on_colab_file_and_zipped_folder() -> None:
    with fake_colab() as colab:
        model = colab.path("/content/model.pt")
        model.write_bytes(b"m")
        assert download("/content/model.pt") == model
        folder = _results(colab.path("/content"))
        archive = download(folder)
        assert archive.name == "results.zip"
        with zipfile.ZipFile(archive) as z:
            assert sorted(z.namelist()) == ["results/metrics.csv", "results/plots/loss.txt"]
            assert z.read("results/plots/loss.txt") == b"0.1"
        assert [c["filename"] for c in colab.calls_to("files.download")] == [str(model), str(archive)]


def test_download_zips_folders_with_make_archive() -> None:
    # One packer for every zip colabkit makes: JPEGs and checkpoints are stored, not deflated again.
    with fake_colab() as colab:
        folder = colab.path("/content/shots")
        folder.mkdir()
        (folder / "a.jpg").write_bytes(b"\xff\xd8" + bytes(4096))
        (folder / "notes.txt").write_text("x" * 4096)
        archive = download(folder)
        with zipfile.ZipFile(archive) as z:
            methods = {info.filename: info.compress_type for info in z.infolist()}
        assert methods == {"shots/a.jpg": zipfile.ZIP_STORED, "shots/notes.txt": zipfile.ZIP_DEFLATED}


def test_download_from_a_script_on_colab_says_how_to_get_the_file(capsys: pytest.CaptureFixture[str]) -> None:
    # `!python train.py`: no kernel, and Colab's files.download needs get_ipython().kernel.
    with fake_colab(notebook=False) as colab:
        model = colab.path("/content/model.pt")
        model.write_bytes(b"m")
        assert download("/content/model.pt") == model
        assert colab.calls_to("files.download") == []
        out = capsys.readouterr().out
        assert "no notebook kernel" in out and "Files panel" in out and "model.pt" in out
        from google.colab import files

        with pytest.raises(AttributeError, match="kernel"):
            files.download(str(model))  # what colabkit spared the script


def test_end_session_flushes_a_mount_colabkit_did_not_make() -> None:
    with fake_colab() as colab:
        from google.colab import drive as colab_drive

        colab_drive.mount("/content/gdrive")
        end_session()
        assert colab.calls_to("drive.flush_and_unmount")
        assert colab.calls_to("drive.mount")[-1]["mountpoint"] == "/content/gdrive"


def test_download_on_kaggle_copies_into_working(capsys: pytest.CaptureFixture[str]) -> None:
    with fake_kaggle() as kaggle:
        scratch = kaggle.path("/tmp")
        scratch.mkdir(parents=True, exist_ok=True)
        (scratch / "sub.csv").write_text("id,y\n")
        target = download(scratch / "sub.csv")
        assert target == kaggle.path("/kaggle/working/sub.csv")
        assert target.read_text() == "id,y\n"
        archive = download(_results(scratch))
        assert archive == kaggle.path("/kaggle/working/results.zip")
        assert "results/metrics.csv" in zipfile.ZipFile(archive).namelist()
        # Already in the output folder: nothing copied.
        assert download("/kaggle/working/sub.csv") == target
        assert "already in /kaggle/working" in capsys.readouterr().out


def test_download_elsewhere_says_where(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "a.txt").write_text("x")
    assert download(tmp_path / "a.txt") == tmp_path / "a.txt"
    assert str(tmp_path / "a.txt") in capsys.readouterr().out


def test_download_missing_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PathNotFoundError, match=r"no such file or folder") as caught:
        download(tmp_path / "nope.pt")
    assert isinstance(caught.value, FileNotFoundError)
    with fake_colab() as colab, pytest.raises(FileNotFoundError, match=r"model\.pt"):
        download("/content/model.pt")
    assert colab.calls_to("files.download") == []
