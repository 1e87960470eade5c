"""The colabkit demo: train, get killed mid-epoch, resume, report. Runs on a CPU in under 3 minutes.

    python examples/demo.py            # make demo
    python examples/demo.py --fast     # fewer epochs and shorter timings (the tests)

What it does, in the order a Colab user would:

1. Finds its project folders on Google Drive (``project_dirs``: the real Drive on
   Colab, mounted if needed; a local stand-in folder elsewhere).
2. Keeps the dataset there as one zip, the way datasets should live on Drive: the
   handwritten digits that ship with scikit-learn (1,797 8x8 images, 10 classes),
   written out once as an image folder (one PNG per image, one folder per class).
3. Trains a small CNN with ``fit()`` in a child process, with checkpoints and
   progress bars; ``stage()`` copies the zip to fast local disk and unpacks it.
4. Kills that process with SIGKILL in the middle of an epoch, the way a runtime
   disconnect does.
5. Runs the very same training call again: it resumes from the last checkpoint and ends
   with the same weights an uninterrupted run would have (the run is seeded).
6. Loads the best checkpoint (lowest validation loss) for inference, reports its test
   accuracy (it must reach 95%), and writes the training curves and
   a CPU-vs-device timing chart as PNG files into the project's results folder.

On Colab, mount Drive first if you run this file as a script (``colabkit.mount_drive()``
in a cell, then ``!python demo.py``), or run it inside the notebook with ``%run demo.py``.
The same file runs unchanged on Kaggle and on a laptop.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import colabkit

PROJECT = "colabkit-demo"
#: Set in the child process: pause at this optimizer step so the SIGKILL lands mid-epoch.
PAUSE_ENV = "COLABKIT_DEMO_PAUSE_AT_STEP"
MARKER = "colabkit-demo: paused at step"
MIN_ACCURACY = 0.95
BATCH_SIZE = 64
SAVE_EVERY = 5  # optimizer steps: a checkpoint every 5 batches, so a resume loses at most 4
TEST_IMAGES, VAL_IMAGES = 360, 180
TRAIN_IMAGES = 1797 - TEST_IMAGES - VAL_IMAGES  # scikit-learn's digits hold 1,797 images


def write_digits_zip(out: Path) -> Path:
    """scikit-learn's digits as ``digits/{train,val,test}/<digit>/<n>.png``, packed into one zip at ``out``."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    splits = {"test": order[:TEST_IMAGES], "val": order[TEST_IMAGES : TEST_IMAGES + VAL_IMAGES]}
    splits["train"] = order[TEST_IMAGES + VAL_IMAGES :]
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch) / "digits"
        for split, indices in splits.items():
            for index in indices:
                folder = root / split / str(digits.target[index])
                folder.mkdir(parents=True, exist_ok=True)
                pixels = (digits.images[index] * (255 / 16)).round().astype(np.uint8)  # 0..16 -> 0..255
                Image.fromarray(pixels).save(folder / f"{index:04d}.png")  # 2-D uint8: an 8-bit grey PNG
        return colabkit.make_archive(root, out, progress=False)


def make_model() -> nn.Module:
    """A small CNN for 8x8 grey images: two convolutions, one pooling, one linear layer."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.25),
        nn.Linear(64 * 4 * 4, 10),
    )


def load_splits(dirs: Any) -> dict[str, Any]:
    """Stage the zip from Drive to local disk and open each split as an ImageFolder."""
    from torchvision import datasets, transforms

    local = colabkit.stage(dirs.data / "digits.zip", progress=False)
    root = local / "digits" if (local / "digits").is_dir() else local
    to_tensor = transforms.Compose([transforms.Grayscale(), transforms.ToTensor()])
    return {split: datasets.ImageFolder(root / split, to_tensor) for split in ("train", "val", "test")}


class PauseAt:
    """Demo instrumentation: at step ``PAUSE_ENV`` (if set), say so and wait to be killed."""

    def __init__(self) -> None:
        value = os.environ.get(PAUSE_ENV, "")
        self.step = int(value) if value.isdigit() else None

    def on_step_end(self, ctx: Any) -> None:
        if ctx.step == self.step:
            print(f"{MARKER} {ctx.step} (epoch {ctx.epoch + 1}, batch {ctx.batch})", flush=True)
            time.sleep(120)  # the parent kills this process now; if it does not, training goes on


def train(dirs: Any, *, epochs: int) -> tuple[nn.Module, Any, dict[str, Any]]:
    """The training call itself: identical in the killed run and in the resumed one."""
    splits = load_splits(dirs)
    colabkit.seed_everything(0)  # the same initial weights every run (fit's seed= covers the rest)
    model = make_model()
    history = colabkit.fit(
        model,
        splits["train"],
        splits["val"],
        epochs=epochs,
        lr=3e-3,
        batch_size=BATCH_SIZE,
        num_workers=0,  # 8x8 PNGs decode faster in-process than worker start-up takes
        checkpoint_dir=dirs.checkpoints,
        save_every=SAVE_EVERY,
        seed=0,
        callbacks=[PauseAt()],
    )
    return model, history, splits


def fresh_start(checkpoints: Path) -> None:
    """Delete the demo's checkpoints from an earlier run, so run 1 starts at epoch 1.

    Both copies go: the folder on Drive and the local staging folder that checkpoints bound
    for Drive are written to first (fit() resumes from whichever is newer).
    """
    with colabkit.CheckpointManager(checkpoints) as manager:
        staging = manager.local_dir
    for folder in {staging, checkpoints}:
        shutil.rmtree(folder, ignore_errors=True)
    checkpoints.mkdir(parents=True, exist_ok=True)


def run_and_kill(args: argparse.Namespace, pause_at: int) -> None:
    """Start the training in a child process and SIGKILL it once it is mid-epoch."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "--project", args.project]
    if args.fast:
        command.append("--fast")
    env = {**os.environ, PAUSE_ENV: str(pause_at)}
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    assert child.stdout is not None
    try:
        for line in child.stdout:
            print(f"    [child] {line}", end="", flush=True)
            if line.startswith(MARKER):
                child.send_signal(signal.SIGKILL)  # no clean-up, no last save: like a lost runtime
                break
        code = child.wait(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    if code != -signal.SIGKILL:
        raise SystemExit(f"demo: the training process ended with exit code {code} before it could be killed")
    print(f"==> killed the training process (pid {child.pid}) with SIGKILL in the middle of an epoch")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="colabkit demo: train, get killed, resume, report")
    parser.add_argument("--fast", action="store_true", help="fewer epochs and shorter timings")
    parser.add_argument("--project", default=PROJECT, help="project folder name on Drive")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    epochs = 4 if args.fast else 12
    dirs = colabkit.project_dirs(args.project)

    if args.child:
        train(dirs, epochs=epochs)
        return 0

    started = time.monotonic()
    rt = colabkit.runtime()
    device = colabkit.get_device()
    print(f"==> colabkit demo on {rt.kind}, training on {device}; project folder {dirs.root}")
    fresh_start(dirs.checkpoints)
    archive = dirs.data / "digits.zip"
    if not archive.exists():
        write_digits_zip(archive)
        print(f"==> wrote the digits dataset as an image-folder zip on Drive: {archive}")

    # 1 + 2: train in a child process, kill it mid-epoch (step 1.5 epochs in: after the
    # checkpoint at a multiple of SAVE_EVERY and before the epoch ends).
    steps_per_epoch = -(-TRAIN_IMAGES // BATCH_SIZE)
    pause_at = steps_per_epoch + steps_per_epoch // 2
    print(f"==> run 1: training in a child process, to be killed at step {pause_at} (mid epoch 2)")
    run_and_kill(args, pause_at)

    # 3: the same call again: fit() finds the last checkpoint and continues from there.
    print("==> run 2: the same training call again; it resumes from the last checkpoint")
    _, history, splits = train(dirs, epochs=epochs)

    # The checkpoint with the lowest validation loss, in eval mode, scored on images it never saw.
    best = colabkit.load_for_inference(dirs.checkpoints, make_model())
    accuracy = colabkit.evaluate(best, splits["test"], batch_size=256, progress=False)["accuracy"]
    print(f"==> test accuracy of the best checkpoint: {accuracy:.2%} on {len(splits['test'])} held-out images")

    import matplotlib

    if not rt.in_notebook:
        matplotlib.use("Agg")  # files only; no window
    dirs.results.mkdir(parents=True, exist_ok=True)
    history.plot().savefig(dirs.results / "history.png", dpi=120, bbox_inches="tight")
    loader = torch.utils.data.DataLoader(splits["train"], batch_size=BATCH_SIZE)
    timing = colabkit.compare_devices(make_model(), loader, steps=5 if args.fast else "auto", progress=False)
    print(timing)
    timing.plot(path=dirs.results / "devices.png")
    print(f"==> results: {dirs.results} (history.png, devices.png); checkpoints: {dirs.checkpoints}")
    print(f"==> demo finished in {time.monotonic() - started:.0f} s")
    if accuracy < MIN_ACCURACY:
        print(f"demo: test accuracy {accuracy:.2%} is below {MIN_ACCURACY:.0%}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
