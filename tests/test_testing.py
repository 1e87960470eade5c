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
        assert files.upload(target_dir=str(tmp_path)) == {"up.csv": b"1,2"}
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
