"""Shared fixtures: every test starts with fresh once-only notices and device checks."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


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
