"""Out-of-memory back-off: smaller micro-batches, same effective batch and step count."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from colabkit import versions
from colabkit.errors import OutOfMemoryBackoffError
from colabkit.train.callbacks import Callback, FitContext
from colabkit.train.loop import fit
from colabkit.train.oom import Backoff, batch_length, is_out_of_memory, split_batch

# torch.OutOfMemoryError from 2.5 on, torch.cuda.OutOfMemoryError on the floor (2.3).
OutOfMemoryError = versions.out_of_memory_error()


class OomAbove(torch.nn.Module):
    """A model whose forward pass 'runs out of memory' on more than ``limit`` samples: the injection seam."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(4, 2)
        self.limit = limit
        self.ooms = 0
        self.sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.limit:
            self.ooms += 1
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        self.sizes.append(x.shape[0])
        return self.fc(x)


class Count(Callback):
    steps = 0

    def on_step_end(self, ctx: FitContext) -> None:
        self.steps += 1


def data(n: int = 64) -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=generator)
    return TensorDataset(x, (x[:, 0] > 0).long())


def test_oom_halves_the_micro_batch_and_keeps_the_steps(capsys: pytest.CaptureFixture[str]) -> None:
    plain, small = OomAbove(limit=1000), OomAbove(limit=4)
    count = Count()
    fit(plain, data(), epochs=2, batch_size=16, lr=0.1, seed=0, metrics=(), progress=False)
    history = fit(small, data(), epochs=2, batch_size=16, lr=0.1, seed=0, callbacks=[count], progress=True)
    assert small.ooms == 2  # 16 -> 8 -> 4, once, then remembered
    assert set(small.sizes) == {4} and count.steps == 8
    assert history.stop_reason == "completed" and history[0]["accuracy"] > 0
    for a, b in zip(plain.parameters(), small.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)  # same effective batch; only summation order differs
    assert "micro-batch 16 -> 8" in capsys.readouterr().out


def test_micro_batch_of_one_that_does_not_fit_is_an_error() -> None:
    with pytest.raises(OutOfMemoryBackoffError, match="micro-batch of 1 sample"):
        fit(OomAbove(limit=0), data(8), batch_size=4, progress=False)


def test_other_errors_are_not_swallowed() -> None:
    class Broken(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("something else")

    with pytest.raises(RuntimeError, match="something else"):
        fit(Broken(), data(8), batch_size=4, progress=False)


def test_micro_batch_size_is_saved_and_restored(tmp_path: Path) -> None:
    model = OomAbove(limit=4)
    fit(model, data(), epochs=1, batch_size=16, checkpoint_dir=tmp_path, max_steps=2, progress=False)
    assert model.ooms == 2
    from colabkit.checkpoint import CheckpointManager

    assert CheckpointManager(tmp_path).load()["fit"]["chunks"] == 4  # 16 -> 8 -> 4, recorded
    again = OomAbove(limit=4)
    history = fit(again, data(), epochs=1, batch_size=16, checkpoint_dir=tmp_path, progress=False)
    assert again.ooms == 0 and history.stop_reason == "completed"


def test_oom_with_grad_accumulation_redoes_the_whole_group() -> None:
    reference, model = OomAbove(limit=1000), OomAbove(limit=3)
    fit(reference, data(48), batch_size=6, grad_accum=2, seed=0, lr=0.1, progress=False)
    count = Count()
    fit(model, data(48), batch_size=6, grad_accum=2, seed=0, lr=0.1, callbacks=[count], progress=False)
    assert count.steps == 4 and set(model.sizes) == {3}
    for a, b in zip(reference.parameters(), model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_detection_and_splitting() -> None:
    assert is_out_of_memory(OutOfMemoryError("x"))
    assert is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))
    batch = {"x": torch.arange(10).reshape(5, 2), "names": list("abcde"), "scale": torch.tensor(2.0)}
    assert batch_length(batch) == 5
    pieces = split_batch(batch, 2, 5)
    assert [size for _, size in pieces] == [2, 3]
    assert pieces[1][0]["names"] == ["c", "d", "e"] and pieces[1][0]["x"].shape == (3, 2)
    assert torch.equal(pieces[0][0]["scale"], torch.tensor(2.0))
    assert [size for _, size in split_batch(torch.zeros(3), 4, 3)] == [1, 1, 1]
    backoff = Backoff()
    backoff.handle(16, step=1, quiet=True)
    assert backoff.chunks == 2 and backoff.micro_batch(16) == 8


class OomOnce(OomAbove):
    """Runs out of memory once, on the second forward pass (inside a grad_accum group)."""

    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 2:
            self.ooms += 1
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.fc(x)


def test_a_retried_step_counts_its_metrics_once() -> None:
    options = {"epochs": 1, "batch_size": 16, "grad_accum": 2, "lr": 0.1, "seed": 0, "progress": False}
    plain = fit(OomAbove(limit=1000), data(), **options)
    model = OomOnce(limit=1000)
    retried = fit(model, data(), **options)
    assert model.ooms == 1
    assert retried[0]["accuracy"] == pytest.approx(plain[0]["accuracy"])
    assert retried[0]["loss"] == pytest.approx(plain[0]["loss"], rel=1e-5)
