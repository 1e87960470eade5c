"""Shared fixtures: every test starts with fresh once-only notices and device checks."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def pytest_configure(config: pytest.Config) -> None:
    # A runner started as a background job (CI, `cmd &`) inherits SIGINT as ignored, and so
    # would every child process; colabkit rightly keeps ignored signals ignored, which would
    # make the Ctrl-C tests meaningless. Tests run as if started from a terminal.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _fresh_colabkit_state() -> Iterator[None]:
    from colabkit import _notify

    _notify.reset_once()
    device = sys.modules.get("colabkit.device")
    if device is not None:
        device._checked.clear()  # type: ignore[attr-defined]
    yield
    _notify.reset_once()


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
