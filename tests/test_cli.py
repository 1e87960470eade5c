"""The command line, run as a real subprocess."""

from __future__ import annotations

import subprocess
import sys


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "colabkit", *args], capture_output=True, text=True, env=env)


def test_info_prints_the_table(subprocess_env: dict[str, str]) -> None:
    result = run("info", env=subprocess_env)
    assert result.returncode == 0, result.stderr
    for label in ("runtime", "python", "torch", "accelerator", "ram", "data dir", "drive"):
        assert label in result.stdout


def test_help_and_unknown_command(subprocess_env: dict[str, str]) -> None:
    result = run(env=subprocess_env)
    assert result.returncode == 0 and "commands:" in result.stdout
    result = run("frobnicate", env=subprocess_env)
    assert result.returncode == 2
    assert "unknown command 'frobnicate'" in result.stderr
