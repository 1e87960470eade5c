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
import errno
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

from colabkit import _io, _notify
from colabkit.display import Kind, Screen
from colabkit.errors import ArgumentError
from colabkit.runtime import PLATFORM_TOPS, GpuInfo, Probe, current_probe, use_probe

__all__ = [
    "COLAB_CLI_VERSION",
    "GPUS",
    "CLIResult",
    "FakeColabCLI",
    "FakeHandle",
    "FakePlatform",
    "FakeScreen",
    "MessageError",
    "fake_colab",
    "fake_colab_cli",
    "fake_kaggle",
]

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

# sys.argv of the kernel a notebook tab talks to, as its launcher starts it.
_KERNEL_ARGV = {
    "colab": [
        "/usr/local/lib/python3.12/dist-packages/colab_kernel_launcher.py",
        "-f",
        "/root/.local/share/jupyter/runtime/kernel-0f1e2d3c.json",
    ],
    "kaggle": [
        "/usr/local/lib/python3.11/dist-packages/ipykernel_launcher.py",
        "-f",
        "/root/.local/share/jupyter/runtime/kernel-0f1e2d3c.json",
    ],
}

# Everything that tells a platform apart, so the machine running the tests cannot leak into a fake.
_PLATFORM_ENV_PREFIXES = ("COLAB_", "KAGGLE_", "VERTEX_", "TPU_", "COLABKIT_", "TBE_", "ISTPUVM", "CLOUDSDK_CONFIG")


# -- google.colab's error types, as the real modules define them ------------------------------------
class _ColabError(Exception):
    """Base class for all Colab errors."""


class _AuthorizationError(_ColabError):
    """Authorization-related failures."""


class _RuntimeManagementError(_ColabError):
    """Runtime-management-related failures."""


class _WidgetException(Exception):  # not a google.colab.errors.Error, as in the real errors.py
    """colab.widgets failures."""


class MessageError(_ColabError):
    """``google.colab._message.MessageError``: the browser answered a request with an error.

    Set ``FakePlatform.auth_error = MessageError("Error: credential propagation was
    unsuccessful")`` to simulate a refused Drive authorisation.
    """


for _cls, _module_name, _name in (
    (_ColabError, "google.colab.errors", "Error"),
    (_AuthorizationError, "google.colab.errors", "AuthorizationError"),
    (_RuntimeManagementError, "google.colab.errors", "RuntimeManagementError"),
    (_WidgetException, "google.colab.errors", "WidgetException"),
    (MessageError, "google.colab._message", "MessageError"),
):
    _cls.__module__, _cls.__name__, _cls.__qualname__ = _module_name, _name, _name

_ENOTCONN = OSError(errno.ENOTCONN, os.strerror(errno.ENOTCONN)).strerror
_MOUNT_OPTIONS = "rw,nosuid,nodev,relatime,user_id=0,group_id=0,allow_other"


@dataclasses.dataclass
class _Mount:
    name: str  # the mountpoint as Colab was given it (the mount table's field)
    alive: bool = True


@dataclasses.dataclass
class FakePlatform:
    """State of a faked platform: where its files live and what was called.

    The fake Drive behaves like Colab's: ``drive.mount`` checks, in Colab's
    order, ``/var/colab/hostname``, a space in the mountpoint, Colab
    Enterprise, ``TBE_EPHEM_CREDS_ADDR`` and the authorisation request; it
    refuses calls from a background thread (the real one is not thread safe);
    mounting a second mountpoint stops the first one's DriveFS, which then
    answers errno 107, as Colab's ``pkill -9 -x drive`` does. Mounts appear in
    the mount table colabkit reads (``Probe.mounts``). A dead mount answers
    errno 107 to the file operations colabkit makes (``colabkit._io.ops``);
    plain ``open()`` calls under it find an empty folder instead.

    Attributes:
        kind: ``"colab"`` or ``"kaggle"``.
        root: Temporary folder standing for ``/``; ``/content`` is ``root / "content"``.
        environ: The environment :func:`colabkit.runtime` and the fake modules see.
        calls: Every call made to the fake ``google.colab`` modules, as
            ``(name, arguments)`` pairs, e.g. ``("drive.mount", {"mountpoint": ...})``.
        uploads: Files the next ``files.upload()`` / ``files.upload_file()`` receives, name -> bytes.
        auth_error: If set, Drive's authorisation request raises it (e.g. a :class:`MessageError`).
        mount_error: If set, ``drive.mount`` raises it once DriveFS would start
            (e.g. ``ValueError("mount failed")``).
        flush_error: If set, ``drive.flush_and_unmount`` raises it.
        js_result: What ``output.eval_js`` returns.
        unassigned: True once ``runtime.unassign()`` was called.
        shell: The IPython shell the fake reports (None: no kernel, as in ``!python script.py``).
    """

    kind: str
    root: Path
    environ: dict[str, str]
    calls: list[tuple[str, dict[str, Any]]] = dataclasses.field(default_factory=list)
    uploads: dict[str, bytes] = dataclasses.field(default_factory=dict)
    auth_error: BaseException | None = None
    mount_error: BaseException | None = None
    flush_error: BaseException | None = None
    js_result: Any = None
    unassigned: bool = False
    shell: object | None = None
    _mounts: dict[Path, _Mount] = dataclasses.field(default_factory=dict)

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

    @property
    def mounted_at(self) -> Path | None:
        """The folder of the live Drive mount, if any."""
        return next((real for real, mount in self._mounts.items() if mount.alive), None)

    def calls_to(self, name: str) -> list[dict[str, Any]]:
        """Arguments of every recorded call to ``name`` (e.g. ``"drive.mount"``)."""
        return [args for called, args in self.calls if called == name]

    def mount_table(self) -> str:
        """The mount table as ``/proc/mounts`` would show it: Drive's mounts, live and dead."""
        lines = ["overlay / overlay rw,relatime 0 0"]
        for mount in self._mounts.values():
            field = mount.name.replace("\\", "\\134").replace(" ", "\\040")
            lines.append(f"drive {field} fuse.drive {_MOUNT_OPTIONS} 0 0")
        return "\n".join(lines) + "\n"

    def kill_drive(self) -> None:
        """Make DriveFS die, as it does mid-training: every mount then answers errno 107."""
        for real, mount in self._mounts.items():
            if mount.alive:
                self._stop(real)

    def is_dead(self, path: str | os.PathLike[str]) -> bool:
        """Whether ``path`` lies under a Drive mount whose DriveFS died."""
        target = Path(os.path.abspath(self.path(path)))
        return any(
            not mount.alive and (target == real or real in target.parents) for real, mount in self._mounts.items()
        )

    def _record(self, name: str, **arguments: Any) -> None:
        self.calls.append((name, arguments))

    @staticmethod
    def _main_thread_only(call: str) -> None:
        if threading.current_thread() is not threading.main_thread():
            # The real call is not thread-safe and can deadlock; make misuse loud in tests.
            raise RuntimeError(f"{call} called from a background thread")

    # -- google.colab._message ------------------------------------------------------------------
    def _blocking_request(
        self, request_type: str, request: Any = "", timeout_sec: float | None = 5, parent: Any = None
    ) -> Any:
        self._record("message.blocking_request", request_type=request_type, request=request, timeout_sec=timeout_sec)
        self._main_thread_only("google.colab._message.blocking_request")
        if request_type == "request_auth" and self.auth_error is not None:
            raise self.auth_error
        return None

    # -- google.colab.drive ---------------------------------------------------------------------
    def _expanduser(self, path: str) -> str:
        home = self.environ.get("HOME", "")
        if home and (path == "~" or path.startswith("~/")):
            return home + path[1:]
        return path

    def _mount(
        self, mountpoint: str, force_remount: bool = False, timeout_ms: int = 120000, readonly: bool = False
    ) -> None:
        self._record(
            "drive.mount", mountpoint=mountpoint, force_remount=force_remount, timeout_ms=timeout_ms, readonly=readonly
        )
        self._main_thread_only("google.colab.drive.mount")
        # Colab's checks, in Colab's order.
        if not self.path("/var/colab/hostname").exists():
            raise NotImplementedError(
                "Mounting drive is unsupported in this environment. Use PyDrive2 instead. See examples at "
                "https://colab.research.google.com/notebooks/io.ipynb#scrollTo=7taylj9wpsA2."
            )
        if " " in str(mountpoint):
            raise ValueError("Mountpoint must not contain a space.")
        if self.environ.get("VERTEX_PRODUCT") == "COLAB_ENTERPRISE":
            raise NotImplementedError("google.colab.drive.mount is not supported in Colab Enterprise.")
        self.environ["TBE_EPHEM_CREDS_ADDR"]  # a KeyError when missing, as in Colab
        auth = {"authType": "dfs_ephemeral"}
        self._blocking_request("request_auth", request=auth, timeout_sec=int(timeout_ms / 1000))
        name = self._expanduser(str(mountpoint))
        real = self.path(name)
        current = self._mounts.get(real)
        if current is not None and current.alive and not force_remount:
            print(
                f"Drive already mounted at {name}; to attempt to forcibly remount, "
                f'call drive.mount("{name}", force_remount=True).'
            )
            return
        # "umount -f <mountpoint>; pkill -9 -x drive": this mount goes, every other DriveFS dies.
        if current is not None:
            self._unmount(real)
        self.kill_drive()
        # Colab validates the mountpoint only after unmounting, in this order.
        if real.is_symlink():
            raise ValueError("Mountpoint must not be a symlink")
        if real.is_dir() and any(real.iterdir()):
            raise ValueError("Mountpoint must not already contain files")
        if real.exists() and not real.is_dir():
            raise ValueError("Mountpoint must either be a directory or not exist")
        if not real.parent.is_dir():
            raise ValueError("Mountpoint must be in a directory that exists")
        if self.mount_error is not None:
            raise self.mount_error
        real.mkdir(exist_ok=True)
        self.drive_storage.mkdir(parents=True, exist_ok=True)
        os.rename(self.drive_storage, real / "MyDrive")
        self._mounts[real] = _Mount(name)
        print(f"Mounted at {name}")

    def _stop(self, real: Path) -> None:
        """DriveFS of the mount at ``real`` dies: its files stay in the cloud, the entry stays in the table."""
        self._mounts[real].alive = False  # dead before its files go: no moment of a live, empty mount
        os.rename(real / "MyDrive", self.drive_storage)

    def _unmount(self, real: Path) -> None:
        mount = self._mounts.pop(real)
        if mount.alive:
            os.rename(real / "MyDrive", self.drive_storage)
        else:
            # What landed in a dead mount's folder never reached Drive; unmounting shows the empty folder beneath.
            for entry in list(real.iterdir()):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()

    def _flush_and_unmount(self, timeout_ms: int = 24 * 60 * 60 * 1000) -> None:
        self._record("drive.flush_and_unmount", timeout_ms=timeout_ms)
        if self.path("/var/colab/mp").exists():
            raise NotImplementedError("google.colab.drive is unsupported in this environment.")
        # Colab reads both first: a KeyError when missing.
        self.environ["HOME"]
        self.environ["CLOUDSDK_CONFIG"]
        if not self._mounts:  # Colab looks for "type fuse.drive" in /bin/mount's output
            print("Drive not mounted, so nothing to flush and unmount.")
            return
        if self.flush_error is not None:
            raise self.flush_error
        live = self.mounted_at
        if live is not None:
            self._unmount(live)

    # -- google.colab.files ---------------------------------------------------------------------
    def _local(self, path: str) -> str:
        """A platform path (/content/...) as this fake stores it; other paths unchanged."""
        p = Path(path)
        if p.is_absolute() and p.parts[1:2] in PLATFORM_TOPS:
            return str(self.path(p))
        return path

    def _require_kernel(self) -> None:
        # files.download talks to the browser through get_ipython().kernel, as Colab's does.
        getattr(self.shell, "kernel")  # noqa: B009 - an AttributeError without a kernel

    def _download(self, filename: str) -> None:
        self._record("files.download", filename=filename)
        if not os.path.exists(self._local(filename)):
            raise FileNotFoundError(f"Cannot find file: {filename}")
        self._require_kernel()

    def _view(self, filepath: str) -> None:
        self._record("files.view", filepath=filepath)
        if not os.path.exists(self._local(filepath)):
            raise FileNotFoundError(f"Cannot find file: {filepath}")

    def _take_uploads(self) -> dict[str, bytes]:
        uploaded = dict(self.uploads)
        self.uploads.clear()
        return uploaded

    def _upload(self, target_dir: str = "") -> dict[str, bytes]:
        self._record("files.upload", target_dir=target_dir)
        uploaded = self._take_uploads()
        if target_dir:
            os.makedirs(self._local(target_dir), exist_ok=True)
        saved: dict[str, bytes] = {}
        local_names: dict[str, str] = {}
        for filename, data in uploaded.items():
            complete = os.path.join(target_dir, filename)
            local = local_names.get(complete)
            if not local:
                local = _unique_filename(self._local(complete))
                local_names[complete] = local
                print(f"Saving {filename} to {local}")
            with open(local, "ab") as handle:
                handle.write(data)
            saved[local] = data
        return saved

    def _upload_file(self, filename: str) -> None:
        self._record("files.upload_file", filename=filename)
        uploaded = self._take_uploads()
        if not uploaded:
            raise ValueError("File has not been uploaded")
        if len(uploaded) > 1:
            raise ValueError("Multiple files received, please upload a single file")
        first_name, data = next(iter(uploaded.items()))
        with open(self._local(filename), "wb") as handle:
            handle.write(data)
        print(f"Saved {first_name} to {os.getcwd()}/{filename}")

    # -- google.colab.output / runtime ----------------------------------------------------------
    def _eval_js(self, script: str, ignore_result: bool = False, timeout_sec: float | None = None) -> Any:
        self._record("output.eval_js", script=script, ignore_result=ignore_result, timeout_sec=timeout_sec)
        self._main_thread_only("google.colab.output.eval_js")
        return None if ignore_result else self.js_result

    def _unassign(self) -> None:
        self._record("runtime.unassign")
        self.unassigned = True


def _unique_filename(filename: str) -> str:
    """``name (1).ext``, ``name (2).ext``... for a name that exists, as Colab's upload does."""
    if not os.path.lexists(filename):
        return filename
    stem, ext = os.path.splitext(filename)
    counter = 1
    while os.path.lexists(f"{stem} ({counter}){ext}"):
        counter += 1
    return f"{stem} ({counter}){ext}"


class _DriveFSOps(_io.FileOps):
    """colabkit's file operations, answering errno 107 under a dead fake Drive mount."""

    def __init__(self, inner: _io.FileOps, fake: FakePlatform) -> None:
        self._inner = inner
        self._fake = fake

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("_") or name in object.__getattribute__(self, "__dict__"):
            return object.__getattribute__(self, name)  # its own state, and attributes a test set on it
        target = getattr(object.__getattribute__(self, "_inner"), name)
        if not callable(target):
            return target
        fake = object.__getattribute__(self, "_fake")

        def dead_path(args: tuple[Any, ...]) -> str | None:
            for arg in args:
                where = arg if isinstance(arg, (str, os.PathLike)) else getattr(arg, "name", None)
                if isinstance(where, (str, os.PathLike)) and fake.is_dead(where):
                    return os.fspath(where)
            return None

        def call(*args: Any, **kwargs: Any) -> Any:
            dead = dead_path(args)
            if dead is None:
                try:
                    return target(*args, **kwargs)
                except FileNotFoundError:
                    dead = dead_path(args)  # DriveFS died between the check and the call
                    if dead is None:
                        raise
            raise OSError(errno.ENOTCONN, _ENOTCONN, dead)

        return call


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

    def upload_file(filename: str) -> None:
        fake._upload_file(filename)

    def view(filepath: str) -> None:
        fake._view(filepath)

    def eval_js(script: str, ignore_result: bool = False, timeout_sec: float | None = None) -> Any:
        return fake._eval_js(script, ignore_result=ignore_result, timeout_sec=timeout_sec)

    def blocking_request(
        request_type: str, request: Any = "", timeout_sec: float | None = 5, parent: Any = None
    ) -> Any:
        return fake._blocking_request(request_type, request=request, timeout_sec=timeout_sec, parent=parent)

    def unassign() -> None:
        fake._unassign()

    drive = _module("google.colab.drive", mount=mount, flush_and_unmount=flush_and_unmount)
    files = _module("google.colab.files", download=download, upload=upload, upload_file=upload_file, view=view)
    output = _module("google.colab.output", eval_js=eval_js)
    message = _module("google.colab._message", MessageError=MessageError, blocking_request=blocking_request)
    runtime_mod = _module("google.colab.runtime", unassign=unassign)
    errors = _module(
        "google.colab.errors",
        Error=_ColabError,
        AuthorizationError=_AuthorizationError,
        RuntimeManagementError=_RuntimeManagementError,
        WidgetException=_WidgetException,
    )
    submodules = {
        "drive": drive,
        "files": files,
        "output": output,
        "_message": message,
        "runtime": runtime_mod,
        "errors": errors,
    }
    colab = _module("google.colab", __path__=[], **submodules)
    colab.__fake__ = fake  # type: ignore[attr-defined]
    return {"google.colab": colab, **{f"google.colab.{name}": module for name, module in submodules.items()}}


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
    # A kernel-backed shell, like Colab's and ipykernel's: files.download reaches the browser through .kernel.
    return type(name, (), {"__module__": module, "kernel": types.SimpleNamespace(comm_manager=None)})()


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
    colab_package: bool,
) -> Iterator[FakePlatform]:
    root = common.root
    made_root = root is None
    base = Path(tempfile.mkdtemp(prefix=f"colabkit-fake-{kind}-")) if root is None else Path(root)
    base.mkdir(parents=True, exist_ok=True)
    fake = FakePlatform(kind=kind, root=base.resolve(), environ=_clean_environ(env, common.environ), shell=shell)
    if kind == "colab" and "HOME" not in (common.environ or {}):
        # Colab's HOME is /root: here a real folder inside the fake, so "~" never reaches this machine's home.
        fake.environ["HOME"] = str(fake.path("/root"))
        fake.path("/root").mkdir(parents=True, exist_ok=True)
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
        ipython=lambda: fake.shell,
        now=clock,
        session_start=lambda: start,
        gpus=lambda: common.gpus,
        mps=lambda: False,
        mounts=fake.mount_table,
        root=fake.root,
        # A kernel's argv is its launcher's (colab run replaces it: FakeColabCLI); a script's is this one's.
        argv=lambda: _KERNEL_ARGV[kind] if fake.shell is not None else sys.argv,
    )
    _notify.reset_once()
    saved_ops = _io.ops
    try:
        with contextlib.ExitStack() as stack:
            if colab_package:
                stack.enter_context(_installed_modules(_colab_modules(fake)))
            stack.enter_context(use_probe(probe))
            _io.ops = _DriveFSOps(saved_ops, fake)
            yield fake
    finally:
        _io.ops = saved_ops
        # A test's monkeypatch may put the wrapper back after the fake: it must then refuse nothing.
        fake._mounts.clear()
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
    hosted: bool = True,
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
        hosted: False for Colab's local-runtime image on one's own machine: ``google.colab``
            and ``COLAB_RELEASE_TAG`` are there, ``/var/colab/hostname`` is not, and Drive
            cannot be mounted (colabkit calls it ``jupyter``).
        notebook: Whether an IPython kernel of Colab's shell class is running (False: a
            script started with ``!python``).
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
        "CLOUDSDK_CONFIG": "/content/.config",
    }
    if hosted:
        env["TBE_EPHEM_CREDS_ADDR"] = "172.28.0.1:8009"
        env["TBE_RUNTIME_ADDR"] = "172.28.0.1:8011"
    if enterprise:
        env["VERTEX_PRODUCT"] = "COLAB_ENTERPRISE"
    with _fake(
        "colab",
        env=env,
        shell=_shell("google.colab._shell", "Shell") if notebook else None,
        markers=("/var/colab/hostname",) if hosted else (),
        folders=("/content",),
        common=_Common(root, environ, _gpus(gpu, gpu_count), session_start, now),
        colab_package=True,
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

    Like the real CPU/GPU image, which is built on Colab's, it sets
    ``COLAB_RELEASE_TAG`` and ``google.colab`` is importable (its
    ``drive.mount`` refuses: no ``/var/colab/hostname``), so code that checks
    Colab first is caught out. The TPU image is built from ``python:3.12``
    instead: no Colab package, no ``COLAB_RELEASE_TAG``, but ``ISTPUVM=1`` and
    ``TPU_PROCESS_ADDRESSES=local``.

    Args:
        root: Folder that stands for ``/`` (default: a new temporary folder, removed afterwards).
        gpu: ``None``, a name from :data:`GPUS` or a :class:`GpuInfo`; Kaggle's
            "T4 x2" is ``gpu="T4", gpu_count=2``.
        gpu_count: How many such GPUs.
        tpu: A TPU VM session (9 hour limit), as Kaggle's TPU image looks.
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
    }
    if tpu:
        env.update({"ISTPUVM": "1", "TPU_PROCESS_ADDRESSES": "local"})
    else:
        env["COLAB_RELEASE_TAG"] = "release-colab-external-images_20261101-060000_RC00"
    with _fake(
        "kaggle",
        env=env,
        shell=_shell("ipykernel.zmqshell", "ZMQInteractiveShell") if notebook else None,
        markers=(),
        folders=("/kaggle/input", "/kaggle/working"),
        common=_Common(root, environ, _gpus(gpu, gpu_count), session_start, now),
        colab_package=not tpu,
    ) as fake:
        yield fake


# -- Google's `colab` command line (google-colab-cli) ---------------------------------------------

#: The google-colab-cli release whose source this fake follows.
COLAB_CLI_VERSION = "0.7.5"


class _Events:
    """IPython's ``shell.events``: callbacks per event, run in order of registration."""

    def __init__(self) -> None:
        self.callbacks: dict[str, list[Callable[..., Any]]] = {"pre_run_cell": [], "post_run_cell": []}

    def register(self, event: str, function: Callable[..., Any]) -> None:
        self.callbacks[event].append(function)

    def unregister(self, event: str, function: Callable[..., Any]) -> None:
        try:
            self.callbacks[event].remove(function)
        except ValueError:
            raise ValueError(f"Function {function!r} is not registered as a {event} callback") from None

    def trigger(self, event: str, *args: Any) -> None:
        for function in list(self.callbacks[event]):
            try:
                function(*args)
            except Exception:  # IPython prints a failing callback's traceback and goes on
                import traceback

                print(f"Error in callback {function} (for {event}):", file=sys.stderr)
                traceback.print_exc()


@dataclasses.dataclass(frozen=True)
class CLIResult:
    """What one fake ``colab run`` printed and returned.

    Attributes:
        returncode: The CLI's exit status: 0, the script's ``sys.exit`` code, or 1 for an uncaught error.
        stdout: The script's standard output, as the CLI prints its stream outputs.
        stderr: The script's standard error (tracebacks included).
    """

    returncode: int
    stdout: str
    stderr: str


class FakeColabCLI:
    """Google's ``colab`` command line (google-colab-cli), run on this machine.

    Made by :func:`fake_colab_cli`. It follows what the CLI's source does (release
    :data:`COLAB_CLI_VERSION`): ``colab run script.py args...`` gets a fresh VM, makes
    ``/content`` the working folder, and sends the script's text to the VM's Colab
    kernel as one cell, after a prelude that sets ``sys.argv = [<script name>, *args]``,
    ``__name__ = "__main__"`` and the ``--env`` variables. The kernel's stream outputs
    are printed as they come (no widget is ever drawn), ``sys.exit(n)`` becomes the exit
    status and any other uncaught error status 1. Then the CLI shuts the kernel down and
    releases the VM: after the cell's ``post_run_cell`` callbacks, the process ends at once
    (no ``atexit``), and everything on the VM's disk is gone.

    Drive: ``colab run`` mounts nothing. ``drivemount=True`` stands for a VM on which
    ``colab drivemount`` mounted Drive at ``/content/drive`` before the script. Writes to
    Drive reach the "cloud" (:attr:`drive_storage`) only if Drive was flushed
    (``drive.flush_and_unmount``) before the VM went away; otherwise they are lost with
    the VM's cache, the worst case a real runtime can show.

    Attributes:
        root: The folder that stands for each VM's ``/`` (emptied between runs) and holds the fake Drive.
        gpu: The GPU each VM reports (a name from :data:`GPUS`), or None.
        runs: Every result so far.
    """

    def __init__(self, root: Path, gpu: str | None) -> None:
        self.root = root
        self.gpu = gpu
        self.runs: list[CLIResult] = []

    @property
    def drive_storage(self) -> Path:
        """The "cloud" side of the fake Drive: what a later VM finds when Drive is mounted."""
        return self.root / ".fake-google-drive" / "MyDrive"

    def run(
        self,
        script: str | os.PathLike[str],
        *args: str,
        env: Mapping[str, str] | None = None,
        drivemount: bool = False,
        timeout: float = 600,
    ) -> CLIResult:
        """``colab run [--env K=V ...] script.py args...`` on a fresh VM; waits for it to end.

        Args:
            script: A Python file on this machine (the CLI reads it locally and sends its text).
            *args: The script's arguments (its ``sys.argv[1:]``).
            env: ``--env KEY=VALUE`` pairs, set in ``os.environ`` by the prelude.
            drivemount: Drive was mounted at ``/content/drive`` (``colab drivemount``) before the script ran.
            timeout: Seconds before the run is killed (then :class:`subprocess.TimeoutExpired` propagates).

        Returns:
            The :class:`CLIResult`.
        """
        import json
        import subprocess

        source = Path(script)
        if not source.is_file():
            raise ArgumentError(f"colab run: script {str(script)!r} not found (the CLI exits with status 2)")
        self._release_vm()
        cloud = self.drive_storage
        kept = self.root / ".fake-google-drive" / "synced"
        if kept.exists():
            shutil.rmtree(kept)
        if cloud.exists():
            shutil.copytree(cloud, kept, symlinks=True)
        config = {
            "root": str(self.root),
            "gpu": self.gpu,
            "script": str(source.resolve()),
            "args": list(args),
            "env": dict(env or {}),
            "drivemount": drivemount,
        }
        try:
            done = subprocess.run(
                [sys.executable, "-m", "colabkit.testing", "colab-run", json.dumps(config)],
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        finally:
            mounted = self.root / "content" / "drive" / "MyDrive"
            if mounted.exists():
                # Never flushed: the cloud keeps what it had when the VM started.
                if cloud.exists():
                    shutil.rmtree(cloud)
                if kept.exists():
                    kept.rename(cloud)
            if kept.exists():
                shutil.rmtree(kept)
            self._release_vm()
        result = CLIResult(done.returncode, done.stdout, done.stderr)
        self.runs.append(result)
        return result

    def _release_vm(self) -> None:
        """The VM is gone: nothing of its disk is left, only the fake Drive's cloud side."""
        self.root.mkdir(parents=True, exist_ok=True)
        for entry in self.root.iterdir():
            if entry.name == ".fake-google-drive":
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


@contextlib.contextmanager
def fake_colab_cli(root: str | os.PathLike[str] | None = None, *, gpu: str | None = None) -> Iterator[FakeColabCLI]:
    """Google's ``colab`` command line on this machine: ``cli.run("train.py")`` runs it as ``colab run`` would.

    Each run is a real Python process (see :class:`FakeColabCLI` for what it does, and
    what it does not keep); the fake Drive outlives the runs, so a second run can resume
    from what the first one flushed to Drive::

        with fake_colab_cli() as cli:
            first = cli.run("train.py", drivemount=True)
            second = cli.run("train.py", drivemount=True)  # resumes from Drive

    Args:
        root: Folder standing for the VMs' ``/`` and the fake Drive (default: a new temporary
            folder, removed afterwards).
        gpu: What each VM reports (a name from :data:`GPUS`); torch still computes on this machine.

    Yields:
        The :class:`FakeColabCLI`.
    """
    if gpu is not None:
        _gpus(gpu, 1)  # an unknown name fails here, before any run
    made = root is None
    base = Path(tempfile.mkdtemp(prefix="colabkit-fake-colab-cli-")) if root is None else Path(root)
    try:
        yield FakeColabCLI(base.resolve(), gpu)
    finally:
        if made:
            shutil.rmtree(base, ignore_errors=True)


def _cli_payload(script: Path, args: list[str], env: Mapping[str, str]) -> str:
    """The cell ``colab run`` sends: its prelude, then the script without its shebang line."""
    body = script.read_text(encoding="utf-8")
    if body.startswith("#!"):
        body = body.partition("\n")[2]
    argv = ", ".join(repr(a) for a in [script.name, *args])
    lines = [
        "import sys, warnings",
        f"sys.argv = [{argv}]",
        "__name__ = '__main__'",
        "warnings.filterwarnings('ignore', message=\"To exit: use\")",
    ]
    if env:
        lines.append("import os")
        lines.extend(f"os.environ[{key!r}] = {value!r}" for key, value in env.items())
    return "\n".join(lines) + "\n" + body


def _exit_status(exc: SystemExit) -> int:
    """``sys.exit(x)`` as the CLI turns it into its own status (as CPython would)."""
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _serve_colab_run(config: Mapping[str, Any]) -> int:
    """The VM's side of one fake ``colab run``: a Colab kernel that runs one cell, then dies."""
    import traceback

    shell = _shell("google.colab._shell", "Shell")
    events = _Events()
    shell.events = events  # type: ignore[attr-defined]
    script = Path(config["script"])
    with contextlib.ExitStack() as stack:
        fake = stack.enter_context(fake_colab(config["root"], gpu=config["gpu"], notebook=True))
        fake.shell = shell
        # colab run sets sys.argv to the script's in its prelude: the kernel's argv is what the cell left.
        stack.enter_context(use_probe(dataclasses.replace(current_probe(), argv=lambda: sys.argv)))
        if config["drivemount"]:
            with contextlib.redirect_stdout(io.StringIO()):  # `colab drivemount` printed that, earlier
                fake._mount("/content/drive")
        os.chdir(fake.path("/content"))
        code = compile(_cli_payload(script, list(config["args"]), config["env"]), script.name, "exec")
        namespace: dict[str, Any] = {"__name__": "__main__"}
        status = 0
        events.trigger("pre_run_cell")
        try:
            exec(code, namespace)  # noqa: S102 - a kernel runs the cell it is sent
        except SystemExit as exc:
            status = _exit_status(exc)
        except BaseException:
            traceback.print_exc()
            status = 1
        events.trigger("post_run_cell")
        sys.stdout.flush()
        sys.stderr.flush()
    return status


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


if __name__ == "__main__":
    # `python -m colabkit.testing colab-run CONFIG`: the VM side of FakeColabCLI.run.
    import json

    if sys.argv[1:2] != ["colab-run"] or len(sys.argv) != 3:
        sys.exit("usage: python -m colabkit.testing colab-run CONFIG_JSON (used by fake_colab_cli)")
    _status = _serve_colab_run(json.loads(sys.argv[2]))
    # The CLI shuts the kernel down and releases the VM: no atexit, no finalizers.
    os._exit(_status)
