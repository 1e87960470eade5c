"""The demo end to end in real subprocesses, twice: staged zip, SIGKILL mid-epoch, resume, accuracy, charts."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "demo.py"


@pytest.mark.slow
def test_demo_survives_a_sigkill_mid_epoch_reaches_95_percent_and_reruns(
    tmp_path: Path, subprocess_env: dict[str, str]
) -> None:
    env = {
        **subprocess_env,
        "COLABKIT_DRIVE_DIR": str(tmp_path / "drive"),  # the Drive stand-in
        "COLABKIT_DATA_DIR": str(tmp_path / "local"),  # fast local disk
        "MPLBACKEND": "Agg",
    }

    def run_demo() -> str:
        result = subprocess.run(
            [sys.executable, str(DEMO), "--fast"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert result.returncode == 0, f"demo failed:\n{result.stdout}\n{result.stderr[-3000:]}"
        return result.stdout

    out = run_demo()

    project = tmp_path / "drive" / "MyDrive" / "colabkit-demo"
    assert (project / "data" / "digits.zip").is_file()
    # The child really was killed mid-epoch and the second run resumed from a mid-epoch checkpoint.
    paused = next(line for line in out.splitlines() if "paused at step" in line)
    assert "epoch 2, batch 10" in paused
    assert "killed the training process" in out and "with SIGKILL" in out
    # A checkpoint every 5 steps: the resume starts inside epoch 2 (steps 21-40), not at its start.
    assert re.search(r"resuming from \S*step-0000000(25|30)-", out), out

    def reported_accuracy(output: str) -> str:
        return output.split("test accuracy of the best checkpoint: ")[1].split("%")[0]

    accuracy = float(reported_accuracy(out)) / 100
    assert accuracy >= 0.95
    for chart in ("history.png", "devices.png"):
        assert (project / "results" / chart).read_bytes().startswith(b"\x89PNG")
    assert f"results: {project / 'results'}" in out
    if not torch.cuda.is_available():
        assert "no GPU was found" in out

    # `python examples/demo.py` a second time (as a user would) works the same way: the zip on
    # Drive is reused, and the last run's finished checkpoints do not stop run 1 from being killed.
    assert "wrote the digits dataset" in out
    charts_before = {
        chart: (project / "results" / chart).stat().st_mtime_ns for chart in ("history.png", "devices.png")
    }
    again = run_demo()
    assert "wrote the digits dataset" not in again
    assert "paused at step 30 (epoch 2, batch 10)" in again and "killed the training process" in again
    assert re.search(r"resuming from \S*step-0000000(25|30)-", again), again
    # Seeded weights and an exact resume: the same accuracy to the last digit, wherever the kill landed.
    assert reported_accuracy(again) == reported_accuracy(out)
    for chart, before in charts_before.items():
        assert (project / "results" / chart).stat().st_mtime_ns > before
