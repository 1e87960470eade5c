"""The shipped fakes: real signatures, real behaviour, clean exit."""

from __future__ import annotations

import inspect
import sys
import threading
from pathlib import Path

import pytest

import colabkit
from colabkit.errors import ArgumentError
from colabkit.testing import GPUS, fake_colab, fake_kaggle


def test_signatures_match_google_colab() -> None:
    with fake_colab():
        from google.colab import drive, files, output
        from google.colab import runtime as colab_runtime

        mount = {name: p.default for name, p in inspect.signature(drive.mount).parameters.items()}
        assert mount == {
            "mountpoint": inspect.Parameter.empty,
            "force_remount": False,
            "timeout_ms": 120000,
            "readonly": False,
        }
        assert list(inspect.signature(drive.flush_and_unmount).parameters) == ["timeout_ms"]
        assert inspect.signature(drive.flush_and_unmount).parameters["timeout_ms"].default == 24 * 60 * 60 * 1000
        assert list(inspect.signature(files.download).parameters) == ["filename"]
        assert inspect.signature(files.upload).parameters["target_dir"].default == ""
        params = inspect.signature(output.eval_js).parameters
        assert list(params) == ["script", "ignore_result", "timeout_sec"]
        assert params["ignore_result"].default is False and params["timeout_sec"].default is None
        assert list(inspect.signature(colab_runtime.unassign).parameters) == []


def test_fake_colab_reports_colab_and_cleans_up() -> None:
    before = set(sys.modules)
    with fake_colab(gpu="T4", gpu_count=1) as colab:
        rt = colabkit.runtime()
        assert rt.kind == "colab" and rt.gpu_names == ("Tesla T4",)
        assert rt.data_dir == colab.root / "content" / "data"
        assert "google.colab" in sys.modules
        root = colab.root
        assert root.is_dir()
    assert "google.colab" not in sys.modules
    assert not {m for m in set(sys.modules) - before if m.startswith("google.colab")}
    assert not root.exists()
    assert colabkit.runtime().kind != "colab"


def test_mount_creates_mydrive_and_is_idempotent(capsys: pytest.CaptureFixture[str]) -> None:
    with fake_colab() as colab:
        from google.colab import drive

        drive.mount("/content/drive")
        mydrive = colab.path("/content/drive") / "MyDrive"
        assert mydrive.is_dir()
        assert "Mounted at /content/drive" in capsys.readouterr().out
        (mydrive / "keep.txt").write_text("data")
        drive.mount("/content/drive")
        assert "already mounted" in capsys.readouterr().out
        assert len(colab.calls_to("drive.mount")) == 2
        drive.flush_and_unmount()
        assert not mydrive.exists()
        assert not any(colab.path("/content/drive").iterdir())  # empty after unmount, as on Colab
        drive.mount("/content/drive", force_remount=True)
        assert (mydrive / "keep.txt").read_text() == "data"  # Drive keeps files across mounts


def test_mount_refuses_like_colab() -> None:
    with fake_colab() as colab:
        from google.colab import drive

        with pytest.raises(ValueError, match="space"):
            drive.mount("/content/my drive")
        busy = colab.path("/content/busy")
        busy.mkdir()
        (busy / "file").write_text("x")
        with pytest.raises(ValueError, match="must not already contain files"):
            drive.mount("/content/busy")
        colab.mount_error = ValueError("mount failed")
        with pytest.raises(ValueError, match="mount failed"):
            drive.mount("/content/drive")
    with fake_colab(enterprise=True):
        from google.colab import drive

        with pytest.raises(NotImplementedError, match="Colab Enterprise"):
            drive.mount("/content/drive")


def test_flush_when_not_mounted(capsys: pytest.CaptureFixture[str]) -> None:
    with fake_colab():
        from google.colab import drive

        drive.flush_and_unmount()
        assert "nothing to flush" in capsys.readouterr().out


def test_files_output_runtime(tmp_path: Path) -> None:
    with fake_colab() as colab:
        from google.colab import files, output
        from google.colab import runtime as colab_runtime

        with pytest.raises(FileNotFoundError, match="Cannot find file"):
            files.download(str(tmp_path / "missing.txt"))
        (tmp_path / "a.txt").write_text("x")
        files.download(str(tmp_path / "a.txt"))
        assert colab.calls_to("files.download")[-1] == {"filename": str(tmp_path / "a.txt")}

        colab.uploads = {"up.csv": b"1,2"}
        assert files.upload(target_dir=str(tmp_path)) == {str(tmp_path / "up.csv"): b"1,2"}
        assert (tmp_path / "up.csv").read_bytes() == b"1,2"

        colab.js_result = 42
        assert output.eval_js("1+1") == 42
        errors: list[BaseException] = []

        def from_thread() -> None:
            try:
                output.eval_js("1")
            except RuntimeError as exc:
                errors.append(exc)

        thread = threading.Thread(target=from_thread)
        thread.start()
        thread.join()
        assert errors and "background thread" in str(errors[0])

        colab_runtime.unassign()
        assert colab.unassigned


def test_upload_creates_target_dir_keys_by_path_and_renames_like_colab(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    with fake_colab() as colab:
        from google.colab import files

        colab.uploads = {"data.csv": b"new", "b.txt": b"b"}
        (tmp_path / "in").mkdir()
        (tmp_path / "in" / "data.csv").write_bytes(b"old")
        saved = files.upload("in")
        assert saved == {"in/data (1).csv": b"new", "in/b.txt": b"b"}
        assert (tmp_path / "in" / "data.csv").read_bytes() == b"old"  # never overwritten
        assert (tmp_path / "in" / "data (1).csv").read_bytes() == b"new"
        assert "Saving data.csv to in/data (1).csv" in capsys.readouterr().out
        colab.uploads = {"x.bin": b"x"}
        assert files.upload("made/here") == {"made/here/x.bin": b"x"}  # target_dir is created
        assert (tmp_path / "made" / "here" / "x.bin").read_bytes() == b"x"


def test_upload_file_and_view_like_colab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with fake_colab() as colab:
        from google.colab import files

        with pytest.raises(ValueError, match="File has not been uploaded"):
            files.upload_file("one.bin")
        colab.uploads = {"a": b"1", "b": b"2"}
        with pytest.raises(ValueError, match="Multiple files received"):
            files.upload_file("one.bin")
        colab.uploads = {"picked.bin": b"1"}
        assert files.upload_file("one.bin") is None
        assert (tmp_path / "one.bin").read_bytes() == b"1"
        files.view("one.bin")
        assert colab.calls_to("files.view") == [{"filepath": "one.bin"}]
        with pytest.raises(FileNotFoundError, match="Cannot find file"):
            files.view("missing")


def test_error_classes_like_colab() -> None:
    from colabkit.testing import MessageError

    with fake_colab():
        from google.colab import _message, errors

        assert not issubclass(errors.WidgetException, errors.Error)
        assert issubclass(errors.WidgetException, Exception)
        assert issubclass(errors.AuthorizationError, errors.Error)
        assert _message.MessageError is MessageError and issubclass(MessageError, errors.Error)


def test_a_refused_authorisation_with_message_error() -> None:
    from colabkit.errors import DriveError
    from colabkit.testing import MessageError

    with fake_colab() as colab:
        colab.auth_error = MessageError("Error: credential propagation was unsuccessful")
        with pytest.raises(DriveError, match="accept the pop-up"):
            colabkit.mount_drive()
        assert colab.mounted_at is None


def test_mount_checks_in_colabs_order() -> None:
    with fake_colab(hosted=False) as colab:
        from google.colab import drive

        with pytest.raises(NotImplementedError, match="unsupported in this environment"):
            drive.mount("/content/my drive")  # /var/colab/hostname first, then the space
    with fake_colab(enterprise=True):
        from google.colab import drive

        with pytest.raises(ValueError, match="space"):
            drive.mount("/content/my drive")  # the space before Colab Enterprise
    with fake_colab() as colab:
        from google.colab import drive

        from colabkit.testing import MessageError

        del colab.environ["TBE_EPHEM_CREDS_ADDR"]
        colab.auth_error = MessageError("refused")
        with pytest.raises(KeyError, match="TBE_EPHEM_CREDS_ADDR"):
            drive.mount("/content/drive")  # the credentials address before the authorisation request
        assert colab.calls_to("message.blocking_request") == []


def test_a_second_mountpoint_kills_the_first_and_mounts_refuse_threads() -> None:
    from colabkit import _io

    with fake_colab() as colab:
        from google.colab import drive

        drive.mount("/content/drive")
        (colab.path("/content/drive/MyDrive") / "kept.txt").write_text("k")
        drive.mount("/content/gdrive")
        assert colab.is_dead("/content/drive/MyDrive/kept.txt")
        assert "/content/drive fuse.drive" in colab.mount_table()  # dead, but still in the table
        with pytest.raises(OSError) as caught:
            _io.atomic_write_bytes(colab.path("/content/drive/MyDrive/new.txt"), b"n")
        assert caught.value.errno == 107
        assert (colab.path("/content/gdrive/MyDrive") / "kept.txt").read_text() == "k"
        drive.mount("/content/drive", force_remount=True)  # and back
        assert not colab.is_dead("/content/drive")
        errors: list[BaseException] = []

        def from_thread() -> None:
            try:
                drive.mount("/content/drive", force_remount=True)
            except RuntimeError as exc:
                errors.append(exc)

        asked = len(colab.calls_to("message.blocking_request"))
        thread = threading.Thread(target=from_thread)
        thread.start()
        thread.join()
        assert errors and "drive.mount called from a background thread" in str(errors[0])
        assert len(colab.calls_to("message.blocking_request")) == asked  # refused before asking the browser


def test_fake_kaggle_tpu_looks_like_the_tpu_image() -> None:
    with fake_kaggle(tpu=True) as kaggle:
        rt = colabkit.runtime()
        assert (rt.kind, rt.accelerator) == ("kaggle", "tpu")
        assert kaggle.environ["ISTPUVM"] == "1" and kaggle.environ["TPU_PROCESS_ADDRESSES"] == "local"
        assert "COLAB_RELEASE_TAG" not in kaggle.environ  # built FROM python:3.12, not Colab's image
        assert "TPU_ACCELERATOR_TYPE" not in kaggle.environ
        with pytest.raises(ImportError):
            import google.colab  # noqa: F401
    with fake_kaggle():
        from google.colab import drive  # Kaggle's GPU image is Colab's: importable, but no Drive

        with pytest.raises(NotImplementedError):
            drive.mount("/content/drive")


def test_fake_kaggle() -> None:
    with fake_kaggle(gpu="T4", gpu_count=2, run_type="Batch") as kaggle:
        rt = colabkit.runtime()
        assert rt.kind == "kaggle"
        assert rt.gpu_count == 2
        assert kaggle.environ["COLAB_RELEASE_TAG"]  # like the real image
        assert rt.work_dir == kaggle.root / "kaggle" / "working"
        assert rt.work_dir.is_dir()
    with fake_kaggle(tpu=True):
        assert colabkit.runtime().session_limit is not None
        assert colabkit.runtime().session_limit.total_seconds() == 9 * 3600  # type: ignore[union-attr]


def test_unknown_gpu_name() -> None:
    with pytest.raises(ArgumentError, match="T4"), fake_colab(gpu="GTX 9000"):
        pass
    assert "T4" in GPUS


def test_given_root_is_kept(tmp_path: Path) -> None:
    with fake_colab(tmp_path / "root") as colab:
        assert colab.root == (tmp_path / "root").resolve()
    assert (tmp_path / "root" / "content").is_dir()


def test_fake_colab_keeps_the_real_google_namespace() -> None:
    pytest.importorskip("google.protobuf")
    saved = {name: mod for name, mod in sys.modules.items() if name == "google" or name.startswith("google.")}
    for name in saved:
        del sys.modules[name]
    try:
        with fake_colab():
            import google.protobuf  # noqa: F401 - must stay importable beside the fake google.colab
            from google.colab import drive  # noqa: F401
    finally:
        for name in [n for n in sys.modules if n == "google" or n.startswith("google.")]:
            del sys.modules[name]
        sys.modules.update(saved)


def test_an_ops_wrapper_put_back_after_the_fake_is_transparent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from colabkit import _io

    with fake_colab():
        wrapper = _io.ops
    # What a monkeypatch made inside the fake does when it is undone after the fake: put the wrapper back.
    monkeypatch.setattr(_io, "ops", wrapper)

    def boom(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(_io.ops, "fsync", boom)  # what test_io does: patch the instance
    with pytest.raises(OSError, match="Input/output"):
        _io.atomic_write_bytes(tmp_path / "x", b"x")
