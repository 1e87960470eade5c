"""Benchmark CheckpointManager against plain torch.save; prints ratios.

1. Blocked time: a state of ``--size-mb`` saved by ``CheckpointManager(local, mirror=slow)``,
   where every write into ``slow`` is throttled to ``--rate-mb`` MB/s through the
   ``colabkit._io.ops`` seam (a stand-in for Google Drive), versus a plain
   ``torch.save(state, path)`` to local disk. The two are interleaved so disk
   write-back noise hits both alike; medians are compared. Target: <= 1.2x.
2. ``latest()`` on a folder of ``--count`` checkpoints of ``--size-mb`` each, from a
   fresh manager (no in-process cache). Target: < 200 ms for 20 x 100 MB.

Run: ``.venv/bin/python bench/bench_checkpoint.py`` (full) or ``--quick``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from colabkit import _io  # noqa: E402
from colabkit.checkpoint import CheckpointManager  # noqa: E402

MB = 1024 * 1024


class SlowFolderOps(_io.FileOps):
    """Writes into ``folder`` proceed at ``rate`` bytes/s; everything else at full speed."""

    def __init__(self, folder: Path, rate: float) -> None:
        self.folder = str(folder)
        self.rate = rate

    def write(self, handle: IO[bytes], data: bytes) -> None:
        super().write(handle, data)
        if str(getattr(handle, "name", "")).startswith(self.folder):
            time.sleep(len(data) / self.rate)


def make_state(size_mb: float) -> dict[str, Any]:
    """A model-like state dict: 4 MB tensors adding up to ``size_mb``."""
    floats = int(size_mb * MB / 4)
    chunk = 1024 * 1024
    tensors = {}
    index = 0
    while floats > 0:
        n = min(chunk, floats)
        tensors[f"layer{index}.weight"] = torch.randn(n)
        floats -= n
        index += 1
    return {"model_state_dict": tensors, "epoch": 1}


def bench_blocked(size_mb: float, rate_mb: float, repeats: int, interval: float, root: Path) -> float:
    state = make_state(size_mb)
    plain_path = root / "plain.pt"
    local, slow = root / "local", root / "slow-drive"
    ops = SlowFolderOps(slow, rate_mb * MB)
    old_ops, _io.ops = _io.ops, ops
    plain: list[float] = []
    ours: list[float] = []
    try:
        ckpt = CheckpointManager(local, keep_last=2, mirror=slow)
        torch.save(state, plain_path)  # warm-up for both: page cache, allocator, snapshot buffers
        ckpt.save(state, step=0, blocking=True)
        for step in range(1, repeats + 1):
            start = time.perf_counter()
            torch.save(state, plain_path)
            plain.append(time.perf_counter() - start)
            time.sleep(interval)  # "training" between saves

            start = time.perf_counter()
            ckpt.save(state, step=step)
            ours.append(time.perf_counter() - start)
            time.sleep(interval)
        start = time.perf_counter()
        ckpt.close()
        drain = time.perf_counter() - start
        mirrored = sorted(p.name for p in slow.glob("*.json"))
    finally:
        _io.ops = old_ops
    ratio = statistics.median(ours) / statistics.median(plain)
    pair_ratio = statistics.median(o / p for o, p in zip(ours, plain, strict=True))
    print(
        f"[blocked] state {size_mb:.0f} MB, mirror throttled to {rate_mb:.0f} MB/s, {repeats} saves, {interval}s apart"
    )
    print(f"  plain torch.save to local disk : median {statistics.median(plain) * 1000:7.1f} ms  {_fmt(plain)}")
    print(f"  CheckpointManager.save (caller): median {statistics.median(ours) * 1000:7.1f} ms  {_fmt(ours)}")
    print(f"  mirror drained {drain:.1f} s after the last save; mirror holds {mirrored}")
    print(f"  ratio blocked/plain = {ratio:.2f}x of medians, {pair_ratio:.2f}x median of pairs  (target <= 1.2x)")
    return ratio


def bench_latest(size_mb: float, count: int, root: Path) -> float:
    folder = root / "many"
    state = make_state(size_mb)
    with CheckpointManager(folder, keep_last=None) as ckpt:
        for step in range(count):
            ckpt.save(state, step=step)
    times = []
    for _ in range(5):
        fresh = CheckpointManager(folder, keep_last=None)  # no in-process verification cache
        start = time.perf_counter()
        latest = fresh.latest()
        times.append(time.perf_counter() - start)
        fresh.close()
    assert latest is not None and latest.name.startswith(f"step-{count - 1:09d}-")
    start = time.perf_counter()
    _io.hash_file(latest)
    one_hash = time.perf_counter() - start
    print(f"[latest] {count} checkpoints of {size_mb:.0f} MB, fresh manager each call")
    print(f"  latest(): median {statistics.median(times) * 1000:.1f} ms  {_fmt(times)}  (target < 200 ms)")
    print(
        f"  for scale: hashing one checkpoint takes {one_hash * 1000:.0f} ms, "
        f"so hashing all {count} would take ~{one_hash * count:.1f} s"
    )
    return statistics.median(times)


def _fmt(values: list[float]) -> str:
    return "[" + ", ".join(f"{v * 1000:.0f}" for v in values) + "] ms"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=float, default=100.0)
    parser.add_argument("--rate-mb", type=float, default=20.0, help="throttled mirror write speed, MB/s")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--interval", type=float, default=1.0, help="seconds of 'training' between saves")
    parser.add_argument("--count", type=int, default=20, help="checkpoints in the latest() folder")
    parser.add_argument("--quick", action="store_true", help="10 MB states, fewer repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.size_mb, args.repeats, args.interval, args.count = 10.0, 5, 0.2, 5
    with tempfile.TemporaryDirectory(prefix="colabkit-bench-") as tmp:
        ratio = bench_blocked(args.size_mb, args.rate_mb, args.repeats, args.interval, Path(tmp))
        latest = bench_latest(args.size_mb, args.count, Path(tmp))
    print(f"RESULT blocked_ratio={ratio:.2f} latest_ms={latest * 1000:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
