"""Child process for the resume tests: trains a small, deliberately random setup with fit().

Random augmentation inside the dataset (torch, python ``random`` and numpy),
dropout, a shuffling user DataLoader, optional workers and accumulation.

    python fit_worker.py OUT [--dir D] [--workers N] [--accum K] [--save-every S]
                         [--kill-at STEP --after-save STEP] [--term-at STEP] [--ctrl-c-at-sample INDEX]
    torchrun --standalone --nproc_per_node=2 fit_worker.py OUT --ddp --dir D

``--kill-at`` SIGKILLs this process after optimizer step STEP, once the
checkpoint of step ``--after-save`` is committed; ``--term-at`` sends it SIGTERM
and ``--ctrl-c-at-sample`` sends SIGINT to its whole process group (workers included,
as Ctrl-C in a terminal does) while that sample loads; fit() turns either into a
checkpoint and a normal return. Run it in its own session for ``--ctrl-c-at-sample``. On a normal finish
the final parameters, optimizer state and history go to OUT. Every normal return prints
``trained steps FIRST-LAST``, the optimizer steps this process took (the resume witness).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from witness import StepLog

from colabkit.train.callbacks import Callback, FitContext
from colabkit.train.loop import fit


class Augmented(Dataset):  # type: ignore[type-arg]
    def __init__(self, size: int = 52, ctrl_c_sample: int | None = None, marker: str | None = None) -> None:
        generator = torch.Generator().manual_seed(7)
        self.x = torch.randn(size, 6, generator=generator)
        self.y = (self.x[:, 0] + self.x[:, 1] > 0).long()
        self.ctrl_c_sample = ctrl_c_sample
        self.marker = marker

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if index == self.ctrl_c_sample and self.marker and not os.path.exists(self.marker):
            # Ctrl-C in a terminal while the main process waits for this batch: the whole
            # process group (DataLoader workers too) gets SIGINT. Once per run directory.
            Path(self.marker).touch()
            os.killpg(os.getpgid(0), signal.SIGINT)
            time.sleep(0.3)
        noise = 0.2 * torch.randn(6) + 0.05 * random.random() + 0.05 * float(np.random.rand())
        return self.x[index] + noise, self.y[index]


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(12, 2))


class Interrupt(Callback):
    def __init__(self, directory: str | None, kill_at: int | None, after_save: int | None, term_at: int | None) -> None:
        self.directory = directory
        self.kill_at = kill_at
        self.after_save = after_save
        self.term_at = term_at

    def on_step_end(self, ctx: FitContext) -> None:
        if ctx.step == self.term_at:
            os.kill(os.getpid(), signal.SIGTERM)
        if ctx.step == self.kill_at:
            manifest = Path(str(self.directory)) / f"step-{self.after_save:09d}.json"
            deadline = time.monotonic() + 20
            while not manifest.exists() and time.monotonic() < deadline:
                time.sleep(0.01)  # the commit runs in the background
            os.kill(os.getpid(), signal.SIGKILL)


def ddp_train(directory: str, out: str, term_at: int | None = None) -> str:
    """The multi-process case: same function under launch() and under torchrun.

    With ``term_at``, rank 1 alone gets SIGTERM after that step; both ranks must agree to stop.
    Returns ``"REASON@LAST_EPOCH steps FIRST-LAST"`` (the steps this process trained).
    """
    model = make_model()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(96, 6, generator=generator)
    data = torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long())
    rank = int(os.environ.get("RANK", "0"))

    class TermRankOne(Callback):
        def on_step_end(self, ctx: FitContext) -> None:
            if rank == 1 and ctx.step == term_at:
                os.kill(os.getpid(), signal.SIGTERM)

    steps = StepLog()
    history = fit(
        model, data, data, epochs=2, batch_size=4, seed=0, lr=0.01, checkpoint_dir=directory, save_every=5,
        callbacks=[TermRankOne(), steps], progress=False,
    )  # fmt: skip
    if rank == 0 and history.stop_reason == "completed":
        torch.save({"model": model.state_dict(), "history": history.records}, out)
    first, last = steps.span
    return f"{history.stop_reason}@{history[-1]['epoch'] if len(history) else -1} steps {first}-{last}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--dir")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--save-every", type=int, default=2)
    parser.add_argument("--kill-at", type=int)
    parser.add_argument("--after-save", type=int)
    parser.add_argument("--term-at", type=int)
    parser.add_argument("--ctrl-c-at-sample", type=int)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--ddp", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.ddp:
        print(ddp_train(args.dir, args.out), flush=True)
        return

    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    loader = DataLoader(
        Augmented(ctrl_c_sample=args.ctrl_c_at_sample, marker=f"{args.dir}.ctrl-c-sent"),
        batch_size=4,
        shuffle=True,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
    )
    steps = StepLog()
    history = fit(
        model,
        loader,
        epochs=args.epochs,
        optimizer=optimizer,
        grad_accum=args.accum,
        checkpoint_dir=args.dir,
        save_every=args.save_every,
        seed=11,
        progress=False,
        callbacks=[Interrupt(args.dir, args.kill_at, args.after_save, args.term_at), steps],
    )
    print("trained steps {}-{}".format(*steps.span), flush=True)
    if history.stop_reason != "completed":
        print(f"stopped: {history.stop_reason}", flush=True)
        return
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, args.out)
    Path(args.out + ".json").write_text(json.dumps(history.records))


if __name__ == "__main__":
    main()
