"""Shared fixtures, and the guard every test runs under.

Every test starts with fresh once-only notices and device checks.

The guard (:func:`_guard`) fails a test that leaves something behind:

- threads: a non-daemon thread, or any thread named ``colabkit-*``, it started and that is
  still alive after a short grace join;
- the environment: ``os.environ`` differs afterwards (it is put back, and the keys named);
- files outside ``tmp_path``: new or changed files in this repository's working tree, new
  entries in the home folder or in the working directory.

Warnings are errors in the test run (``filterwarnings`` in pyproject.toml); a test that
expects one says so with ``pytest.warns`` or ``@pytest.mark.filterwarnings``.

Escape hatch, for a test that legitimately leaves one of these behind (say so in a comment)::

    @pytest.mark.allow_leaks("threads", "env", "files")  # any subset
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LEAK_KINDS = ("threads", "env", "files")
THREAD_GRACE_S = 5.0  # generous: a busy 2-core machine may be slow to finish a background commit
# Tool and interpreter caches, and what git ignores as build output: never a test's doing.
# Set by others, not by the test: pytest per test phase; torch's inductor once, on first use,
# to the cache folder it picked (torch/_inductor/runtime/cache_dir_utils.py).
NOT_THE_TESTS = {"PYTEST_CURRENT_TEST", "TORCHINDUCTOR_CACHE_DIR"}
SKIPPED_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", "build", "dist"}


def pytest_configure(config: pytest.Config) -> None:
    # A runner started as a background job (CI, `cmd &`) inherits SIGINT as ignored, and so
    # would every child process; colabkit rightly keeps ignored signals ignored, which would
    # make the Ctrl-C tests meaningless. Tests run as if started from a terminal.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    from colabkit import versions

    if versions.torch_version()[:2] < (2, 5):
        # torch before 2.5 starts inductor's compile process pool (a non-daemon thread that
        # lives as long as the process) at the first torch.compile() call; compiling in the
        # calling thread keeps the leak guard meaningful on the floor torch.
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    config.addinivalue_line(
        "markers",
        "allow_leaks(*kinds): the test may leave " + ", ".join(LEAK_KINDS) + " behind (see tests/conftest.py)",
    )


def _tree(root: Path) -> dict[str, int]:
    """Files under ``root`` (caches skipped) with their modification times."""
    found: dict[str, int] = {}
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                # .venv-floor: the floor job's venv (make test-floor), a build output like .venv.
                if (
                    entry.name not in SKIPPED_DIRS
                    and not entry.name.startswith(".venv")
                    and not entry.name.endswith(".egg-info")
                ):
                    stack.append(Path(entry.path))
            else:
                try:
                    found[entry.path] = entry.stat(follow_symlinks=False).st_mtime_ns
                except OSError:
                    continue
    return found


def _environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in NOT_THE_TESTS}


def _names(folder: Path) -> set[str]:
    try:
        return set(os.listdir(folder))
    except OSError:
        return set()


def _leaked_threads(before: set[threading.Thread]) -> list[str]:
    suspects = [
        t
        for t in threading.enumerate()
        if t not in before and t.is_alive() and (not t.daemon or t.name.startswith("colabkit"))
    ]
    deadline = time.monotonic() + THREAD_GRACE_S
    for thread in suspects:
        thread.join(max(0.0, deadline - time.monotonic()))
    return [f"{t.name} (daemon={t.daemon})" for t in suspects if t.is_alive()]


@pytest.fixture(autouse=True)
def _guard(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test if it leaked threads, changed os.environ or wrote files outside tmp_path.

    Autouse fixtures are set up first, so this one is torn down last: after monkeypatch
    has undone its changes and fixtures have closed what they opened.
    """
    marker = request.node.get_closest_marker("allow_leaks")
    allowed = set(marker.args) if marker else set()
    unknown = allowed - set(LEAK_KINDS)
    if unknown:
        pytest.fail(f"allow_leaks{tuple(sorted(unknown))}: unknown kind; use any of {LEAK_KINDS}")
    threads = set(threading.enumerate())
    environment = _environment()
    home, cwd = Path.home(), Path.cwd()
    tree, home_names, cwd_names = _tree(ROOT), _names(home), _names(cwd)

    yield

    problems: list[str] = []
    if "threads" not in allowed:
        if "compile_caches" in request.fixturenames:
            threads |= {t for t in threading.enumerate() if t.name.startswith(COMPILE_POOL_THREADS)}
        leaked = _leaked_threads(threads)
        if leaked:
            problems.append(f"threads still running: {', '.join(leaked)}")
    if "env" not in allowed and _environment() != environment:
        now = _environment()
        changed = sorted(k for k in environment.keys() | now.keys() if environment.get(k) != now.get(k))
        for key in changed:
            if key in environment:
                os.environ[key] = environment[key]
            else:
                del os.environ[key]
        problems.append(f"os.environ changed (now put back): {', '.join(changed)}; use monkeypatch.setenv/delenv")
    if "files" not in allowed:
        after = _tree(ROOT)
        written = sorted(path for path, mtime in after.items() if tree.get(path) != mtime)
        written += [str(home / name) for name in sorted(_names(home) - home_names)]
        if cwd != ROOT:
            written += [str(cwd / name) for name in sorted(_names(cwd) - cwd_names)]
        if written:
            problems.append(f"wrote outside tmp_path: {', '.join(written[:5])}" + (" ..." if len(written) > 5 else ""))
    if problems:
        pytest.fail("; ".join(problems) + "  (see tests/conftest.py for @pytest.mark.allow_leaks)", pytrace=False)


@pytest.fixture(autouse=True)
def _fresh_colabkit_state() -> Iterator[None]:
    from colabkit import _notify

    _notify.reset_once()
    device = sys.modules.get("colabkit.device")
    if device is not None:
        device._checked.clear()  # type: ignore[attr-defined]
    yield
    _notify.reset_once()


#: What torch.compile and triton write or set: their caches, and the ptxas triton is pointed at.
COMPILE_CACHE_VARS = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "TRITON_HOME")
COMPILE_SET_VARS = ("TRITON_PTXAS_PATH", "_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR")
#: inductor's process-wide pool for compiling kernels: its worker threads live until the process exits.
COMPILE_POOL_THREADS = "ThreadPoolExecutor-"


@pytest.fixture(scope="session")
def _compile_cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # One folder for the session: a graph one test compiled is a cache hit for the next.
    return tmp_path_factory.mktemp("compile-caches")


@pytest.fixture
def compile_caches(_compile_cache_root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """For tests that compile: inductor's and triton's caches in a temporary folder, not /tmp or ~/.triton.

    torch sets ``TRITON_PTXAS_PATH`` (CUDA) and inductor ``TORCHINDUCTOR_CACHE_DIR`` on first
    use; monkeypatch puts every one of them back at teardown, before the leak guard looks.
    Returns the inductor cache folder.
    """
    for name in COMPILE_CACHE_VARS:
        folder = _compile_cache_root / name.lower()
        folder.mkdir(exist_ok=True)
        monkeypatch.setenv(name, str(folder))
    for name in COMPILE_SET_VARS:
        monkeypatch.setenv(name, "")  # recorded as it was (unset, usually), so teardown puts it back
        monkeypatch.delenv(name)
    return _compile_cache_root / "torchinductor_cache_dir"


@pytest.fixture
def subprocess_env() -> dict[str, str]:
    """Environment for child Python processes that import this checkout's colabkit."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


#: The Jupyter kernel notebook tests run in: this virtualenv's Python (see :func:`kernel_dir`).
KERNEL = "colabkit-tests"


@pytest.fixture(scope="session")
def kernel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A JUPYTER_PATH folder whose kernelspec ``colabkit-tests`` runs this virtualenv's Python.

    Written to a temporary folder, so no system-wide "python3" kernel can be picked by mistake.
    """
    folder = tmp_path_factory.mktemp("jupyter")
    spec = folder / "kernels" / KERNEL
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": KERNEL, "language": "python"}))
    return folder
