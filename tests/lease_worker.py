"""Child process for tests/test_lease_fit.py (not a test module).

    python tests/lease_worker.py DIR [--epochs N] [--gate FILE] [--takeover]

Trains a tiny model with fit(checkpoint_dir=DIR, save_every="epoch"). With ``--gate``,
at the start of the second epoch (the first epoch's checkpoint committed) it prints
``progress`` and waits until FILE exists. Prints ``trained steps FIRST-LAST`` at the end;
a lease refusal prints the error on stderr and exits with status 3.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from witness import StepLog

from colabkit.errors import CheckpointInUseError
from colabkit.train.callbacks import Callback, FitContext
from colabkit.train.loop import fit

STEPS_PER_EPOCH = 4


def data() -> torch.utils.data.TensorDataset:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(4 * STEPS_PER_EPOCH, 5, generator=generator)
    return torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long())


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


class Gate(Callback):
    """Stops at the second epoch's start until the gate file exists."""

    def __init__(self, directory: Path, gate: Path) -> None:
        self.directory = directory
        self.gate = gate

    def on_epoch_start(self, ctx: FitContext) -> None:
        if ctx.epoch != 1:
            return
        deadline = time.monotonic() + 60
        while not list(self.directory.glob("step-*.json")) and time.monotonic() < deadline:
            time.sleep(0.01)  # the first epoch's checkpoint commits in the background
        print("progress", flush=True)
        while not self.gate.exists():
            time.sleep(0.01)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dir")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--gate")
    parser.add_argument("--takeover", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    steps = StepLog()
    callbacks: list[Callback] = [steps]
    if args.gate:
        callbacks.append(Gate(Path(args.dir), Path(args.gate)))
    try:
        fit(
            model(), data(), epochs=args.epochs, batch_size=4, seed=0, checkpoint_dir=args.dir,
            takeover=args.takeover, progress=False, callbacks=callbacks, metrics=(),
        )  # fmt: skip
    except CheckpointInUseError as exc:
        print(f"CheckpointInUseError: {exc}", file=sys.stderr, flush=True)
        print("trained steps {}-{}".format(*steps.span), flush=True)
        sys.exit(3)
    print("trained steps {}-{}".format(*steps.span), flush=True)


if __name__ == "__main__":
    main()
