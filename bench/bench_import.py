"""How long `import colabkit` takes, against `import json` in the same interpreter setup.

Run: .venv/bin/python bench/bench_import.py
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cold_import(module: str, runs: int = 7) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import {module}"], check=True, cwd=ROOT)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def self_time(module: str) -> float:
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"], capture_output=True, text=True, cwd=ROOT
    ).stderr
    last = [line for line in out.splitlines() if line.rstrip().endswith(f"| {module}")][-1]
    return int(last.split("|")[1]) / 1e6


if __name__ == "__main__":
    baseline = cold_import("json")
    ours = cold_import("colabkit")
    print(f"interpreter + import json : {baseline * 1000:7.1f} ms")
    print(f"interpreter + import colabkit: {ours * 1000:7.1f} ms")
    print(f"import colabkit (cumulative, -X importtime): {self_time('colabkit') * 1000:.1f} ms (budget 100 ms)")
