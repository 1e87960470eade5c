"""Exact resume: interrupted + resumed runs end bit-identical to uninterrupted ones."""

from __future__ import annotations

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


def run(directory: Path | None, data: Any, **options: Any) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    settings: dict[str, Any] = {"epochs": 2, "seed": 3, "save_every": 2, "progress": False}
    settings.update(options)
    history = fit(model, data, optimizer=optimizer, checkpoint_dir=directory, **settings)
    return model, optimizer, history


def assert_identical(a: tuple[Any, ...], b: tuple[Any, ...]) -> None:
    (model_a, opt_a, hist_a), (model_b, opt_b, hist_b) = a, b
    for (name, p), q in zip(model_a.state_dict().items(), model_b.state_dict().values(), strict=True):
        assert torch.equal(p, q), f"parameter {name} differs"
    state_a, state_b = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        for name in state_a[key]:
            assert torch.equal(state_a[key][name], state_b[key][name]), f"optimizer state {key}.{name} differs"
    assert hist_a.records and [r["loss"] for r in hist_a] == [r["loss"] for r in hist_b]


@pytest.mark.parametrize(
    ("workers", "accum", "stops"),
    [(0, 1, [5]), (0, 3, [1]), (0, 2, [1, 3, 5])],
    ids=["mid-epoch", "accumulation", "three-resumes"],
)
def test_resumed_run_equals_uninterrupted(tmp_path: Path, workers: int, accum: int, stops: list[int]) -> None:
    def loader() -> DataLoader:  # type: ignore[type-arg]
        return DataLoader(Augmented(), batch_size=4, shuffle=True, num_workers=workers)

    reference = run(tmp_path / "a", loader(), grad_accum=accum)
    for stop in stops:
        _, _, partial = run(tmp_path / "b", loader(), grad_accum=accum, max_steps=stop)
        assert partial.stop_reason == "max_steps"
    resumed = run(tmp_path / "b", loader(), grad_accum=accum)
    assert_identical(reference, resumed)


def test_resume_with_two_workers_and_accumulation(tmp_path: Path) -> None:
    def loader() -> DataLoader:  # type: ignore[type-arg]
        return DataLoader(Augmented(), batch_size=4, shuffle=True, num_workers=2)

    reference = run(tmp_path / "a", loader(), grad_accum=2)
    run(tmp_path / "b", loader(), grad_accum=2, max_steps=4)
    assert_identical(reference, run(tmp_path / "b", loader(), grad_accum=2))


def test_resume_from_a_dataset_argument(tmp_path: Path) -> None:
    reference = run(tmp_path / "a", Augmented(), batch_size=4, num_workers=0)
    run(tmp_path / "b", Augmented(), batch_size=4, num_workers=0, max_steps=7)
    assert_identical(reference, run(tmp_path / "b", Augmented(), batch_size=4, num_workers=0))


def test_resume_with_a_custom_batch_sampler(tmp_path: Path) -> None:
    """A sampler colabkit does not know: its order is replayed from the epoch's saved RNG state."""

    def loader() -> DataLoader:  # type: ignore[type-arg]
        data = Augmented()
        sampler = BatchSampler(RandomSampler(data, num_samples=40), batch_size=4, drop_last=False)
        return DataLoader(data, batch_sampler=sampler)

    reference = run(tmp_path / "a", loader())
    run(tmp_path / "b", loader(), max_steps=6)
    assert_identical(reference, run(tmp_path / "b", loader()))


def test_skipped_batches_are_not_loaded(tmp_path: Path) -> None:
    run(tmp_path, DataLoader(Augmented(), batch_size=4, shuffle=True), epochs=1, max_steps=8)
    data = Augmented()
    run(tmp_path, DataLoader(data, batch_size=4, shuffle=True), epochs=1)
    assert data.loads == 44 - 8 * 4


def test_history_survives_resume_and_is_written_next_to_checkpoints(tmp_path: Path) -> None:
    reference = run(tmp_path / "a", Augmented(), batch_size=4, num_workers=0, epochs=3)
    _, _, first = run(tmp_path / "b", Augmented(), batch_size=4, num_workers=0, epochs=3, max_steps=14)
    assert len(first) == 1  # 11 steps per epoch: stopped inside the second
    _, _, resumed = run(tmp_path / "b", Augmented(), batch_size=4, num_workers=0, epochs=3)
    assert [r["epoch"] for r in resumed] == [0, 1, 2]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in reference[2]]
    csv = (tmp_path / "b" / "history.csv").read_text().splitlines()
    assert csv[0].startswith("epoch,loss,accuracy") and len(csv) == 4


def test_finished_run_is_not_trained_again(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, _, first = run(tmp_path, Augmented(), batch_size=4, num_workers=0, epochs=1)
    data = Augmented()
    model2, _, again = run(tmp_path, data, batch_size=4, num_workers=0, epochs=1, progress=True)
    assert data.loads == 0
    assert again.records == first.records and again.stop_reason == "completed"
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters(), strict=True))
    assert "already finished" in capsys.readouterr().out


def test_resume_false_starts_over(tmp_path: Path) -> None:
    run(tmp_path, Augmented(), batch_size=4, num_workers=0, epochs=1)
    data = Augmented()
    _, _, history = run(tmp_path, data, batch_size=4, num_workers=0, epochs=1, resume=False)
    assert data.loads == 44 and len(history) == 1


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
    with pytest.warns(UserWarning, match="reads and discards 3 batches"):
        history = fit(model, Stream(), epochs=2, batch_size=4, seed=1, checkpoint_dir=tmp_path, progress=False)
    assert len(history) == 2
    assert all(torch.equal(a, b) for a, b in zip(reference.parameters(), model.parameters(), strict=True))


def test_resume_with_fp16_grad_scaler(tmp_path: Path) -> None:
    """fp16 autocast with a GradScaler (on the CPU here) resumes exactly too."""
    reference = run(tmp_path / "a", Augmented(), batch_size=4, num_workers=0, precision="fp16")
    run(tmp_path / "b", Augmented(), batch_size=4, num_workers=0, precision="fp16", max_steps=5)
    assert_identical(reference, run(tmp_path / "b", Augmented(), batch_size=4, num_workers=0, precision="fp16"))


def test_changed_batch_size_on_resume_is_said_and_goes_on_from_the_same_sample(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Every setting's behaviour on rerun is tested in test_rerun.py; this is the resume-side view.
    run(tmp_path, Augmented(), batch_size=4, num_workers=0, max_steps=3)
    capsys.readouterr()
    _, _, history = run(tmp_path, Augmented(), batch_size=8, num_workers=0)
    assert "batch_size was 4 when the checkpoint was saved and is 8 now" in capsys.readouterr().out
    assert history.stop_reason == "completed"


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
