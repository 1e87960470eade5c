"""Benchmark stage() against the usual shell and Python recipes; prints wall times and ratios.

    python bench/bench_stage.py [--files 20000] [--big-files 70000] [--repeat 5] [--disk-dir /var/tmp]

1. A zip of 20,000 files of ~3 KB in 10 class folders (deflate), on tmpfs (/dev/shm)
   and on disk: stage() vs ``cp`` + ``unzip -q`` and vs ``zipfile.ZipFile.extractall``.
   Targets: stage <= 0.49x cp+unzip on tmpfs (0.9x on disk), and >= 1.5x faster than extractall.
2. The same with 70,000 files (MNIST as PNG folders), past 65,535 entries, so the zip
   has a zip64 end record. Target on tmpfs: stage <= 0.5x cp+unzip.
3. A Deflate64 zip (7-Zip's ``-mm=Deflate64``) of 20,000 files, which stage() reads
   through the system ``unzip``: stage() vs ``unzip -q`` alone. Target: <= 1.2x.
4. A folder of 2,000 files read through a filesystem that adds 5 ms to every file
   open (Drive-like latency, injected through the file-ops seam ``colabkit._io.ops``):
   stage() vs ``shutil.copytree`` on the same slow source. Target: >= 10x faster.
5. Re-running stage() on the unchanged 20,000-file zip. Target: < 50 ms.

Runs are interleaved and repeated; ratios use the median of each method.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from colabkit import _io  # noqa: E402
from colabkit.data.stage import stage  # noqa: E402

LATENCY = 0.005


def sample(rng: bytes, i: int) -> bytes:
    start = (i * 7919) % ((1 << 20) - 2000)
    # Half noise, half structure: compresses about 2x, like small images or text features.
    return rng[start : start + 1500] + (b"%06d," % i) * 214


def build_zip(path: Path, files: int) -> None:
    rng = os.urandom(1 << 20)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(files):
            zf.writestr(f"dataset/class{i % 10}/sample{i:06d}.bin", sample(rng, i))


def build_deflate64_zip(path: Path, files: int) -> None:
    rng = os.urandom(1 << 20)
    tree = path.parent / "tree"
    for i in range(files):
        folder = tree / "dataset" / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"sample{i:06d}.bin").write_bytes(sample(rng, i))
    subprocess.run(
        ["7z", "a", "-tzip", "-mm=Deflate64", "-bd", str(path), "dataset"],
        cwd=tree,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    shutil.rmtree(tree)


def build_folder(path: Path, files: int) -> None:
    for i in range(files):
        folder = path / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"sample{i:05d}.bin").write_bytes(os.urandom(1500) + b"x" * 1500)


CPU: dict[str, list[float]] = {}


def cpu_seconds() -> float:
    """User + system time of this process and its finished children (unzip, extraction workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn: Callable[[], object], settle: bool, label: str = "") -> float:
    if settle:
        os.sync()  # start each disk run without the previous run's writeback
    cpu = cpu_seconds()
    start = time.perf_counter()
    fn()
    wall = time.perf_counter() - start
    CPU.setdefault(label, []).append(cpu_seconds() - cpu)
    return wall


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    return path


def bench_zip(base: Path, files: int, repeat: int, label: str, target: float = 0.9) -> dict[str, float]:
    base.mkdir(parents=True, exist_ok=True)
    archive = base / "dataset.zip"
    build_zip(archive, files)
    out = base / "out"
    disk = label == "disk"
    have_unzip = shutil.which("unzip") is not None

    def cp_unzip() -> None:
        fresh(out).mkdir()
        subprocess.run(["cp", str(archive), str(out / "copy.zip")], check=True)
        subprocess.run(["unzip", "-q", str(out / "copy.zip"), "-d", str(out)], check=True)
        os.unlink(out / "copy.zip")

    def extractall() -> None:
        fresh(out)
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(out)

    def run_stage() -> None:
        stage(archive, fresh(out), progress=False)

    methods: dict[str, Callable[[], None]] = {"stage": run_stage, "extractall": extractall}
    if have_unzip:
        methods["cp+unzip"] = cp_unzip
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeat):
        for name, fn in methods.items():
            shutil.rmtree(out, ignore_errors=True)
            times[name].append(timed(fn, disk, f"{label}:{name}"))
    ratios = [s / u for s, u in zip(times["stage"], times.get("cp+unzip", times["stage"]), strict=True)]
    stage(archive, fresh(out), progress=False)
    rerun = []
    for _ in range(20):
        rerun.append(timed(lambda: stage(archive, out, progress=False), False))
    shutil.rmtree(base, ignore_errors=True)
    result = {name: statistics.median(values) for name, values in times.items()}
    result["rerun"] = statistics.median(rerun)
    print(f"\n[{label}: {base}] {files} files, zip {archive.name}, median of {repeat} interleaved runs")
    for name, values in times.items():
        cpu = statistics.median(CPU[f"{label}:{name}"])
        runs = [round(v, 3) for v in values]
        print(
            f"  {name:<11} wall median {result[name]:6.3f} s  min {min(values):6.3f} s  cpu {cpu:6.3f} s  runs {runs}"
        )
    if have_unzip:
        ratio = result["stage"] / result["cp+unzip"]
        verdict = "OK" if ratio <= target else "MISS"
        print(f"  stage / (cp+unzip)      = {ratio:5.2f}x   (target <= {target:.2f})  {verdict}")
        print(f"  per-run ratios (stage / cp+unzip of the same round): {[round(r, 2) for r in ratios]}")
    speedup = result["extractall"] / result["stage"]
    print(f"  extractall / stage      = {speedup:5.2f}x   (target >= 1.50)  {'OK' if speedup >= 1.5 else 'MISS'}")
    ms = result["rerun"] * 1000
    print(f"  re-run, unchanged       = {ms:6.2f} ms (target < 50)     {'OK' if ms < 50 else 'MISS'}")
    return result


class SlowOps(_io.FileOps):
    """Drive-like latency: every file opened for reading waits ``LATENCY`` seconds."""

    def open(self, path: str | os.PathLike[str], mode: str) -> IO[Any]:
        if "r" in mode:
            time.sleep(LATENCY)
        return super().open(path, mode)


def bench_deflate64(base: Path, files: int, repeat: int) -> None:
    if shutil.which("7z") is None or shutil.which("unzip") is None:
        print("\n[deflate64] skipped: needs 7z and unzip (apt-get install -y p7zip-full unzip)")
        return
    base.mkdir(parents=True, exist_ok=True)
    archive = base / "dataset.zip"
    build_deflate64_zip(archive, files)
    out = base / "out"

    def unzip() -> None:
        fresh(out).mkdir()
        subprocess.run(["unzip", "-q", str(archive), "-d", str(out)], check=True)

    def run_stage() -> None:
        stage(archive, fresh(out), progress=False)

    times: dict[str, list[float]] = {"stage": [], "unzip": []}
    for _ in range(repeat):
        times["stage"].append(timed(run_stage, False, "d64:stage"))
        times["unzip"].append(timed(unzip, False, "d64:unzip"))
    shutil.rmtree(base, ignore_errors=True)
    print(f"\n[deflate64: {base}] {files} files, Deflate64 zip by 7z, read through unzip -p, {repeat} runs")
    for name, values in times.items():
        print(f"  {name:<11} wall median {statistics.median(values):6.3f} s  runs {[round(v, 3) for v in values]}")
    ratios = [s / u for s, u in zip(times["stage"], times["unzip"], strict=True)]
    ratio = statistics.median(times["stage"]) / statistics.median(times["unzip"])
    print(f"  stage / unzip -q        = {ratio:5.2f}x   (target <= 1.20)  {'OK' if ratio <= 1.2 else 'MISS'}")
    print(f"  per-run ratios: {[round(r, 2) for r in ratios]}")


def slow_copy2(src: str, dst: str) -> str:
    time.sleep(LATENCY)
    return str(shutil.copy2(src, dst))


def bench_folder(base: Path, files: int) -> None:
    src = base / "folder"
    build_folder(src, files)
    dest = base / "out"
    copied = base / "copytree"
    saved = _io.ops
    _io.ops = SlowOps()
    try:
        t_stage = timed(lambda: stage(src, fresh(dest), progress=False), False)
    finally:
        _io.ops = saved
    t_copy = timed(lambda: shutil.copytree(src, fresh(copied), copy_function=slow_copy2), False)
    shutil.rmtree(base, ignore_errors=True)
    print(f"\n[folder source] {files} files, {LATENCY * 1000:.0f} ms added to every open")
    print(f"  stage       {t_stage:7.3f} s")
    print(f"  copytree    {t_copy:7.3f} s")
    ratio = t_copy / t_stage
    print(f"  copytree / stage        = {ratio:5.1f}x   (target >= 10)    {'OK' if ratio >= 10 else 'MISS'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--big-files", type=int, default=70_000, help="the zip64 case (0 skips it)")
    parser.add_argument("--deflate64-files", type=int, default=20_000, help="the Deflate64 case (0 skips it)")
    parser.add_argument("--folder-files", type=int, default=2_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--disk-dir", default=None, help="a folder on real disk (default: the temp dir)")
    parser.add_argument("--skip-disk", action="store_true")
    args = parser.parse_args(argv)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus")
    shm = Path("/dev/shm")
    if shm.is_dir():
        bench_zip(Path(tempfile.mkdtemp(prefix="colabkit-bench-", dir=shm)), args.files, args.repeat, "tmpfs", 0.49)
        if args.big_files:
            big = Path(tempfile.mkdtemp(prefix="colabkit-bench-", dir=shm))
            bench_zip(big, args.big_files, args.repeat, "tmpfs-zip64", 0.5)
        if args.deflate64_files:
            bench_deflate64(
                Path(tempfile.mkdtemp(prefix="colabkit-bench-", dir=shm)), args.deflate64_files, args.repeat
            )
    if not args.skip_disk:
        disk = Path(tempfile.mkdtemp(prefix="colabkit-bench-", dir=args.disk_dir))
        bench_zip(disk, args.files, args.repeat, "disk")
    bench_folder(Path(tempfile.mkdtemp(prefix="colabkit-bench-", dir=args.disk_dir)), args.folder_files)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
