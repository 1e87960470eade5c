"""Child process for the CUDA resume test: deterministic CUDA training with fit(), killable mid-run.

    python _cuda_worker.py OUT --dir D --data fast|plain|loader [--kill-at STEP --after-save STEP]

Deterministic settings as a user would set them: ``CUBLAS_WORKSPACE_CONFIG`` (set by
the parent before CUDA starts), ``torch.use_deterministic_algorithms(True)``,
cuDNN benchmark off. The model has dropout (the CUDA RNG), the data is shuffled
and, for ``--data loader``, augmented inside the Dataset (torch's CPU RNG).
``fast`` is a TensorDataset (the in-memory fast path), ``plain`` the same tensors
through a Dataset subclass's own ``__getitem__`` (the DataLoader path).
``--kill-at`` SIGKILLs the process after optimizer step STEP, once the
checkpoint of step ``--after-save`` is committed. On a normal finish the final
parameters go to OUT and the first optimizer step this process took (the
witness of a resume) to OUT.first_step.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from colabkit.train.callbacks import Callback, FitContext
from colabkit.train.loop import fit


def tensors() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(96, 3, 8, 8, generator=generator)
    y = (x.mean(dim=(1, 2, 3)) > 0).long()
    return x, y


class Plain(TensorDataset):
    def __getitem__(self, index: Any) -> Any:
        return super().__getitem__(index)


class Augmented(Dataset):  # type: ignore[type-arg]
    def __init__(self) -> None:
        self.x, self.y = tensors()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index] + 0.1 * torch.randn(3, 8, 8), self.y[index]


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.3),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 8 * 8, 2),
    )


class Witness(Callback):
    """Remembers the first optimizer step this process took, and kills it where asked."""

    def __init__(self, directory: str, kill_at: int | None, after_save: int | None) -> None:
        self.directory = directory
        self.kill_at = kill_at
        self.after_save = after_save
        self.first_step: int | None = None

    def on_step_end(self, ctx: FitContext) -> None:
        if self.first_step is None:
            self.first_step = ctx.step
        if ctx.step == self.kill_at:
            manifest = Path(self.directory) / f"step-{self.after_save:09d}.json"
            deadline = time.monotonic() + 60
            while not manifest.exists() and time.monotonic() < deadline:
                time.sleep(0.01)  # the commit runs in the background: wait for it, do not assume a rate
            if torch.cuda.is_initialized():
                torch.cuda.synchronize()
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--dir", required=True)
    parser.add_argument("--data", choices=["fast", "plain", "loader"], required=True)
    parser.add_argument("--kill-at", type=int)
    parser.add_argument("--after-save", type=int)
    args = parser.parse_args()
    assert os.environ.get("CUBLAS_WORKSPACE_CONFIG"), "the parent sets CUBLAS_WORKSPACE_CONFIG before CUDA starts"
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    data = {"fast": TensorDataset, "plain": Plain}[args.data](*tensors()) if args.data != "loader" else Augmented()
    model = make_model()
    witness = Witness(args.dir, args.kill_at, args.after_save)
    history = fit(
        model,
        data,
        epochs=2,
        batch_size=8,
        lr=0.01,
        device="cuda",
        precision="fp32",
        num_workers=0,
        checkpoint_dir=args.dir,
        save_every=5,
        seed=3,
        callbacks=[witness],
    )
    if history.stop_reason != "completed":
        print(f"stopped: {history.stop_reason}", flush=True)
        return
    torch.save({name: value.cpu() for name, value in model.state_dict().items()}, args.out)
    Path(args.out + ".first_step").write_text(str(witness.first_step))


if __name__ == "__main__":
    main()
