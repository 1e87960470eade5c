"""The fakes and colabkit against Colab's real ``google.colab`` modules.

CI cannot fetch googlecolab/colabtools, so these run only when
``COLABKIT_COLABTOOLS_SRC`` names an extracted tree (the folder holding
``google/colab/``), e.g.::

    git -C colabtools archive HEAD google/colab | tar -x -C /tmp/colabtools-src
    COLABKIT_COLABTOOLS_SRC=/tmp/colabtools-src pytest tests/test_colabtools_real.py

The real modules are loaded as they are; only their lowest-level I/O (the
browser request, the pexpect shell that drives DriveFS, ``/bin/mount``) is
replaced.
"""

from __future__ import annotations

import importlib
import inspect
import os
import subprocess
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from colabkit import drive as ck_drive
from colabkit.errors import DriveError, PlatformError
from colabkit.testing import fake_colab

SRC = os.environ.get("COLABKIT_COLABTOOLS_SRC")
pytestmark = pytest.mark.skipif(not SRC, reason="set COLABKIT_COLABTOOLS_SRC to an extracted colabtools tree")


@pytest.fixture
def real(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], types.ModuleType]]:
    """Import ``google.colab.<name>`` from the real tree (``output`` is a stub: its package pulls in widgets)."""
    pytest.importorskip("pexpect")
    pytest.importorskip("psutil")
    pytest.importorskip("zmq")
    assert SRC is not None
    saved = {name: mod for name, mod in sys.modules.items() if name == "google" or name.startswith("google.")}
    for name in [n for n in saved if n.startswith("google.colab")]:
        del sys.modules[name]
    google = sys.modules.get("google") or types.ModuleType("google")
    google.__path__ = list(getattr(google, "__path__", []))  # type: ignore[attr-defined]
    sys.modules["google"] = google
    package = types.ModuleType("google.colab")
    package.__path__ = [str(Path(SRC) / "google" / "colab")]  # type: ignore[attr-defined]
    sys.modules["google.colab"] = package
    monkeypatch.setattr(google, "colab", package, raising=False)
    output = types.ModuleType("google.colab.output")
    output.__path__ = [str(Path(SRC) / "google" / "colab" / "output")]  # type: ignore[attr-defined]
    output.eval_js = lambda *a, **k: None  # type: ignore[attr-defined]
    output.clear = lambda *a, **k: None  # type: ignore[attr-defined]
    sys.modules["google.colab.output"] = output
    package.output = output  # type: ignore[attr-defined]
    try:
        yield lambda name: importlib.import_module(f"google.colab.{name}")
    finally:
        for name in [n for n in sys.modules if n == "google" or n.startswith("google.")]:
            del sys.modules[name]
        sys.modules.update(saved)


def _params(fn: Callable[..., Any]) -> list[tuple[str, Any]]:
    return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]


def test_fake_signatures_and_errors_match_the_real_modules(real: Callable[[str], types.ModuleType]) -> None:
    errors, message, drive, files = real("errors"), real("_message"), real("drive"), real("files")
    js = importlib.import_module("google.colab.output._js")
    pairs = [
        (drive.mount, "drive", "mount"),
        (drive.flush_and_unmount, "drive", "flush_and_unmount"),
        (files.upload, "files", "upload"),
        (files.upload_file, "files", "upload_file"),
        (files.download, "files", "download"),
        (files.view, "files", "view"),
        (js.eval_js, "output", "eval_js"),
        (message.blocking_request, "_message", "blocking_request"),
    ]
    real_errors = {name: getattr(errors, name) for name in ("Error", "AuthorizationError", "WidgetException")}
    real_message_error = message.MessageError
    for name in [n for n in sys.modules if n.startswith("google.colab")]:
        del sys.modules[name]
    with fake_colab():
        for real_fn, module, name in pairs:
            fake_fn = getattr(importlib.import_module(f"google.colab.{module}"), name)
            assert _params(fake_fn) == _params(real_fn), f"{module}.{name}"
        from google.colab import _message as fake_message
        from google.colab import errors as fake_errors

        for name, cls in real_errors.items():
            fake_cls = getattr(fake_errors, name)
            assert [b.__name__ for b in fake_cls.__mro__] == [b.__name__ for b in cls.__mro__], name
        assert [b.__name__ for b in fake_message.MessageError.__mro__] == [
            b.__name__ for b in real_message_error.__mro__
        ]


def _uploads(files: types.ModuleType, monkeypatch: pytest.MonkeyPatch, data: dict[str, bytes]) -> None:
    monkeypatch.setattr(files, "_upload_files", lambda multiple: dict(data))


def test_upload_and_upload_file_agree_with_the_real_files_module(
    real: Callable[[str], types.ModuleType], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = real("files")
    data = {"data.csv": b"new", "b.txt": b"b"}
    results = {}
    for label in ("real", "fake"):
        where = tmp_path / label
        (where / "in").mkdir(parents=True)
        (where / "in" / "data.csv").write_bytes(b"old")
        monkeypatch.chdir(where)
        if label == "real":
            _uploads(files, monkeypatch, data)
            results[label] = (files.upload("in"), files.upload("made/here"))
            with pytest.raises(ValueError) as none:
                _uploads(files, monkeypatch, {})
                files.upload_file("x")
            with pytest.raises(ValueError) as many:
                _uploads(files, monkeypatch, data)
                files.upload_file("x")
            messages = (str(none.value), str(many.value))
            monkeypatch.setattr(files._IPython, "get_ipython", lambda: None)
            (where / "m.pt").write_bytes(b"m")
            with pytest.raises(AttributeError):
                files.download("m.pt")  # Colab's download needs a kernel
        else:
            saved = {n: m for n, m in sys.modules.items() if n.startswith("google.colab")}
            for name in saved:
                del sys.modules[name]
            try:
                with fake_colab(notebook=False) as colab:
                    from google.colab import files as fake_files

                    colab.uploads = dict(data)
                    first = fake_files.upload("in")
                    colab.uploads = dict(data)
                    results[label] = (first, fake_files.upload("made/here"))
                    with pytest.raises(ValueError) as none:
                        fake_files.upload_file("x")
                    colab.uploads = dict(data)
                    with pytest.raises(ValueError) as many:
                        fake_files.upload_file("x")
                    assert (str(none.value), str(many.value)) == messages
                    (where / "m.pt").write_bytes(b"m")
                    with pytest.raises(AttributeError):
                        fake_files.download("m.pt")
            finally:
                sys.modules.update(saved)
        results[label + "-tree"] = sorted(str(p.relative_to(where)) for p in where.rglob("*"))  # type: ignore[assignment]
    assert results["real"] == results["fake"]
    assert results["real-tree"] == results["fake-tree"]


class _Shell:
    """Stands for pexpect's PopenSpawn: answers the case loop with a scripted outcome."""

    outcome: int | BaseException = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def sendline(self, line: str) -> None:
        pass

    def expect(self, pattern: Any) -> int:
        if isinstance(pattern, list):
            if isinstance(self.outcome, BaseException):
                raise self.outcome
            return self.outcome
        return 0

    def kill(self, sig: int) -> None:
        pass

    def wait(self) -> int:
        return 0


class _Os:
    """``os`` for the real drive module, with hosted Colab's files and variables."""

    def __init__(self, environ: dict[str, str], markers: set[str]) -> None:
        self.environ = environ
        self.path = types.SimpleNamespace(
            **{name: getattr(os.path, name) for name in dir(os.path) if not name.startswith("_")}
        )
        self.path.exists = lambda p: p in markers or os.path.exists(p)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


@pytest.fixture
def real_drive(
    real: Callable[[str], types.ModuleType], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> types.ModuleType:
    drive = real("drive")
    environ = {
        "HOME": str(tmp_path / "root"),
        "CLOUDSDK_CONFIG": str(tmp_path / "content" / ".config"),
        "TBE_EPHEM_CREDS_ADDR": "127.0.0.1:1",
    }
    monkeypatch.setattr(drive, "_os", _Os(environ, {"/var/colab/hostname"}))
    requests: list[tuple[str, Any]] = []

    def blocking_request(request_type: str, request: Any = "", timeout_sec: Any = 5, parent: Any = None) -> None:
        requests.append((request_type, timeout_sec))

    monkeypatch.setattr(drive, "_message", types.SimpleNamespace(blocking_request=blocking_request))
    monkeypatch.setattr(drive._popen_spawn, "PopenSpawn", _Shell)
    monkeypatch.setattr(drive._psutil, "process_iter", lambda: [])
    monkeypatch.setattr(drive._subprocess, "call", lambda *a, **k: 1)
    drive.requests = requests  # type: ignore[attr-defined]
    return drive


def test_real_check_order_matches_the_fake(real_drive: types.ModuleType) -> None:
    env = real_drive._os.environ
    with pytest.raises(ValueError, match="space"):
        real_drive.mount("/x/my drive")
    env["VERTEX_PRODUCT"] = "COLAB_ENTERPRISE"
    with pytest.raises(ValueError, match="space"):
        real_drive.mount("/x/my drive")  # the space before Enterprise, as in the fake
    with pytest.raises(NotImplementedError, match="Colab Enterprise"):
        real_drive.mount("/x/drive")
    del env["VERTEX_PRODUCT"], env["TBE_EPHEM_CREDS_ADDR"]
    with pytest.raises(KeyError, match="TBE_EPHEM_CREDS_ADDR"):
        real_drive.mount("/x/drive")
    assert real_drive.requests == []  # before the authorisation request, as in the fake
    real_drive._os.path.exists = os.path.exists
    with pytest.raises(NotImplementedError, match="unsupported in this environment"):
        real_drive.mount("/x/my drive")  # /var/colab/hostname before everything


@pytest.mark.parametrize(
    ("outcome", "error", "match"),
    [
        (1, DriveError, r"failed: mount failed; run mount_drive\(\) again"),
        (4, DriveError, r"another \(e\.g\. personal\) Google account"),
        ("timeout", DriveError, r"did not answer within 40 s \(pexpect TIMEOUT"),
        ("eof", DriveError, r"pexpect EOF"),
        ("creds", PlatformError, r"TBE_EPHEM_CREDS_ADDR"),
    ],
)
def test_colabkit_translates_the_real_mount_failures(
    real_drive: types.ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, outcome: Any, error: type, match: str
) -> None:
    import pexpect

    shell: Any = {"timeout": pexpect.TIMEOUT("Timeout exceeded."), "eof": pexpect.EOF("End Of File (EOF).")}
    _Shell.outcome = shell.get(outcome, outcome if isinstance(outcome, int) else 0)
    if outcome == "creds":
        del real_drive._os.environ["TBE_EPHEM_CREDS_ADDR"]
    mountpoint = tmp_path / "mnt"
    with fake_colab():
        monkeypatch.setattr(ck_drive, "_colab_drive", lambda: real_drive)
        with pytest.raises(error, match=match):
            ck_drive.mount_drive(str(mountpoint), timeout=10)


def test_real_auth_timeout_of_zero_and_colabkits_floor(real_drive: types.ModuleType, tmp_path: Path) -> None:
    _Shell.outcome = 1
    with pytest.raises(ValueError, match="mount failed"):
        real_drive.mount(str(tmp_path / "mnt"), timeout_ms=500)
    assert real_drive.requests[-1] == ("request_auth", 0)  # Colab's own arithmetic: 0 means no timeout
    with pytest.raises(ValueError, match="mount failed"):
        real_drive.mount(str(tmp_path / "mnt"), timeout_ms=ck_drive._timeout_ms(0.5))
    assert real_drive.requests[-1] == ("request_auth", 1)


def test_colabkit_translates_the_real_flush_failures(
    real_drive: types.ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    def listing_fails(*args: Any, **kwargs: Any) -> bytes:
        raise subprocess.CalledProcessError(1, ["/bin/mount"])

    with fake_colab() as colab:
        ck_drive.mount_drive()
        monkeypatch.setattr(ck_drive, "_colab_drive", lambda: real_drive)
        monkeypatch.setattr(real_drive._subprocess, "check_output", listing_fails)
        with pytest.raises(DriveError, match=r"listing the mounts"):
            ck_drive.flush_drive()
        monkeypatch.setattr(real_drive._subprocess, "check_output", lambda *a, **k: b"drive on /x type fuse.drive")
        monkeypatch.setattr(real_drive.mount, "_DEBUG", False)

        def no_binary(*args: Any, **kwargs: Any) -> Any:
            raise FileNotFoundError(2, "No such file or directory", "/opt/google/drive/drive")

        monkeypatch.setattr(real_drive._subprocess, "Popen", no_binary)
        with pytest.raises(DriveError, match=r"/opt/google/drive/drive"):
            ck_drive.flush_drive()
        del real_drive._os.environ["CLOUDSDK_CONFIG"]
        with pytest.raises(PlatformError, match=r"CLOUDSDK_CONFIG"):
            ck_drive.flush_drive()
        assert colab.calls_to("drive.mount")
