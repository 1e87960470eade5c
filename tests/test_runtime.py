"""Runtime detection through injected probes: each platform, in the order that matters."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from colabkit.errors import ArgumentError, ColabkitError
from colabkit.runtime import GpuInfo, Probe, Runtime, runtime, use_probe

T4 = GpuInfo("Tesla T4", 15 * 1024**3, (7, 5))
START = datetime(2026, 11, 21, 8, 0, tzinfo=timezone.utc)


class ColabShell:
    pass


ColabShell.__module__ = "google.colab._shell"


class ZMQInteractiveShell:
    pass


ZMQInteractiveShell.__module__ = "ipykernel.zmqshell"


def probe(tmp_path: Path, env: dict[str, str] | None = None, *, files: tuple[str, ...] = (), **kw: object) -> Probe:
    for name in files:
        target = tmp_path / name.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.touch()
    defaults: dict[str, object] = {
        "environ": {"HOME": str(tmp_path / "home"), **(env or {})},
        "ipython": lambda: None,
        "gpus": lambda: (),
        "mps": lambda: False,
        "session_start": lambda: START,
        "now": lambda: START + timedelta(hours=1),
        "root": tmp_path,
    }
    defaults.update(kw)
    return Probe(**defaults)  # type: ignore[arg-type]


def test_plain_script(tmp_path: Path) -> None:
    rt = runtime(probe=probe(tmp_path))
    assert rt.kind == "script"
    assert rt.accelerator == "cpu"
    assert rt.session_limit is None and rt.session_start is None
    assert rt.data_dir == tmp_path / "home" / ".cache" / "colabkit" / "data"
    assert not rt.in_notebook


def test_jupyter_from_shell_class(tmp_path: Path) -> None:
    rt = runtime(probe=probe(tmp_path, ipython=ZMQInteractiveShell))
    assert rt.kind == "jupyter"
    assert rt.in_notebook


def test_colab_from_hostname_marker(tmp_path: Path) -> None:
    rt = runtime(probe=probe(tmp_path, files=("/var/colab/hostname",), gpus=lambda: (T4,)))
    assert rt.kind == "colab"
    assert rt.accelerator == "cuda"
    assert rt.gpu_names == ("Tesla T4",)
    assert rt.gpu_capability == ((7, 5),)
    assert rt.gpu_count == 1
    assert rt.data_dir == tmp_path / "content" / "data"
    assert rt.work_dir == tmp_path / "content"
    assert rt.drive_mountpoint == tmp_path / "content" / "drive"
    assert rt.session_limit == timedelta(hours=12)
    assert rt.session_deadline == START + timedelta(hours=12)


def test_colab_image_without_hosted_colab_is_jupyter_or_script(tmp_path: Path) -> None:
    # Colab's local-runtime image (and Kaggle's image on one's own machine) has Colab's kernel and
    # COLAB_RELEASE_TAG but not /var/colab/hostname, which drive.mount requires: no hosted Drive there.
    tag = {"COLAB_RELEASE_TAG": "release-colab_1"}
    local = runtime(probe=probe(tmp_path, tag, ipython=ColabShell))
    assert local.kind == "jupyter" and local.in_notebook
    assert local.drive_mountpoint == Path.cwd() / "colabkit_drive"
    assert runtime(probe=probe(tmp_path, tag)).kind == "script"
    kaggle_image = {"COLAB_RELEASE_TAG": "release-colab-external-images_1"}
    assert runtime(probe=probe(tmp_path, kaggle_image, ipython=ZMQInteractiveShell)).kind == "jupyter"
    hosted = runtime(probe=probe(tmp_path, tag, files=("/var/colab/hostname",), ipython=ColabShell))
    assert hosted.kind == "colab"


def test_kaggle_is_checked_before_colab(tmp_path: Path) -> None:
    # Kaggle's image is built on Colab's: it sets COLAB_RELEASE_TAG too.
    env = {"KAGGLE_KERNEL_RUN_TYPE": "Interactive", "COLAB_RELEASE_TAG": "release-colab-external-images_1"}
    rt = runtime(probe=probe(tmp_path, env, ipython=ZMQInteractiveShell))
    assert rt.kind == "kaggle"
    assert rt.data_dir == tmp_path / "kaggle" / "temp"
    assert rt.data_dir.is_dir()  # created if missing
    assert rt.work_dir == tmp_path / "kaggle" / "working"
    assert rt.session_limit == timedelta(hours=12)


def test_kaggle_tpu_vm_image_says_tpu_and_nine_hours(tmp_path: Path) -> None:
    # Kaggle's TPU image (tpu/Dockerfile: FROM python:3.12, ENV ISTPUVM=1, TPU_PROCESS_ADDRESSES=local):
    # no COLAB_RELEASE_TAG, no GPU.
    env = {
        "KAGGLE_KERNEL_RUN_TYPE": "Interactive",
        "KAGGLE_URL_BASE": "https://www.kaggle.com",
        "ISTPUVM": "1",
        "TPU_PROCESS_ADDRESSES": "local",
    }
    rt = runtime(probe=probe(tmp_path, env, ipython=ZMQInteractiveShell))
    assert (rt.kind, rt.accelerator) == ("kaggle", "tpu")
    assert rt.session_limit == timedelta(hours=9)
    for only in ("ISTPUVM", "TPU_PROCESS_ADDRESSES"):
        alone = {k: v for k, v in env.items() if k not in {"ISTPUVM", "TPU_PROCESS_ADDRESSES"} - {only}}
        assert runtime(probe=probe(tmp_path, alone)).accelerator == "tpu"


def test_kaggle_tpu_has_nine_hours(tmp_path: Path) -> None:
    env = {"KAGGLE_KERNEL_RUN_TYPE": "Batch", "TPU_ACCELERATOR_TYPE": "v3-8"}
    rt = runtime(probe=probe(tmp_path, env))
    assert rt.accelerator == "tpu"
    assert rt.session_limit == timedelta(hours=9)


def test_kaggle_scratch_falls_back_to_tmp(tmp_path: Path) -> None:
    (tmp_path / "kaggle").mkdir()
    (tmp_path / "kaggle" / "temp").write_text("a file where the folder should be")
    rt = runtime(probe=probe(tmp_path, {"KAGGLE_URL_BASE": "https://www.kaggle.com"}))
    assert rt.data_dir == tmp_path / "tmp"


def test_colab_enterprise(tmp_path: Path) -> None:
    rt = runtime(probe=probe(tmp_path, {"VERTEX_PRODUCT": "COLAB_ENTERPRISE"}))
    assert rt.kind == "colab"
    assert rt.enterprise


def test_session_hours_override(tmp_path: Path) -> None:
    rt = runtime(probe=probe(tmp_path, {"COLABKIT_SESSION_HOURS": "24"}, files=("/var/colab/hostname",)))
    assert rt.session_limit == timedelta(hours=24)
    # Off Colab and Kaggle a limit appears only when asked for.
    rt = runtime(probe=probe(tmp_path, {"COLABKIT_SESSION_HOURS": "1.5"}))
    assert rt.session_limit == timedelta(hours=1.5)
    assert rt.session_start == START


@pytest.mark.parametrize("value", ["soon", "-3", "0"])
def test_bad_session_hours(tmp_path: Path, value: str) -> None:
    with pytest.raises(ArgumentError, match="COLABKIT_SESSION_HOURS") as info:
        runtime(probe=probe(tmp_path, {"COLABKIT_SESSION_HOURS": value}))
    assert isinstance(info.value, ValueError) and isinstance(info.value, ColabkitError)


def test_env_overrides_for_dirs(tmp_path: Path) -> None:
    env = {"COLABKIT_DATA_DIR": str(tmp_path / "d"), "COLABKIT_DRIVE_DIR": str(tmp_path / "g")}
    rt = runtime(probe=probe(tmp_path, env))
    assert rt.data_dir == tmp_path / "d"
    assert rt.drive_mountpoint == tmp_path / "g"


def test_use_probe_nests_and_restores(tmp_path: Path) -> None:
    colab = probe(tmp_path, {"COLAB_RELEASE_TAG": "x"}, files=("/var/colab/hostname",))
    with use_probe(colab):
        assert runtime().kind == "colab"
        with use_probe(probe(tmp_path, {"KAGGLE_URL_BASE": "k"})):
            assert runtime().kind == "kaggle"
        assert runtime().kind == "colab"
    assert runtime().kind in ("script", "jupyter")


def test_host_path_maps_platform_paths(tmp_path: Path) -> None:
    rt = runtime(probe=probe(tmp_path))
    assert rt.host_path("/content/drive") == tmp_path / "content" / "drive"
    assert rt.host_path("/kaggle/working/x") == tmp_path / "kaggle" / "working" / "x"
    assert rt.host_path("/tmp/dataset.zip") == Path("/tmp/dataset.zip")  # ordinary paths are kept
    assert rt.host_path(tmp_path / "x") == tmp_path / "x"
    assert rt.host_path("relative/p") == Path("relative/p")
    real = Runtime(
        kind="script",
        accelerator="cpu",
        gpus=(),
        data_dir=Path("/d"),
        work_dir=Path("/w"),
        drive_mountpoint=Path("/g"),
        session_start=None,
        session_limit=None,
        in_notebook=False,
    )
    assert real.host_path("/content/drive") == Path("/content/drive")


def test_record_is_frozen(tmp_path: Path) -> None:
    rt = runtime(probe=probe(tmp_path))
    with pytest.raises(AttributeError):
        rt.kind = "colab"  # type: ignore[misc]


def test_real_machine_session_start_is_in_the_past() -> None:
    from colabkit.runtime import _container_start

    started = _container_start()
    assert started is not None
    assert started <= datetime.now(timezone.utc)
