from __future__ import annotations

import dataclasses
import errno
import threading
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from colabkit import _notify, drive
from colabkit.drive import (
    ProjectDirs,
    drive_mounted,
    drive_retry,
    flush_drive,
    is_drive_path,
    mount_drive,
    project_dirs,
)
from colabkit.errors import ArgumentError, ColabkitWarning, DriveError, DriveLostError, PlatformError
from colabkit.testing import fake_colab, fake_kaggle


@pytest.fixture(autouse=True)
def _fresh_drive_state(monkeypatch: pytest.MonkeyPatch) -> None:
    # mount_drive remembers the last mountpoint; each test starts from the default.
    monkeypatch.setattr(drive, "_last_mount", drive._MountOptions())
    monkeypatch.setattr(drive, "_modes", {})
    monkeypatch.setattr(drive, "_loss", drive._LossState())
    monkeypatch.delenv("COLABKIT_DRIVE_DIR", raising=False)
    _notify.reset_once()


# -- off Colab: the stand-in ----------------------------------------------------------------------
def test_stand_in_off_colab_honours_env_and_says_so_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLABKIT_DRIVE_DIR", str(tmp_path / "fake-drive"))
    first = mount_drive()
    second = mount_drive(force_remount=True)
    assert first == second == tmp_path / "fake-drive" / "MyDrive"
    assert first.is_dir()
    out = capsys.readouterr().out
    assert out.count("stand-in") == 1
    assert str(first) in out
    assert not drive_mounted()


def test_stand_in_on_kaggle_lives_in_working_dir(capsys: pytest.CaptureFixture[str]) -> None:
    with fake_kaggle() as kaggle:
        mydrive = mount_drive()
        assert mydrive == kaggle.path("/kaggle/working/colabkit_drive/MyDrive")
        assert mydrive.is_dir()
        assert is_drive_path(mydrive / "x.pt")
        assert "not on Colab (kaggle)" in capsys.readouterr().out


def test_timeout_must_be_positive() -> None:
    with pytest.raises(ArgumentError, match=r"timeout=0"):
        mount_drive(timeout=0)


# -- on Colab ---------------------------------------------------------------------------------------
def test_mount_calls_colab_once_and_returns_mydrive(capsys: pytest.CaptureFixture[str]) -> None:
    with fake_colab() as colab:
        mydrive = mount_drive()
        assert mydrive == colab.path("/content/drive/MyDrive")
        assert mydrive.is_dir()
        assert colab.calls_to("drive.mount") == [
            {"mountpoint": "/content/drive", "force_remount": False, "timeout_ms": 120000, "readonly": False}
        ]
        assert drive_mounted()
        # Already mounted: a no-op, Colab is not asked again.
        assert mount_drive() == mydrive
        assert len(colab.calls_to("drive.mount")) == 1
        assert "Mounted at /content/drive" in capsys.readouterr().out


def test_force_remount_and_readonly_are_passed() -> None:
    with fake_colab() as colab:
        mount_drive()
        mount_drive(force_remount=True, timeout=5, readonly=True)
        last = colab.calls_to("drive.mount")[-1]
        assert last == {"mountpoint": "/content/drive", "force_remount": True, "timeout_ms": 5000, "readonly": True}


def test_files_written_before_mounting_are_refused_before_colab_is_called() -> None:
    with fake_colab() as colab:
        stray = colab.path("/content/drive/model.pt")
        stray.parent.mkdir(parents=True)
        stray.write_bytes(b"weights")
        with pytest.raises(ArgumentError, match=r"already holds files that are not Google Drive .*model\.pt"):
            mount_drive()
        assert colab.calls_to("drive.mount") == []
        assert stray.read_bytes() == b"weights"


def test_mountpoint_that_is_a_file_or_has_a_space_is_refused() -> None:
    with fake_colab() as colab:
        colab.path("/content/gdrive").write_text("x")
        with pytest.raises(ArgumentError, match=r"is a file or a symlink"):
            mount_drive("/content/gdrive")
        with pytest.raises(ArgumentError, match=r"space"):
            mount_drive("/content/my drive")
        with pytest.raises(ArgumentError, match=r"absolute path"):
            mount_drive("drive")
        assert colab.calls_to("drive.mount") == []


def test_local_mydrive_folder_is_not_mistaken_for_a_mount_when_the_mount_table_disagrees(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The data-loss trap: code ran makedirs("/content/drive/MyDrive/...") before mounting,
    # and Colab's own check would call that "already mounted". The mount table knows better.
    monkeypatch.setattr(drive, "_mount_table", lambda: "drive /mnt/elsewhere fuse.drive rw 0 0\n")
    with fake_colab() as colab:
        (colab.path("/content/drive/MyDrive/ckpt")).mkdir(parents=True)
        with pytest.raises(ArgumentError, match=r"already holds files"):
            mount_drive()
        assert colab.calls_to("drive.mount") == []


def test_mount_table_entry_means_mounted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(drive, "_mount_table", lambda: "drive /content/drive fuse.drive rw 0 0\n")
    with fake_colab() as colab:
        colab.path("/content/drive/MyDrive").mkdir(parents=True)
        assert mount_drive() == colab.path("/content/drive/MyDrive")
        assert colab.calls_to("drive.mount") == []


def test_colab_enterprise_is_a_platform_error() -> None:
    with fake_colab(enterprise=True) as colab:
        with pytest.raises(PlatformError, match=r"Colab Enterprise"):
            mount_drive()
        assert colab.calls_to("drive.mount") == []


def _module_with_mount(mount: object) -> types.ModuleType:
    return types.SimpleNamespace(mount=mount, flush_and_unmount=lambda: None)  # type: ignore[return-value]


def test_only_arguments_the_installed_colab_accepts_are_passed(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, object]] = []

    def old_mount(mountpoint: str, force_remount: bool = False, timeout_ms: int = 120000) -> None:
        seen.append({"mountpoint": mountpoint, "force_remount": force_remount, "timeout_ms": timeout_ms})
        Path(colab.path(mountpoint), "MyDrive").mkdir(parents=True)

    with fake_colab() as colab:
        monkeypatch.setattr(drive, "_colab_drive", lambda: _module_with_mount(old_mount))
        with pytest.raises(PlatformError, match=r"no read-only mode"):
            mount_drive(readonly=True)
        assert seen == []
        assert mount_drive(timeout=7) == colab.path("/content/drive/MyDrive")
        assert seen == [{"mountpoint": "/content/drive", "force_remount": False, "timeout_ms": 7000}]


def test_mount_failures_become_drive_errors_with_the_fix() -> None:
    class MessageError(Exception):
        pass

    with fake_colab() as colab:
        colab.mount_error = ValueError("mount failed: timeout during initial read of root folder")
        with pytest.raises(DriveError, match=r"sub-folders"):
            mount_drive()
        colab.mount_error = MessageError("Error: credential propagation was unsuccessful")
        with pytest.raises(DriveError, match=r"accept the pop-up"):
            mount_drive()
        colab.mount_error = ValueError("mount failed")
        with pytest.raises(DriveError, match=r"failed: mount failed; run mount_drive\(\) again") as caught:
            mount_drive()
        assert isinstance(caught.value, OSError)
        assert not drive_mounted()


# -- flush ------------------------------------------------------------------------------------------
def test_flush_pushes_writes_and_remounts_with_the_same_options() -> None:
    with fake_colab() as colab:
        mydrive = mount_drive("/content/gdrive", readonly=False, timeout=30)
        (mydrive / "results.csv").write_text("epoch,loss\n1,0.5\n")
        again = flush_drive()
        assert again == mydrive
        assert colab.calls_to("drive.flush_and_unmount")
        remount = colab.calls_to("drive.mount")[-1]
        assert remount["mountpoint"] == "/content/gdrive"
        assert remount["timeout_ms"] == 30000
        assert (again / "results.csv").read_text() == "epoch,loss\n1,0.5\n"


def test_flush_without_remount_leaves_drive_unmounted_with_data_in_the_cloud() -> None:
    with fake_colab() as colab:
        mydrive = mount_drive()
        (mydrive / "a.txt").write_text("kept")
        assert flush_drive(remount=False) is None
        assert not drive_mounted()
        assert (colab.drive_storage / "a.txt").read_text() == "kept"
        assert len(colab.calls_to("drive.mount")) == 1


def test_flush_when_not_mounted_or_off_colab_is_a_noop_with_a_notice(capsys: pytest.CaptureFixture[str]) -> None:
    with fake_colab() as colab:
        assert flush_drive() is None
        assert colab.calls_to("drive.flush_and_unmount") == []
        assert "nothing to flush" in capsys.readouterr().out
    with fake_kaggle():
        assert flush_drive() is None
        assert "not on Colab (kaggle)" in capsys.readouterr().out


def test_failed_flush_is_a_drive_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_flush(timeout_ms: int = 0) -> None:
        raise ValueError("flush_and_unmount failed")

    with fake_colab():
        mount_drive()
        real = drive._colab_drive()
        broken = types.SimpleNamespace(mount=real.mount, flush_and_unmount=failing_flush)
        monkeypatch.setattr(drive, "_colab_drive", lambda: broken)
        with pytest.raises(DriveError, match=r"only in the local cache"):
            flush_drive()


# -- retry ------------------------------------------------------------------------------------------
def _flaky(path: Path, failures: list[int]) -> object:
    """A read of ``path`` that first fails with the given errnos."""
    pending = list(failures)

    def read() -> bytes:
        if pending:
            code = pending.pop(0)
            raise OSError(code, f"simulated {errno.errorcode[code]}")
        return path.read_bytes()

    return read


def test_drive_retry_retries_eio_with_backoff(tmp_path: Path) -> None:
    data = tmp_path / "x.bin"
    data.write_bytes(b"payload")
    sleeps: list[float] = []
    read = _flaky(data, [errno.EIO, errno.EIO])
    assert drive_retry(read, sleep=sleeps.append) == b"payload"  # type: ignore[arg-type]
    assert sleeps == [0.5, 1.0]


def test_drive_retry_gives_up_and_raises_the_last_error(tmp_path: Path) -> None:
    read = _flaky(tmp_path / "x", [errno.EIO] * 5)
    with pytest.raises(OSError, match=r"simulated EIO") as caught:
        drive_retry(read, retries=2, sleep=lambda _: None)  # type: ignore[arg-type]
    assert caught.value.errno == errno.EIO


def test_drive_retry_does_not_retry_real_errors(tmp_path: Path) -> None:
    sleeps: list[float] = []
    with pytest.raises(FileNotFoundError):
        drive_retry((tmp_path / "missing").read_bytes, sleep=sleeps.append)
    assert sleeps == []
    with pytest.raises(ArgumentError, match=r"retries=-1"):
        drive_retry(lambda: None, retries=-1)


def test_errno_107_force_remounts_drive_before_retrying() -> None:
    with fake_colab() as colab:
        mydrive = mount_drive()
        (mydrive / "shard.bin").write_bytes(b"abc")
        read = _flaky(mydrive / "shard.bin", [errno.ENOTCONN])
        assert drive_retry(read, sleep=lambda _: None) == b"abc"  # type: ignore[arg-type]
        mounts = colab.calls_to("drive.mount")
        assert len(mounts) == 2
        assert mounts[-1]["force_remount"] is True


def _in_threads(work: Callable[[], bytes], count: int) -> tuple[list[threading.Thread], list[Any], list[Any]]:
    results: list[Any] = []
    errors: list[Any] = []

    def run() -> None:
        try:
            results.append(work())
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=run, name=f"copier-{i}") for i in range(count)]
    for thread in threads:
        thread.start()
    return threads, results, errors


def _all_done(threads: list[threading.Thread]) -> Callable[[float], bool]:
    def done(timeout: float) -> bool:
        for thread in threads:
            thread.join(timeout)
        return not any(thread.is_alive() for thread in threads)

    return done


def test_threads_failing_with_107_wait_for_one_remount_on_the_main_thread() -> None:
    # DriveFS dies: every copier thread fails at the same moment. None of them may remount
    # (Colab's authorisation request is not thread safe); the main thread remounts once for all.
    workers = 8
    with fake_colab() as colab:
        mydrive = mount_drive()
        (mydrive / "shard.bin").write_bytes(b"abc")
        barrier = threading.Barrier(workers)
        failed: set[int] = set()

        def read() -> bytes:
            me = threading.get_ident()
            if me not in failed:
                failed.add(me)
                barrier.wait(timeout=30)  # all attempts are in flight before any fails
                raise OSError(errno.ENOTCONN, "Transport endpoint is not connected")
            return (mydrive / "shard.bin").read_bytes()

        threads, results, errors = _in_threads(lambda: drive_retry(read, sleep=lambda _: None), workers)
        drive.wait_recovering(_all_done(threads))
        assert errors == []
        assert results == [b"abc"] * workers
        mounts = colab.calls_to("drive.mount")
        assert [call["force_remount"] for call in mounts] == [False, True]
        assert not drive.drive_lost()
        # A later, separate outage remounts again: no cooldown swallows it.
        assert drive_retry(_flaky(mydrive / "shard.bin", [errno.ENOTCONN]), sleep=lambda _: None) == b"abc"  # type: ignore[arg-type]
        assert [call["force_remount"] for call in colab.calls_to("drive.mount")] == [False, True, True]


def test_a_worker_never_remounts_and_gives_up_with_the_fix_when_no_remount_comes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with fake_colab() as colab:
        mydrive = mount_drive()
        (mydrive / "x.bin").write_bytes(b"x")
        colab.kill_drive()
        read = _flaky(mydrive / "x.bin", [errno.ENOTCONN])
        threads, results, errors = _in_threads(
            lambda: drive_retry(read, sleep=lambda _: None, lost_wait=0.3),
            1,  # type: ignore[arg-type]
        )
        threads[0].join(30)
        assert results == [] and len(errors) == 1
        assert isinstance(errors[0], DriveLostError) and errors[0].errno == errno.ENOTCONN
        assert len(colab.calls_to("drive.mount")) == 1  # the worker did not mount
        assert drive.drive_lost()
        out = capsys.readouterr().out
        assert "colabkit.mount_drive('/content/drive', force_remount=True) in a cell" in out
        # The main thread's next touch remounts, once.
        assert drive.recover_if_lost() is True
        assert drive.recover_if_lost() is False
        assert [call["force_remount"] for call in colab.calls_to("drive.mount")] == [False, True]
        assert (mydrive / "x.bin").read_bytes() == b"x"


def test_a_failed_main_thread_remount_is_tried_once_and_names_the_fix() -> None:
    with fake_colab() as colab:
        mount_drive()
        colab.kill_drive()
        read = _flaky(colab.path("/content/drive/MyDrive/x"), [errno.ENOTCONN] * 9)
        threads, _, _ = _in_threads(lambda: drive_retry(read, lost_wait=0.2, sleep=lambda _: None), 1)  # type: ignore[arg-type]
        threads[0].join(30)
        assert drive.drive_lost()
        colab.mount_error = ValueError("mount failed")
        with pytest.warns(ColabkitWarning, match=r"remounting it failed .*colabkit\.mount_drive\('/content/drive'"):
            assert drive.recover_if_lost() is False
        assert drive.recover_if_lost() is False  # no second pop-up for the same loss
        assert len(colab.calls_to("drive.mount")) == 2
        # A worker that loses Drive now gives up at once: no remount is coming.
        threads, _, errors = _in_threads(lambda: drive_retry(read, lost_wait=60, sleep=lambda _: None), 1)  # type: ignore[arg-type]
        threads[0].join(20)
        assert not threads[0].is_alive()
        assert isinstance(errors[0], DriveLostError) and "remounting it on the main thread failed" in str(errors[0])
        colab.mount_error = None
        assert mount_drive(force_remount=True).is_dir()  # the named fix works, and ends the loss
        assert not drive.drive_lost()


def test_mount_drive_refuses_a_background_thread_before_asking_colab() -> None:
    with fake_colab() as colab:
        threads, _, errors = _in_threads(lambda: mount_drive(), 1)  # type: ignore[arg-type, return-value]
        threads[0].join(30)
        assert isinstance(errors[0], PlatformError) and "main thread" in str(errors[0])
        assert colab.calls_to("drive.mount") == []


def test_a_dead_fake_mount_answers_errno_107_and_the_main_thread_remounts_it() -> None:
    from colabkit import _io

    with fake_colab() as colab:
        mydrive = mount_drive()
        colab.kill_drive()
        assert [m.alive for m in drive.drive_mounts()] == [False]
        with pytest.raises(OSError) as caught:
            _io.atomic_write_bytes(mydrive / "a.bin", b"a")
        assert caught.value.errno == errno.ENOTCONN
        drive_retry(lambda: _io.atomic_write_bytes(mydrive / "a.bin", b"a"), sleep=lambda _: None)
        assert (mydrive / "a.bin").read_bytes() == b"a"
        assert [call["force_remount"] for call in colab.calls_to("drive.mount")] == [False, True]


def test_errno_107_off_colab_just_retries(tmp_path: Path) -> None:
    with fake_kaggle() as kaggle:
        target = kaggle.path("/kaggle/working/x")
        target.write_bytes(b"k")
        assert drive_retry(_flaky(target, [errno.ENOTCONN]), sleep=lambda _: None) == b"k"  # type: ignore[arg-type]


# -- paths ------------------------------------------------------------------------------------------
def test_is_drive_path(monkeypatch: pytest.MonkeyPatch) -> None:
    with fake_colab() as colab:
        assert is_drive_path("/content/drive/MyDrive/ckpt/last.pt")
        assert is_drive_path(colab.path("/content/drive/MyDrive/x"))
        assert is_drive_path(colab.path("/content/drive"))
        assert not is_drive_path("/content/data/train")
        assert not is_drive_path(colab.path("/content/drive-other/x"))
        monkeypatch.setattr(drive, "_mount_table", lambda: "drive /mnt/my\\040drive fuse.drive rw 0 0\n")
        assert is_drive_path("/mnt/my drive/sub/file")
        assert not is_drive_path("/mnt/other")


def test_project_dirs_on_colab_mounts_and_creates_the_folders() -> None:
    with fake_colab() as colab:
        dirs = project_dirs("cifar")
        base = colab.path("/content/drive/MyDrive/cifar")
        assert dirs == ProjectDirs(base, base / "models", base / "checkpoints", base / "results", base / "data")
        assert all(p.is_dir() for p in (dirs.models, dirs.checkpoints, dirs.results, dirs.data))
        assert colab.calls_to("drive.mount")
        with pytest.raises(dataclasses.FrozenInstanceError):
            dirs.root = Path("/")  # type: ignore[misc]
        # Idempotent.
        assert project_dirs("cifar") == dirs


def test_project_dirs_with_root_and_bad_names(tmp_path: Path) -> None:
    dirs = project_dirs("run1", root=tmp_path)
    assert dirs.checkpoints == tmp_path / "run1" / "checkpoints"
    assert dirs.checkpoints.is_dir()
    for bad in ("", "a/b", "..", " "):
        with pytest.raises(ArgumentError, match=r"single folder name"):
            project_dirs(bad, root=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run1"]


# -- read-only, flush of every mount, causes, ~ and timeouts (issue 11) ---------------------------
def test_readonly_on_a_read_write_mount_remounts_and_back() -> None:
    # DriveFS fixes read-only when it starts: returning the read-write mount would let writes through.
    with fake_colab() as colab:
        mount_drive()
        mount_drive(readonly=True)
        mount_drive(readonly=True)  # now it is read-only: nothing to do
        mount_drive()  # and back: a read-only mount would fail later with EROFS
        calls = [(c["force_remount"], c["readonly"]) for c in colab.calls_to("drive.mount")]
        assert calls == [(False, False), (True, True), (True, False)]


def test_readonly_on_a_mount_of_unknown_mode_remounts() -> None:
    with fake_colab() as colab:
        from google.colab import drive as colab_drive

        colab_drive.mount("/content/drive")  # the user's own mount: colabkit cannot know its mode
        mount_drive()  # Colab's default is read-write: taken as it is
        assert len(colab.calls_to("drive.mount")) == 1
        mount_drive(readonly=True)
        assert colab.calls_to("drive.mount")[-1]["readonly"] is True


def test_flush_covers_a_mount_colabkit_did_not_make(capsys: pytest.CaptureFixture[str]) -> None:
    with fake_colab() as colab:
        from google.colab import drive as colab_drive

        colab_drive.mount("/content/gdrive")
        (colab.path("/content/gdrive/MyDrive") / "run.log").write_text("epoch 1")
        again = flush_drive()
        assert colab.calls_to("drive.flush_and_unmount")
        assert colab.calls_to("drive.mount")[-1]["mountpoint"] == "/content/gdrive"  # remounted where it was
        assert again == colab.path("/content/gdrive/MyDrive")
        assert (again / "run.log").read_text() == "epoch 1"
        assert "nothing to flush" not in capsys.readouterr().out


def test_a_second_mountpoint_leaves_the_first_dead_and_flush_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    with fake_colab() as colab:
        mount_drive()
        from google.colab import drive as colab_drive

        colab_drive.mount("/content/gdrive")
        mounts = {m.mountpoint: m.alive for m in drive.drive_mounts()}
        assert mounts == {"/content/drive": False, "/content/gdrive": True}
        assert not drive_mounted()
        assert is_drive_path("/content/gdrive/MyDrive/x")
        flush_drive()
        out = capsys.readouterr().out
        assert "/content/drive were not connected (errno 107" in out
        assert colab.calls_to("drive.mount")[-1]["mountpoint"] == "/content/gdrive"


def test_workspace_policy_is_told_apart_from_a_retryable_failure() -> None:
    with fake_colab() as colab:
        colab.mount_error = ValueError(
            "The domain policy has disabled Drive File Stream: https://support.google.com/a/answer/7496409"
        )
        with pytest.raises(DriveError, match=r"another \(e\.g\. personal\) Google account") as caught:
            mount_drive()
        assert "run mount_drive() again" not in str(caught.value)
        assert caught.value.errno == errno.EACCES


def test_hung_drivefs_is_a_timeout_drive_error() -> None:
    for name in ("TIMEOUT", "EOF"):
        hung = type(name, (Exception,), {"__module__": "pexpect.exceptions"})
        with fake_colab() as colab:
            colab.mount_error = hung("Timeout exceeded.")
            with pytest.raises(DriveError, match=rf"did not answer within 40 s \(pexpect {name}") as caught:
                mount_drive(timeout=10)
            assert caught.value.errno == errno.ETIMEDOUT


def test_missing_credentials_address_has_its_own_message() -> None:
    with fake_colab() as colab:
        del colab.environ["TBE_EPHEM_CREDS_ADDR"]
        with pytest.raises(PlatformError, match=r"TBE_EPHEM_CREDS_ADDR .*credentials service"):
            mount_drive()
        # Colab reads it before asking for authorisation, as the fake does.
        assert colab.calls_to("message.blocking_request") == []


@pytest.mark.parametrize(
    ("error", "expected", "match"),
    [
        (OSError(errno.ENOENT, "No such file or directory: '/opt/google/drive/drive'"), DriveError, r"/opt/google"),
        (
            __import__("subprocess").CalledProcessError(1, ["/bin/mount"]),
            DriveError,
            r"listing the mounts \(\['/bin/mount'\]\) exited with status 1",
        ),
        (ValueError("flush_and_unmount failed"), DriveError, r"only in the local cache"),
    ],
)
def test_flush_failures_are_translated(error: BaseException, expected: type, match: str) -> None:
    with fake_colab() as colab:
        mount_drive()
        colab.flush_error = error
        with pytest.raises(expected, match=match):
            flush_drive()


def test_flush_without_colabs_variables_is_a_platform_error() -> None:
    with fake_colab() as colab:
        mount_drive()
        del colab.environ["CLOUDSDK_CONFIG"]
        with pytest.raises(PlatformError, match=r"CLOUDSDK_CONFIG"):
            flush_drive()


def test_tilde_is_expanded_like_colab_does() -> None:
    with fake_colab() as colab:
        mydrive = mount_drive("~/gdrive")
        home = colab.environ["HOME"]
        assert mydrive == Path(home) / "gdrive" / "MyDrive"
        assert colab.calls_to("drive.mount")[0]["mountpoint"] == f"{home}/gdrive"


def test_a_timeout_under_one_second_never_means_no_timeout() -> None:
    # Colab truncates timeout_ms to whole seconds for its authorisation request, and 0 there
    # means "wait forever".
    with fake_colab() as colab:
        mount_drive(timeout=0.5)
        (auth,) = colab.calls_to("message.blocking_request")
        assert auth["request_type"] == "request_auth" and auth["timeout_sec"] == 1


def test_colab_local_runtime_image_uses_the_stand_in(capsys: pytest.CaptureFixture[str]) -> None:
    with fake_colab(hosted=False) as colab:
        rt = drive.runtime()
        assert rt.kind == "jupyter"
        mydrive = mount_drive()
        assert mydrive == rt.drive_mountpoint / "MyDrive" and mydrive.is_dir()
        assert colab.calls_to("drive.mount") == []
        assert "a Colab image outside hosted Colab" in capsys.readouterr().out
        from google.colab import drive as colab_drive

        with pytest.raises(NotImplementedError, match="unsupported in this environment"):
            colab_drive.mount("/content/drive")  # what colabkit spared the notebook


def test_mount_drive_in_a_script_on_colab_says_to_mount_in_the_notebook() -> None:
    with fake_colab(notebook=False) as colab:
        with pytest.raises(PlatformError, match=r"no notebook kernel .*Mount Drive in a notebook cell first"):
            mount_drive()
        assert colab.calls_to("drive.mount") == []
