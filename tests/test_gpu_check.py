"""`make gpu-check` and bench/bench_gpu.py where there is no GPU: they say so plainly and succeed."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _no_gpu_env(subprocess_env: dict[str, str]) -> dict[str, str]:
    return {**subprocess_env, "CUDA_VISIBLE_DEVICES": ""}  # hides a GPU too, where one exists


def _run(command: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)


def test_gpu_check_without_a_gpu_says_so_and_succeeds(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    report = tmp_path / "report.md"
    done = _run([sys.executable, "bench/gpu_check.py", "--report", str(report)], _no_gpu_env(subprocess_env))
    assert done.returncode == 0, done.stderr
    assert "no GPU is present" in done.stdout
    assert "no GPU is present" in report.read_text()


def test_make_gpu_check_runs_the_check(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    report = tmp_path / "report.md"
    done = _run(
        ["make", "--no-print-directory", "gpu-check", f"PY={sys.executable}", f"GPU_REPORT={report}"],
        _no_gpu_env(subprocess_env),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "bench/gpu_check.py" in done.stdout and "no GPU is present" in done.stdout
    assert report.exists()


def test_bench_gpu_without_a_gpu_says_so_and_succeeds(subprocess_env: dict[str, str]) -> None:
    done = _run([sys.executable, "bench/bench_gpu.py"], _no_gpu_env(subprocess_env))
    assert done.returncode == 0, done.stderr
    assert "no GPU is present" in done.stdout and "nothing was measured" in done.stdout


@pytest.mark.slow
def test_cpu_smoke_run_and_the_report_it_makes(
    tmp_path: Path, subprocess_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    numbers = tmp_path / "bench.json"
    done = _run(
        [sys.executable, "bench/bench_gpu.py", "--cpu-smoke", "--json", str(numbers)],
        _no_gpu_env(subprocess_env),
        timeout=280,
    )
    assert done.returncode == 0, done.stderr
    bench = json.loads(numbers.read_text())
    assert list(bench["runs"]) == ["hand-written", "fit (DataLoader)", "fit (fast path)"]
    assert bench["runs"]["hand-written"]["time_ratio"] == 1.0
    assert all(run["images_per_s"] > 0 for run in bench["runs"].values())

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    results, problem = gpu_check.run_tests(240, tmp_path)  # without a GPU every CUDA test is skipped
    assert not problem and results and {outcome for _, outcome, _, _ in results} == {"skipped"}
    report, ok = gpu_check.build_report(["- device: none"], results, problem, bench, "", seconds=1.0)
    assert ok
    assert "| test_get_device_picks_cuda | skipped |" in report
    assert "| fit (fast path) |" in report and "target fit (fast path) speedup" in report
    failing = [("test_x", "FAILED", 0.1, "boom")]
    assert not gpu_check.build_report([], failing, "", bench, "", seconds=1.0)[1]
