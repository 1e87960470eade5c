"""Exact resume: interrupted + resumed runs end bit-identical to uninterrupted ones."""

from __future__ import annotations

import dataclasses
import json
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fit_worker import make_model
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler
from witness import StepLog

from colabkit.train.loop import fit
from colabkit.train.state import KeyedBatch, ResumableBatchSampler, SeededDataset, make_resumable, mix_seed

WORKER = Path(__file__).resolve().parent / "fit_worker.py"


class Augmented(Dataset):  # type: ignore[type-arg]
    """Random augmentation from all three global RNGs; counts how often samples are loaded."""

    def __init__(self, size: int = 44) -> None:
        generator = torch.Generator().manual_seed(5)
        self.x = torch.randn(size, 6, generator=generator)
        self.y = (self.x[:, 0] > 0).long()
        self.loads = 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.loads += 1
        noise = 0.2 * torch.randn(6) + 0.05 * random.random() + 0.05 * float(np.random.rand())
        return self.x[index] + noise, self.y[index]


@dataclasses.dataclass
class Run:
    """One fit() call and its witnesses: the steps it trained and the samples it loaded (in this process)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    history: Any
    steps: StepLog
    loads: int


def run(directory: Path | None, data: Any, **options: Any) -> Run:
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    steps = StepLog()
    settings: dict[str, Any] = {"epochs": 2, "seed": 3, "save_every": 2, "progress": False, "callbacks": [steps]}
    settings.update(options)
    history = fit(model, data, optimizer=optimizer, checkpoint_dir=directory, **settings)
    dataset = data.dataset if isinstance(data, DataLoader) else data
    return Run(model, optimizer, history, steps, dataset.loads)


def assert_identical(a: Run, b: Run) -> None:
    for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(p, q), f"parameter {name} differs"
    state_a, state_b = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        for name in state_a[key]:
            assert torch.equal(state_a[key][name], state_b[key][name]), f"optimizer state {key}.{name} differs"
    assert a.history.records and [r["loss"] for r in a.history] == [r["loss"] for r in b.history]


def assert_resumed(resumed: Run, reference: Run, *, after_step: int, samples_done: int | None = None) -> None:
    """The witness: ``resumed`` continued after ``after_step`` and did not load the samples trained before."""
    assert resumed.steps.span == (after_step + 1, reference.steps.span[1]), "the run did not resume where it stopped"
    if samples_done is not None:
        assert resumed.loads == reference.loads - samples_done, "the resumed run loaded samples trained before"


@pytest.mark.parametrize(
    ("workers", "accum", "stops"),
    [(0, 1, [5]), (0, 3, [1]), (0, 2, [1, 3, 5])],
    ids=["mid-epoch", "accumulation", "three-resumes"],
)
def test_resumed_run_equals_uninterrupted(tmp_path: Path, workers: int, accum: int, stops: list[int]) -> None:
    def loader() -> DataLoader:  # type: ignore[type-arg]
        return DataLoader(Augmented(), batch_size=4, shuffle=True, num_workers=workers)

    reference = run(tmp_path / "a", loader(), grad_accum=accum)
    done = 0
    for stop in stops:
        partial = run(tmp_path / "b", loader(), grad_accum=accum, max_steps=stop)
        assert partial.history.stop_reason == "max_steps"
        assert partial.steps.span == (done + 1, stop)  # each run picks up where the last one stopped
        done = stop
    resumed = run(tmp_path / "b", loader(), grad_accum=accum)
    assert_identical(reference, resumed)
    # Every stop lies in the first epoch: 4 samples a batch, ``accum`` batches a step.
    assert_resumed(resumed, reference, after_step=done, samples_done=4 * accum * done if workers == 0 else None)


def test_resume_with_two_workers_and_accumulation(tmp_path: Path) -> None:
    def loader() -> DataLoader:  # type: ignore[type-arg]
        return DataLoader(Augmented(), batch_size=4, shuffle=True, num_workers=2)

    reference = run(tmp_path / "a", loader(), grad_accum=2)
    run(tmp_path / "b", loader(), grad_accum=2, max_steps=4)
    resumed = run(tmp_path / "b", loader(), grad_accum=2)
    assert_identical(reference, resumed)
    assert_resumed(resumed, reference, after_step=4)  # samples load in the workers, out of sight


def test_resume_from_a_dataset_argument(tmp_path: Path) -> None:
    reference = run(tmp_path / "a", Augmented(), batch_size=4, num_workers=0)
    run(tmp_path / "b", Augmented(), batch_size=4, num_workers=0, max_steps=7)
    resumed = run(tmp_path / "b", Augmented(), batch_size=4, num_workers=0)
    assert_identical(reference, resumed)
    assert_resumed(resumed, reference, after_step=7, samples_done=7 * 4)


def test_resume_with_a_custom_batch_sampler(tmp_path: Path) -> None:
    """A sampler colabkit does not know: its order is replayed from the epoch's saved RNG state."""

    def loader() -> DataLoader:  # type: ignore[type-arg]
        data = Augmented()
        sampler = BatchSampler(RandomSampler(data, num_samples=40), batch_size=4, drop_last=False)
        return DataLoader(data, batch_sampler=sampler)

    reference = run(tmp_path / "a", loader())
    run(tmp_path / "b", loader(), max_steps=6)
    resumed = run(tmp_path / "b", loader())
    assert_identical(reference, resumed)
    assert_resumed(resumed, reference, after_step=6, samples_done=6 * 4)


def test_skipped_batches_are_not_loaded(tmp_path: Path) -> None:
    run(tmp_path, DataLoader(Augmented(), batch_size=4, shuffle=True), epochs=1, max_steps=8)
    resumed = run(tmp_path, DataLoader(Augmented(), batch_size=4, shuffle=True), epochs=1)
    assert resumed.loads == 44 - 8 * 4 and resumed.steps.span == (9, 11)


def test_history_survives_resume_and_is_written_next_to_checkpoints(tmp_path: Path) -> None:
    reference = run(tmp_path / "a", Augmented(), batch_size=4, num_workers=0, epochs=3)
    first = run(tmp_path / "b", Augmented(), batch_size=4, num_workers=0, epochs=3, max_steps=14)
    assert len(first.history) == 1  # 11 steps per epoch: stopped inside the second
    again = run(tmp_path / "b", Augmented(), batch_size=4, num_workers=0, epochs=3)
    assert_resumed(again, reference, after_step=14, samples_done=14 * 4)
    resumed = again.history
    assert [r["epoch"] for r in resumed] == [0, 1, 2]  # the first epoch's record came from the checkpoint
    assert [r["loss"] for r in resumed] == [r["loss"] for r in reference.history]
    csv = (tmp_path / "b" / "history.csv").read_text().splitlines()
    assert csv[0].startswith("epoch,loss,accuracy") and len(csv) == 4


def test_finished_run_is_not_trained_again(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = run(tmp_path, Augmented(), batch_size=4, num_workers=0, epochs=1)
    again = run(tmp_path, Augmented(), batch_size=4, num_workers=0, epochs=1, progress=True)
    assert again.loads == 0 and again.steps.steps == []
    assert again.history.records == first.history.records and again.history.stop_reason == "completed"
    assert all(torch.equal(p, q) for p, q in zip(first.model.parameters(), again.model.parameters(), strict=True))
    assert "already finished" in capsys.readouterr().out


def test_resume_false_starts_over(tmp_path: Path) -> None:
    run(tmp_path, Augmented(), batch_size=4, num_workers=0, epochs=1)
    again = run(tmp_path, Augmented(), batch_size=4, num_workers=0, epochs=1, resume=False)
    assert again.loads == 44 and len(again.history) == 1 and again.steps.span == (1, 11)
    # The witness that resume=False is what started it over: the same rerun without it resumes
    # after the checkpoint that run wrote, loading only the new epoch's samples.
    resumed = run(tmp_path, Augmented(), batch_size=4, num_workers=0, epochs=2)
    assert resumed.loads == 44 and len(resumed.history) == 2 and resumed.steps.span == (12, 22)


def test_sampler_order_depends_only_on_seed_and_epoch() -> None:
    sampler = ResumableBatchSampler(10, 3, shuffle=True, seed=1)
    sampler.set_epoch(2)
    full = [list(batch) for batch in sampler]
    again = ResumableBatchSampler(10, 3, shuffle=True, seed=1)
    again.set_epoch(2)
    again.skip(2)
    assert [list(batch) for batch in again] == full[2:]
    assert sorted(i for batch in full for i in batch) == list(range(10))
    sampler.set_epoch(3)
    assert [list(batch) for batch in sampler] != full
    assert all(isinstance(batch, KeyedBatch) and batch.epoch == 3 for batch in sampler)


def test_sampler_shards_like_distributed_sampler() -> None:
    shards = []
    for rank in range(3):
        sampler = ResumableBatchSampler(10, 2, shuffle=True, seed=4, rank=rank, world_size=3)
        assert len(sampler) == 2  # ceil(10 / 3) = 4 samples per rank
        shards.append([i for batch in sampler for i in batch])
    assert all(len(shard) == 4 for shard in shards)
    assert set().union(*shards) == set(range(10))


def test_worker_seeding_is_per_sample() -> None:
    """The same (seed, epoch, index) gives the same augmentation whichever batch or worker fetches it."""
    data = SeededDataset(Augmented(), seed=9)
    loader = DataLoader(data, batch_sampler=[KeyedBatch([3, 1], 0), KeyedBatch([1], 0)], num_workers=2)
    first, second = list(loader)
    assert torch.equal(first[0][1], second[0][0])
    assert mix_seed(9, 0, 1) != mix_seed(9, 1, 1)


def test_user_loader_options_are_kept() -> None:
    def collate(samples: list[Any]) -> dict[str, torch.Tensor]:
        return {"x": torch.stack([s[0] for s in samples]), "y": torch.stack([s[1] for s in samples])}

    original = DataLoader(Augmented(), batch_size=5, shuffle=True, collate_fn=collate, drop_last=True)
    loader = make_resumable(
        original, argument="train", batch_size=None, shuffle=True, num_workers="auto", pin_memory=False, seed=0
    )
    batches = list(loader.epoch(0))
    assert len(batches) == len(original) == 8 and set(batches[0]) == {"x", "y"} and batches[0]["x"].shape == (5, 6)


def _worker(out: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(WORKER), str(out), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        start_new_session=True,  # its own process group, for the Ctrl-C case
    )


def _trained(result: subprocess.CompletedProcess[str]) -> tuple[int, int]:
    """The first and last optimizer step the worker trained, from its ``trained steps A-B`` line."""
    line = next(line for line in result.stdout.splitlines() if line.startswith("trained steps "))
    first, last = line.split()[-1].split("-")
    return int(first), int(last)


def _final(out: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    return torch.load(out, weights_only=True), json.loads(Path(f"{out}.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize(
    ("workers", "accum", "interrupt"),
    [(2, 2, ["--kill-at", "7", "--after-save", "4"]), (0, 1, ["--ctrl-c-at-sample", "5"])],
    ids=["sigkill-2-workers-accum", "ctrl-c-while-loading"],
)
def test_resume_in_a_new_process(
    tmp_path: Path, subprocess_env: dict[str, str], workers: int, accum: int, interrupt: list[str]
) -> None:
    common = ["--workers", str(workers), "--accum", str(accum)]
    reference = _worker(tmp_path / "ref.pt", subprocess_env, "--dir", str(tmp_path / "a"), *common)
    assert reference.returncode == 0, reference.stderr
    stopped = _worker(tmp_path / "res.pt", subprocess_env, "--dir", str(tmp_path / "b"), *common, *interrupt)
    if "--kill-at" in interrupt:
        assert stopped.returncode == -signal.SIGKILL, stopped.stderr
    else:
        assert stopped.returncode == 0 and "stopped: interrupted" in stopped.stdout, stopped.stderr
    assert not (tmp_path / "res.pt").exists()
    resumed = _worker(tmp_path / "res.pt", subprocess_env, "--dir", str(tmp_path / "b"), *common)
    assert resumed.returncode == 0, resumed.stderr
    # The witness: the new process went on after the last checkpoint instead of starting over.
    last = _trained(reference)[1]
    if "--kill-at" in interrupt:  # killed after step 7 once step 4 was committed; saves at even steps
        assert _trained(resumed) in ((5, last), (7, last)), resumed.stdout
    else:  # the interrupt saved the step it stopped at
        stopped_at = _trained(stopped)[1]
        assert stopped_at > 0 and _trained(resumed) == (stopped_at + 1, last), (stopped.stdout, resumed.stdout)
    (ref, ref_history), (res, res_history) = _final(tmp_path / "ref.pt"), _final(tmp_path / "res.pt")
    for name, value in ref["model"].items():
        assert torch.equal(value, res["model"][name]), name
    for key, state in ref["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, res["optimizer"]["state"][key][name]), f"{key}.{name}"
    assert [(r["loss"], r["accuracy"]) for r in ref_history] == [(r["loss"], r["accuracy"]) for r in res_history]


class Stream(torch.utils.data.IterableDataset):  # type: ignore[type-arg]
    def __iter__(self) -> Any:
        generator = torch.Generator().manual_seed(2)
        for _ in range(24):
            x = torch.randn(4, generator=generator)
            yield x, (x[0] > 0).long()


def test_iterable_dataset_trains_and_resumes_by_reading_ahead(tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = torch.nn.Linear(4, 2)
    fit(reference, Stream(), epochs=2, batch_size=4, seed=1, progress=False)
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    first = fit(model, Stream(), epochs=2, batch_size=4, seed=1, checkpoint_dir=tmp_path, max_steps=3, progress=False)
    assert first.stop_reason == "max_steps"
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    steps = StepLog()
    with pytest.warns(UserWarning, match="reads and discards 3 batches"):
        history = fit(
            model, Stream(), epochs=2, batch_size=4, seed=1, checkpoint_dir=tmp_path, callbacks=[steps], progress=False
        )
    # 24 samples in batches of 4: 6 steps an epoch, however many cores ("auto" workers must not replay the stream)
    assert len(history) == 2 and steps.span == (4, 12)
    assert all(torch.equal(a, b) for a, b in zip(reference.parameters(), model.parameters(), strict=True))


def test_resume_with_fp16_grad_scaler(tmp_path: Path) -> None:
    """fp16 autocast with a GradScaler (on the CPU here) resumes exactly too."""
    reference = run(tmp_path / "a", Augmented(), batch_size=4, num_workers=0, precision="fp16")
    run(tmp_path / "b", Augmented(), batch_size=4, num_workers=0, precision="fp16", max_steps=5)
    resumed = run(tmp_path / "b", Augmented(), batch_size=4, num_workers=0, precision="fp16")
    assert_identical(reference, resumed)
    assert_resumed(resumed, reference, after_step=5, samples_done=5 * 4)


def test_changed_batch_size_on_resume_is_said_and_goes_on_from_the_same_sample(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Every setting's behaviour on rerun is tested in test_rerun.py; this is the resume-side view.
    run(tmp_path, Augmented(), batch_size=4, num_workers=0, max_steps=3)
    capsys.readouterr()
    again = run(tmp_path, Augmented(), batch_size=8, num_workers=0)
    assert "batch_size was 4 when the checkpoint was saved and is 8 now" in capsys.readouterr().out
    # 3 steps of 4 samples done: the rest of the epoch goes on in batches of 8 from sample 8.
    assert again.history.stop_reason == "completed" and again.steps.first == 4


@pytest.mark.filterwarnings("ignore:the checkpoint holds no 'optimizer_state_dict'")
def test_weights_saved_by_hand_are_a_warm_start(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from colabkit.checkpoint import CheckpointManager

    donor = make_model()
    with torch.no_grad():
        donor[0].weight.fill_(0.5)
    with CheckpointManager(tmp_path) as manager:
        manager.save({"model_state_dict": donor.state_dict()}, step=7)
    model = make_model()
    history = fit(model, Augmented(), checkpoint_dir=tmp_path, batch_size=4, num_workers=0, lr=1e-9, metrics=())
    assert len(history) == 1 and torch.allclose(model[0].weight, torch.full_like(model[0].weight, 0.5), atol=1e-6)
    assert "not written by fit()" in capsys.readouterr().out
