"""colabkit.display: where output goes, bars that suit it, numbers for people."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from colabkit import display
from colabkit.testing import FakeScreen


def test_numbers_for_people() -> None:
    assert display.format_count(11490) == "11.5k"
    assert display.format_count(812) == "812"
    assert display.format_count(0.42) == "0.42"
    assert display.format_count(1_234_567) == "1.23M"
    assert display.format_count(999_999) == "1M"  # rounds up into the next unit, not "1e+03k"
    assert display.format_duration(92) == "1m 32s"
    assert display.format_duration(8.34) == "8.3s"
    assert display.format_duration(0.42) == "0.42s"
    assert display.format_duration(3725) == "1h 02m"
    assert display.format_duration(2 * 86400 + 3 * 3600) == "2d 03h"
    assert display.format_about(6000) == "about 1 h 40 min"
    assert display.format_about(55 * 60) == "about 55 min"
    assert display.format_about(7200) == "about 2 h"
    assert display.format_about(20) == "under a minute"
    assert display.format_memory(4.2 * 2**30, 15 * 2**30) == "4.2/15.0 GB"
    assert display.format_value(0.693147) == "0.6931"
    assert display.format_value(1.0) == "1.0000"
    assert display.format_value(1.5e-5) == "1.5e-05"
    assert display.format_value(float("nan")) == "nan"


def _run_bar(kind: str, steps: int = 12, pause: float = 0.0) -> FakeScreen:
    screen = FakeScreen(kind)  # type: ignore[arg-type]
    with display.use_screen(screen):
        bar = display.bar(steps, desc="epoch 1/1", unit="batch")
        for index in range(steps):
            bar.set(index + 1, note="loss 0.5000")
            time.sleep(pause)
        bar.restart(4, desc="epoch 1/1 validate")
        bar.update(4)
        bar.close()
    return screen


def test_notebook_bar_is_one_output_replaced_in_place_and_never_escape_codes() -> None:
    screen = _run_bar("notebook", steps=12, pause=0.1)
    assert len(screen.outputs) == 1  # one display handle for the bar's whole life
    versions = [v["text/plain"] for v in screen.outputs[0].versions]
    assert versions[0].startswith("epoch 1/1:   0%")
    assert any("/12 [" in v and "loss 0.5000" in v for v in versions)
    assert any(v.startswith("epoch 1/1 validate:") for v in versions)
    assert versions[-1] == ""  # leave=False: the bar goes away when closed
    # Throttled: 12 updates 0.1 s apart redraw at most every NOTEBOOK_SECONDS, not 12 times.
    assert len(versions) < 12
    assert not any("\x1b[" in v or "\r" in v for v in versions)
    assert screen.lines == [] and screen.stderr.getvalue() == ""


def test_log_bar_prints_nothing_for_short_work_and_a_line_per_interval_for_long(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    screen = _run_bar("log")
    assert screen.lines == [] and screen.outputs == []

    monkeypatch.setattr(display, "LOG_SECONDS", 0.05)
    screen = _run_bar("log", steps=6, pause=0.06)
    assert 2 <= len(screen.lines) <= 6
    assert all(line.startswith("epoch 1/1") and "\x1b[" not in line and "\r" not in line for line in screen.lines)


def test_terminal_bar_is_tqdms_text_bar() -> None:
    screen = _run_bar("terminal")
    written = screen.stderr.getvalue()
    assert "\r" in written and "epoch 1/1" in written
    assert screen.outputs == []


def test_widgets_bar_is_tqdm_notebook() -> None:
    screen = _run_bar("widgets")
    assert [bar["desc"] for bar in screen.widget_bars] == ["epoch 1/1"]  # one bar, restarted for validation


def test_disabled_bar_shows_nothing() -> None:
    screen = FakeScreen("notebook")
    with display.use_screen(screen), display.bar(3, enabled=False) as bar:
        bar.update(3)
    assert screen.outputs == [] and screen.lines == []


def test_detect_outside_a_kernel() -> None:
    # A child without a TTY: "log". (The test runner's own stderr may be a terminal.)
    code = "from colabkit import display; print(display.detect(), display.in_notebook())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["log", "False"]


def test_detect_in_a_kernel_with_and_without_ipywidgets(subprocess_env: dict[str, str], tmp_path: Path) -> None:
    pytest.importorskip("ipykernel")
    pytest.importorskip("ipywidgets")
    # A real IPython kernel shell object (ZMQInteractiveShell with a kernel attached).
    code = textwrap.dedent(
        """
        import sys
        if sys.argv[1] == "blocked":
            sys.modules["ipywidgets"] = None  # as if ipywidgets were not installed
        from ipykernel.inprocess.manager import InProcessKernelManager
        manager = InProcessKernelManager()
        manager.start_kernel()
        shell = manager.kernel.shell
        import IPython
        assert IPython.get_ipython() is shell and shell.kernel is not None
        from colabkit import display
        print(display.detect())
        """
    )
    subprocess_env["IPYTHONDIR"] = str(tmp_path)  # the kernel's profile folder, not the home folder's
    kinds = []
    for mode in ("installed", "blocked"):
        result = subprocess.run(
            [sys.executable, "-c", code, mode], capture_output=True, text=True, env=subprocess_env, timeout=120
        )
        assert result.returncode == 0, result.stderr
        kinds.append(result.stdout.split()[-1])
    assert kinds == ["widgets", "notebook"]
