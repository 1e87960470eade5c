"""``make gpu-check``: the CUDA tests and bench_gpu.py on one GPU, then a short report.

Runs ``pytest -m cuda tests/test_cuda.py`` and ``bench/bench_gpu.py``, each under its own
time limit (together under 10 minutes), and writes a Markdown report (``--report``, default
``gpu-check-report.md``): the device, torch and CUDA versions, pass / fail / skip per check,
and the benchmark's numbers. Exits 1 when a check failed or the benchmark did not finish.

Without a GPU it says plainly that no GPU is present, writes that to the report, and exits 0:
there is nothing to check, which is not a failure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

NO_GPU = (
    "gpu-check: no GPU is present (torch.cuda.is_available() is False), so nothing was checked; "
    "run `make gpu-check` on a machine with an NVIDIA GPU (Colab: Runtime > Change runtime type > GPU)"
)


def device_lines() -> list[str]:
    import torch

    index = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    driver = "unknown"
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        )  # fmt: skip
        driver = smi.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    return [
        f"- device: {props.name} (compute capability {props.major}.{props.minor}, "
        f"{props.total_memory / 2**30:.1f} GiB, {torch.cuda.device_count()} visible)",
        f"- torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
        f"driver {driver}",
        f"- Python {platform.python_version()} on {platform.platform()}",
    ]


def run_tests(timeout: float, folder: Path) -> tuple[list[tuple[str, str, float, str]], str]:
    """(name, outcome, seconds, message) per test, and a problem with the run itself (or "")."""
    junit = folder / "cuda-tests.xml"
    command = [
        sys.executable, "-m", "pytest", str(ROOT / "tests" / "test_cuda.py"), "-m", "cuda", "-q",
        "-p", "no:cacheprovider", f"--junitxml={junit}", "-o", "junit_family=xunit1",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return [], f"the CUDA tests ran past {timeout:.0f} s and were stopped"
    sys.stdout.write(done.stdout[-4000:])
    if not junit.exists():
        return [], f"pytest wrote no results (exit status {done.returncode}): {done.stderr[-800:]}"
    results = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                outcome = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[tag]
                message = (found.get("message") or "").splitlines()[0][:160] if found.get("message") else ""
                break
        results.append((case.get("name", "?"), outcome, float(case.get("time", 0.0)), message))
    problem = "" if done.returncode in (0, 1) else f"pytest exit status {done.returncode}"
    return results, problem


def run_bench(timeout: float, folder: Path) -> tuple[dict[str, Any] | None, str]:
    numbers = folder / "bench.json"
    command = [sys.executable, str(ROOT / "bench" / "bench_gpu.py"), "--json", str(numbers)]
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return None, f"bench_gpu.py ran past {timeout:.0f} s and was stopped"
    sys.stdout.write(done.stdout)
    if done.returncode != 0 or not numbers.exists():
        return None, f"bench_gpu.py failed (exit status {done.returncode}): {done.stderr[-800:]}"
    return json.loads(numbers.read_text()), ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=Path, default=Path("gpu-check-report.md"))
    parser.add_argument("--tests-timeout", type=float, default=300.0)
    parser.add_argument("--bench-timeout", type=float, default=300.0)
    parser.add_argument("--skip-bench", action="store_true")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print(NO_GPU)
        args.report.write_text(f"# colabkit gpu-check\n\n{NO_GPU}\n")
        return 0
    from colabkit.device import usable_cuda_devices

    if not usable_cuda_devices():
        message = "gpu-check: a GPU is visible but cannot run a test kernel (see the warning above); nothing checked"
        print(message)
        args.report.write_text(f"# colabkit gpu-check\n\n{message}\n")
        return 1

    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        results, test_problem = run_tests(args.tests_timeout, Path(tmp))
        if args.skip_bench:
            bench, bench_problem = None, "skipped (--skip-bench)"
        else:
            bench, bench_problem = run_bench(args.bench_timeout, Path(tmp))
    report, ok = build_report(
        device_lines(), results, test_problem, bench, bench_problem, seconds=time.monotonic() - started
    )
    args.report.write_text(report)
    print(report)
    return 0 if ok and (bench is not None or args.skip_bench) else 1


def build_report(
    header: list[str],
    results: list[tuple[str, str, float, str]],
    test_problem: str,
    bench: dict[str, Any] | None,
    bench_problem: str,
    *,
    seconds: float,
) -> tuple[str, bool]:
    """The Markdown report, and whether every check that ran passed."""
    lines = ["# colabkit gpu-check", "", *header, ""]
    failed = [r for r in results if r[1] in ("FAILED", "ERROR")]
    lines += ["## Checks (tests/test_cuda.py)", "", "| check | result | seconds | note |", "| --- | --- | --- | --- |"]
    lines += [f"| {name} | {outcome} | {took:.1f} | {message} |" for name, outcome, took, message in results]
    if test_problem:
        lines.append(f"\n**{test_problem}**")
    passed = sum(r[1] == "passed" for r in results)
    lines += ["", f"{passed} passed, {len(failed)} failed, {len(results) - passed - len(failed)} skipped", ""]
    lines += ["## bench_gpu.py", ""]
    if bench is None:
        lines.append(f"**{bench_problem}**")
    else:
        precision = "fp32 (CPU smoke run)" if bench.get("smoke") else "fp16 + GradScaler"
        lines += [
            f"ResNet-18 (32x32), {bench['samples']:,} images on {bench['device']}, batch {bench['batch']}, "
            f"{precision}, last of {bench['epochs']} epochs timed",
            "",
            "| run | images/s | s/epoch | peak MiB | time ratio | speedup |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        augmented = bench.get("augmented", {"runs": {}, "targets": {}})
        for name, n in {**bench["runs"], **augmented["runs"]}.items():
            lines.append(
                f"| {name} | {n['images_per_s']:.0f} | {n['epoch_s']:.2f} | {n['peak_mib']:.0f} | "
                f"{n['time_ratio']:.3f} | {n['speedup']:.2f} |"
            )
        targets = {**bench["targets"], **augmented["targets"]}
        lines += ["", *(f"- target {name}: {'met' if ok else 'NOT met'}" for name, ok in targets.items())]
        if augmented["runs"]:
            lines.append("- augmented rows: time ratio and speedup are against `augmented, hand-written`")
        lines += compile_lines(bench.get("compile"))
    lines += ["", f"gpu-check took {seconds:.0f} s"]
    return "\n".join(lines) + "\n", bool(results) and not failed and not test_problem


def compile_lines(compiled: dict[str, Any] | None) -> list[str]:
    """The compiled-training rows of bench_gpu.py (runs 4-7), when it ran them."""
    if not compiled:
        return []
    lines = ["", "### Compiled training and channels_last (fit's defaults, fast path)", ""]
    lines += ["| run | images/s | vs fit eager |", "| --- | --- | --- |"]
    lines += [f"| {name} | {n['images_per_s']:.0f} | {n['vs_eager']:.2f} |" for name, n in compiled["runs"].items()]
    rerun = compiled["rerun"]
    if "error" in rerun:
        lines += ["", f"**rerun compile time: {rerun['error']}**"]
    else:
        lines += [
            "",
            f"Rerun compile time (fresh process, empty compile caches): {rerun['first_s']:.1f} s without the "
            f"cache, {rerun['second_s']:.1f} s with the checkpoint folder's cache ({rerun['ratio']:.2f}x)",
        ]
    lines += ["", *(f"- target {name}: {'met' if ok else 'NOT met'}" for name, ok in compiled["targets"].items())]
    return lines


if __name__ == "__main__":
    sys.exit(main())
