"""CPU vs GPU: training/inference throughput of a small CNN and matrix-multiply TFLOP/s.

Run from the repository root::

    .venv/bin/python bench/bench_devices.py            # tables on stdout
    .venv/bin/python bench/bench_devices.py --plots results/   # also the two charts as PNG

Every number is measured in this process, after warm-up, with the device
synchronised around the clock; speed-ups are relative to the CPU run made in
the same process. With no GPU the script still runs and says so.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from colabkit import bench


def small_cnn() -> nn.Module:
    """A half-width variant of the examples' Fashion-MNIST CNN (128 hidden units, no dropout; 0.4 M parameters)."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="matmul sizes (default: auto)")
    parser.add_argument("--precision", default="fp32", help="fp32 (like for like), auto (as fit() trains), fp16, bf16")
    parser.add_argument("--plots", type=Path, default=None, help="folder for devices.png and matmul.png")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    samples = 4 * max(args.batch_sizes)
    data = (torch.randn(samples, 1, 28, 28), torch.randint(0, 10, (samples,)))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, cuda={torch.cuda.is_available()}")

    start = time.perf_counter()
    devices = bench.compare_devices(
        small_cnn(), data, batch_sizes=args.batch_sizes, precision=args.precision, progress=False
    )
    print("\n# compare_devices: small CNN on 28x28 inputs (Fashion-MNIST shape)\n")
    print(devices)

    matmul = bench.matmul_speed(sizes=args.sizes or "auto", progress=False)
    print("\n# matmul_speed\n")
    print(matmul)
    print(f"\n(total {time.perf_counter() - start:.1f} s)")

    if args.plots is not None:
        devices.plot(path=args.plots / "devices.png")
        matmul.plot(path=args.plots / "matmul.png")
        print(f"charts written to {args.plots}/devices.png and {args.plots}/matmul.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
