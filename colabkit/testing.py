"""Run notebook code on a laptop as if it were on Colab or Kaggle.

``fake_colab()`` and ``fake_kaggle()`` are context managers. Inside them
:func:`colabkit.runtime` reports that platform, platform paths such as
``/content/data`` or ``/kaggle/working`` live under a temporary folder, and
(for Colab) a fake ``google.colab`` package is importable whose ``drive``,
``files``, ``output`` and ``runtime`` modules have the real signatures and
record every call::

    from colabkit.testing import fake_colab
    import colabkit

    def test_my_notebook_code():
        with fake_colab(gpu="T4") as colab:
            mydrive = colabkit.mount_drive()
            assert mydrive.name == "MyDrive"
            assert colab.calls_to("drive.mount")

:class:`FakeScreen` stands in for a notebook cell or a terminal
(``with colabkit.display.use_screen(FakeScreen("notebook")) as cell: ...``) and
records every output, in-place update and line, as a notebook would get them.

Use them in your own tests too: nothing here needs Colab, Kaggle or a GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import shutil
import sys
import tempfile
import threading
import types
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from colabkit import _notify
from colabkit.display import Kind, Screen
from colabkit.errors import ArgumentError
from colabkit.runtime import GpuInfo, Probe, use_probe

__all__ = ["GPUS", "FakeHandle", "FakePlatform", "FakeScreen", "fake_colab", "fake_kaggle"]

GiB = 1024**3

#: GPUs the fakes know by short name.
GPUS: dict[str, GpuInfo] = {
    "T4": GpuInfo("Tesla T4", 15 * GiB, (7, 5)),
    "P100": GpuInfo("Tesla P100-PCIE-16GB", 16 * GiB, (6, 0)),
    "V100": GpuInfo("Tesla V100-SXM2-16GB", 16 * GiB, (7, 0)),
    "L4": GpuInfo("NVIDIA L4", 22 * GiB, (8, 9)),
    "A100": GpuInfo("NVIDIA A100-SXM4-40GB", 40 * GiB, (8, 0)),
    "H100": GpuInfo("NVIDIA H100 80GB HBM3", 80 * GiB, (9, 0)),
}

_PLATFORM_ENV_PREFIXES = ("COLAB_", "KAGGLE_", "VERTEX_", "TPU_", "COLABKIT_")


@dataclasses.dataclass
class FakePlatform:
    """State of a faked platform: where its files live and what was called.

    Attributes:
        kind: ``"colab"`` or ``"kaggle"``.
        root: Temporary folder standing for ``/``; ``/content`` is ``root / "content"``.
        environ: The environment :func:`colabkit.runtime` sees.
        calls: Every call made to the fake ``google.colab`` modules, as
            ``(name, arguments)`` pairs, e.g. ``("drive.mount", {"mountpoint": ...})``.
        uploads: Files the next ``files.upload()`` returns, name -> bytes.
        mount_error: If set, ``drive.mount`` raises it (e.g. ``ValueError("mount failed")``).
        js_result: What ``output.eval_js`` returns.
        unassigned: True once ``runtime.unassign()`` was called.
    """

    kind: str
    root: Path
    environ: dict[str, str]
    calls: list[tuple[str, dict[str, Any]]] = dataclasses.field(default_factory=list)
    uploads: dict[str, bytes] = dataclasses.field(default_factory=dict)
    mount_error: BaseException | None = None
    js_result: Any = None
    unassigned: bool = False
    mounted_at: Path | None = None
    enterprise: bool = False

    def path(self, platform_path: str | os.PathLike[str]) -> Path:
        """Where a platform path such as ``/content/drive`` really lives in this fake."""
        p = Path(platform_path)
        if not p.is_absolute():
            return p
        with contextlib.suppress(ValueError):
            p.relative_to(self.root)
            return p
        return self.root.joinpath(*p.parts[1:])

    @property
    def drive_storage(self) -> Path:
        """Where the fake Drive keeps its files while unmounted (the "cloud")."""
        return self.root / ".fake-google-drive" / "MyDrive"

    def calls_to(self, name: str) -> list[dict[str, Any]]:
        """Arguments of every recorded call to ``name`` (e.g. ``"drive.mount"``)."""
        return [args for called, args in self.calls if called == name]

    def _record(self, name: str, **arguments: Any) -> None:
        self.calls.append((name, arguments))

    # -- google.colab.drive ---------------------------------------------------------------------
    def _mount(
        self, mountpoint: str, force_remount: bool = False, timeout_ms: int = 120000, readonly: bool = False
    ) -> None:
        self._record(
            "drive.mount", mountpoint=mountpoint, force_remount=force_remount, timeout_ms=timeout_ms, readonly=readonly
        )
        if self.enterprise:
            raise NotImplementedError("google.colab.drive.mount is not supported in Colab Enterprise.")
        if " " in str(mountpoint):
            raise ValueError("Mountpoint must not contain a space.")
        if self.mount_error is not None:
            raise self.mount_error
        real = self.path(mountpoint)
        if self.mounted_at == real and not force_remount:
            print(
                f"Drive already mounted at {mountpoint}; to attempt to forcibly remount, "
                f'call drive.mount("{mountpoint}", force_remount=True).'
            )
            return
        if self.mounted_at is not None:
            self._unmount()
        # Colab validates the mountpoint only after unmounting, in this order.
        if real.is_symlink():
            raise ValueError("Mountpoint must not be a symlink")
        if real.exists() and not real.is_dir():
            raise ValueError("Mountpoint must either be a directory or not exist")
        if real.is_dir() and any(real.iterdir()):
            raise ValueError("Mountpoint must not already contain files")
        if not real.parent.is_dir():
            raise ValueError("Mountpoint must be in a directory that exists")
        real.mkdir(exist_ok=True)
        self.drive_storage.mkdir(parents=True, exist_ok=True)
        os.rename(self.drive_storage, real / "MyDrive")
        self.mounted_at = real
        print(f"Mounted at {mountpoint}")

    def _unmount(self) -> None:
        assert self.mounted_at is not None
        os.rename(self.mounted_at / "MyDrive", self.drive_storage)
        self.mounted_at = None

    def _flush_and_unmount(self, timeout_ms: int = 24 * 60 * 60 * 1000) -> None:
        self._record("drive.flush_and_unmount", timeout_ms=timeout_ms)
        if self.mounted_at is None:
            print("Drive not mounted, so nothing to flush and unmount.")
            return
        self._unmount()

    # -- google.colab.files ---------------------------------------------------------------------
    def _download(self, filename: str) -> None:
        self._record("files.download", filename=filename)
        if not os.path.exists(filename):
            raise FileNotFoundError(f"Cannot find file: {filename}")

    def _upload(self, target_dir: str = "") -> dict[str, bytes]:
        self._record("files.upload", target_dir=target_dir)
        uploaded = dict(self.uploads)
        for name, data in uploaded.items():
            Path(target_dir or ".", name).write_bytes(data)
        self.uploads.clear()
        return uploaded

    # -- google.colab.output / runtime ----------------------------------------------------------
    def _eval_js(self, script: str, ignore_result: bool = False, timeout_sec: float | None = None) -> Any:
        self._record("output.eval_js", script=script, ignore_result=ignore_result, timeout_sec=timeout_sec)
        if threading.current_thread() is not threading.main_thread():
            # The real call is not thread-safe and can deadlock; make misuse loud in tests.
            raise RuntimeError("google.colab.output.eval_js called from a background thread")
        return None if ignore_result else self.js_result

    def _unassign(self) -> None:
        self._record("runtime.unassign")
        self.unassigned = True


def _module(name: str, **attributes: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    for key, value in attributes.items():
        setattr(module, key, value)
    return module


def _colab_modules(fake: FakePlatform) -> dict[str, types.ModuleType]:
    def mount(mountpoint: str, force_remount: bool = False, timeout_ms: int = 120000, readonly: bool = False) -> None:
        fake._mount(mountpoint, force_remount=force_remount, timeout_ms=timeout_ms, readonly=readonly)

    def flush_and_unmount(timeout_ms: int = 24 * 60 * 60 * 1000) -> None:
        fake._flush_and_unmount(timeout_ms=timeout_ms)

    def download(filename: str) -> None:
        fake._download(filename)

    def upload(target_dir: str = "") -> dict[str, bytes]:
        return fake._upload(target_dir=target_dir)

    def eval_js(script: str, ignore_result: bool = False, timeout_sec: float | None = None) -> Any:
        return fake._eval_js(script, ignore_result=ignore_result, timeout_sec=timeout_sec)

    def unassign() -> None:
        fake._unassign()

    class Error(Exception):
        """Base of google.colab errors."""

    class AuthorizationError(Error):
        """Auth failed."""

    class RuntimeManagementError(Error):
        """unassign() failed."""

    class WidgetException(Error):
        """Widget failure."""

    drive = _module("google.colab.drive", mount=mount, flush_and_unmount=flush_and_unmount)
    files = _module("google.colab.files", download=download, upload=upload)
    output = _module("google.colab.output", eval_js=eval_js)
    runtime_mod = _module("google.colab.runtime", unassign=unassign)
    errors = _module(
        "google.colab.errors",
        Error=Error,
        AuthorizationError=AuthorizationError,
        RuntimeManagementError=RuntimeManagementError,
        WidgetException=WidgetException,
    )
    colab = _module(
        "google.colab", drive=drive, files=files, output=output, runtime=runtime_mod, errors=errors, __path__=[]
    )
    colab.__fake__ = fake  # type: ignore[attr-defined]
    return {
        "google.colab": colab,
        "google.colab.drive": drive,
        "google.colab.files": files,
        "google.colab.output": output,
        "google.colab.runtime": runtime_mod,
        "google.colab.errors": errors,
    }


@contextlib.contextmanager
def _installed_modules(modules: Mapping[str, types.ModuleType]) -> Iterator[None]:
    names = list(modules)
    saved = {name: sys.modules.get(name) for name in [*names, "google"]}
    google = sys.modules.get("google")
    if google is None:
        # Import the real namespace package (protobuf, ...) when installed, so the
        # fake google.colab sits beside google.protobuf instead of hiding it.
        with contextlib.suppress(ImportError):
            import google  # type: ignore[no-redef]
        google = sys.modules.get("google")
    added_google = google is None
    if google is None:
        google = _module("google", __path__=[])
        sys.modules["google"] = google
    saved_attr = getattr(google, "colab", None)
    sys.modules.update(modules)
    google.colab = modules["google.colab"]  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous
        if not added_google:
            if saved_attr is None:
                with contextlib.suppress(AttributeError):
                    delattr(google, "colab")
            else:
                google.colab = saved_attr  # type: ignore[attr-defined]


def _shell(module: str, name: str) -> object:
    return type(name, (), {"__module__": module})()


def _clean_environ(extra: Mapping[str, str], environ: Mapping[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_PLATFORM_ENV_PREFIXES)}
    env.update(extra)
    env.update(environ or {})
    return env


def _gpus(gpu: str | GpuInfo | None, count: int) -> tuple[GpuInfo, ...]:
    if gpu is None:
        return ()
    if isinstance(gpu, str):
        if gpu not in GPUS:
            raise ArgumentError(f"gpu={gpu!r} is not a GPU the fakes know; use one of {sorted(GPUS)} or a GpuInfo")
        gpu = GPUS[gpu]
    return (gpu,) * count


@dataclasses.dataclass(frozen=True)
class _Common:
    """The options every fake takes."""

    root: str | os.PathLike[str] | None
    environ: Mapping[str, str] | None
    gpus: tuple[GpuInfo, ...]
    session_start: datetime | None
    now: Callable[[], datetime] | None


@contextlib.contextmanager
def _fake(
    kind: str,
    *,
    env: dict[str, str],
    shell: object | None,
    markers: tuple[str, ...],
    folders: tuple[str, ...],
    common: _Common,
    enterprise: bool = False,
) -> Iterator[FakePlatform]:
    root = common.root
    made_root = root is None
    base = Path(tempfile.mkdtemp(prefix=f"colabkit-fake-{kind}-")) if root is None else Path(root)
    base.mkdir(parents=True, exist_ok=True)
    fake = FakePlatform(
        kind=kind, root=base.resolve(), environ=_clean_environ(env, common.environ), enterprise=enterprise
    )
    for marker in markers:
        target = fake.path(marker)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.touch()
    for folder in folders:
        fake.path(folder).mkdir(parents=True, exist_ok=True)
    clock = common.now or (lambda: datetime.now(timezone.utc))
    start = common.session_start or clock() - timedelta(minutes=5)
    probe = Probe(
        environ=fake.environ,
        exists=os.path.exists,
        ipython=lambda: shell,
        now=clock,
        session_start=lambda: start,
        gpus=lambda: common.gpus,
        mps=lambda: False,
        root=fake.root,
    )
    _notify.reset_once()
    try:
        with contextlib.ExitStack() as stack:
            if kind == "colab":
                stack.enter_context(_installed_modules(_colab_modules(fake)))
            stack.enter_context(use_probe(probe))
            yield fake
    finally:
        _notify.reset_once()
        if made_root:
            shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def fake_colab(
    root: str | os.PathLike[str] | None = None,
    *,
    gpu: str | GpuInfo | None = None,
    gpu_count: int = 1,
    enterprise: bool = False,
    notebook: bool = True,
    session_start: datetime | None = None,
    now: Callable[[], datetime] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Iterator[FakePlatform]:
    """Pretend to be on Google Colab inside the ``with`` block.

    Args:
        root: Folder that stands for ``/`` (default: a new temporary folder, removed afterwards).
        gpu: ``None`` for a CPU runtime, a name from :data:`GPUS` (``"T4"``) or a :class:`GpuInfo`.
            Only :func:`colabkit.runtime` sees it; torch still computes on what this machine has.
        gpu_count: How many such GPUs.
        enterprise: Colab Enterprise (``VERTEX_PRODUCT=COLAB_ENTERPRISE``; Drive cannot be mounted).
        notebook: Whether an IPython kernel of Colab's shell class is running.
        session_start: When the runtime started (default: five minutes ago).
        now: The clock (default: the real one).
        environ: Extra environment variables, e.g. ``{"COLABKIT_SESSION_HOURS": "24"}``.

    Yields:
        The :class:`FakePlatform`, whose ``calls`` record the ``google.colab`` calls.
    """
    env = {
        "COLAB_RELEASE_TAG": "release-colab_20261101-060000_RC00",
        "COLAB_BACKEND_VERSION": "next",
        "COLAB_JUPYTER_TRANSPORT": "ipc",
    }
    if enterprise:
        env["VERTEX_PRODUCT"] = "COLAB_ENTERPRISE"
    with _fake(
        "colab",
        env=env,
        shell=_shell("google.colab._shell", "Shell") if notebook else None,
        markers=() if enterprise else ("/var/colab/hostname",),
        folders=("/content",),
        enterprise=enterprise,
        common=_Common(root, environ, _gpus(gpu, gpu_count), session_start, now),
    ) as fake:
        yield fake


@contextlib.contextmanager
def fake_kaggle(
    root: str | os.PathLike[str] | None = None,
    *,
    gpu: str | GpuInfo | None = None,
    gpu_count: int = 1,
    tpu: bool = False,
    run_type: str = "Interactive",
    notebook: bool = True,
    session_start: datetime | None = None,
    now: Callable[[], datetime] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Iterator[FakePlatform]:
    """Pretend to be in a Kaggle notebook inside the ``with`` block.

    Like the real image, it also sets ``COLAB_RELEASE_TAG`` (Kaggle is built on
    Colab's image), so code that checks Colab first is caught out.

    Args:
        root: Folder that stands for ``/`` (default: a new temporary folder, removed afterwards).
        gpu: ``None``, a name from :data:`GPUS` or a :class:`GpuInfo`; Kaggle's
            "T4 x2" is ``gpu="T4", gpu_count=2``.
        gpu_count: How many such GPUs.
        tpu: A TPU session (9 hour limit).
        run_type: ``"Interactive"`` or ``"Batch"`` (Save & Run All).
        notebook: Whether a Jupyter kernel is running.
        session_start: When the session started (default: five minutes ago).
        now: The clock.
        environ: Extra environment variables.

    Yields:
        The :class:`FakePlatform`.
    """
    env = {
        "KAGGLE_KERNEL_RUN_TYPE": run_type,
        "KAGGLE_URL_BASE": "https://www.kaggle.com",
        "KAGGLE_DATA_PROXY_URL": "https://dp.kaggle.net",
        "COLAB_RELEASE_TAG": "release-colab-external-images_20261101-060000_RC00",
    }
    if tpu:
        env["TPU_ACCELERATOR_TYPE"] = "v3-8"
    with _fake(
        "kaggle",
        env=env,
        shell=_shell("ipykernel.zmqshell", "ZMQInteractiveShell") if notebook else None,
        markers=(),
        folders=("/kaggle/input", "/kaggle/working"),
        common=_Common(root, environ, _gpus(gpu, gpu_count), session_start, now),
    ) as fake:
        yield fake


# -- a fake notebook cell / terminal --------------------------------------------------------------


def _mimebundle(obj: Any) -> dict[str, str]:
    """What IPython's display formatter sends for ``obj``: its repr, and its HTML when it has one."""
    bundle = {"text/plain": repr(obj)}
    html = getattr(obj, "_repr_html_", None)
    if callable(html):
        text = html()
        if text is not None:
            bundle["text/html"] = text
    return bundle


class FakeHandle:
    """One display output of a :class:`FakeScreen`: every version it showed, the last one current."""

    def __init__(self, obj: Any) -> None:
        self.versions: list[dict[str, str]] = [_mimebundle(obj)]

    def update(self, obj: Any) -> None:
        """Replace the output in place (``DisplayHandle.update``)."""
        self.versions.append(_mimebundle(obj))

    @property
    def current(self) -> dict[str, str]:
        """The mime bundle shown now."""
        return self.versions[-1]


class FakeScreen(Screen):
    """A notebook cell, terminal or log that records what colabkit sends it.

    Args:
        kind: ``"notebook"`` (a kernel without ipywidgets), ``"widgets"``, ``"terminal"`` or ``"log"``.

    Attributes:
        outputs: Display outputs in the order they were created (notebook kinds).
        lines: Lines printed (they stay).
        stderr: What text bars wrote (terminal), escape codes included.
        widget_bars: Keyword arguments of each ``tqdm.notebook`` bar asked for (widgets);
            the bar itself is a tqdm text bar writing to :attr:`stderr`.
    """

    def __init__(self, kind: Kind = "notebook") -> None:
        super().__init__(kind)
        self.outputs: list[FakeHandle] = []
        self.lines: list[str] = []
        self.stderr = io.StringIO()
        self.widget_bars: list[dict[str, Any]] = []

    def show(self, obj: Any) -> FakeHandle:
        if not self.notebook:
            raise AssertionError(f"show() on a {self.kind!r} screen: only notebooks have display outputs")
        handle = FakeHandle(obj)
        self.outputs.append(handle)
        return handle

    def line(self, text: str) -> None:
        self.lines.extend(text.splitlines() or [""])

    def text_bar(self, **options: Any) -> Any:
        from tqdm.std import tqdm

        return tqdm(file=self.stderr, ncols=100, **options)

    def widget_bar(self, **options: Any) -> Any:
        self.widget_bars.append(dict(options))
        return self.text_bar(**options)
