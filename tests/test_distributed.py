"""Multi-process training: launch() with the elastic launcher, torchrun, DDP on gloo, resume."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from colabkit.errors import ArgumentError
from colabkit.train.distributed import DistInfo, all_sum, any_flags, gather_objects, launch, setup

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fit_worker

WORKER = Path(__file__).resolve().parent / "fit_worker.py"


def test_single_process_helpers_are_identities(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info, device = setup(torch.device("cpu"))
    assert info == DistInfo() and info.is_main and not info.enabled and device == torch.device("cpu")
    assert all_sum([1.0, 2.0], device) == [1.0, 2.0]
    assert any_flags([True, False], device) == [True, False]
    assert gather_objects({"a": 1}) == [{"a": 1}]


def test_launch_one_process_runs_here() -> None:
    assert launch(lambda a, b=0: (os.getpid(), a + b), 1, b=2, nprocs=1) == (os.getpid(), 3)
    with pytest.raises(ArgumentError, match="nprocs=0"):
        launch(print, nprocs=0)
    with pytest.raises(ArgumentError, match="start_method='thread'"):
        launch(print, nprocs=2, start_method="thread")


@pytest.mark.slow
def test_launch_puts_the_callers_signal_handlers_back(tmp_path: Path) -> None:
    import signal

    def mine(signum: int, frame: object) -> None:
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        interrupt = signal.getsignal(signal.SIGINT)
        launch(fit_worker.ddp_train, str(tmp_path / "d"), str(tmp_path / "d.pt"), nprocs=2)
        assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGINT) is interrupt  # Ctrl-C in the notebook still interrupts
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_two_processes_resume_exactly_under_launch_and_torchrun(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    environment = dict(os.environ)
    reference = launch(fit_worker.ddp_train, str(tmp_path / "a"), str(tmp_path / "a.pt"), nprocs=2)
    assert reference == "completed@1 steps 1-24"  # 96 samples, 2 ranks, batches of 4, 2 epochs
    assert dict(os.environ) == environment
    # Rank 1 alone is signalled at step 3: both ranks stop together at the next agreement (step 8, mid-epoch).
    stopped = launch(fit_worker.ddp_train, str(tmp_path / "b"), str(tmp_path / "b.pt"), 3, nprocs=2)
    assert stopped == "interrupted@-1 steps 1-8"
    from colabkit.checkpoint import CheckpointManager

    saved = CheckpointManager(tmp_path / "b").load()["fit"]
    assert saved["position"]["step"] == 8 and saved["world_size"] == 2 and len(saved["rng"]) == 2
    # The same function under torchrun picks the run up and finishes it.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
               str(tmp_path / "b.pt"), "--ddp", "--dir", str(tmp_path / "b")]  # fmt: skip
    result = subprocess.run(command, env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "completed@1 steps 9-24" in result.stdout  # the witness: it went on after step 8
    a, b = torch.load(tmp_path / "a.pt", weights_only=True), torch.load(tmp_path / "b.pt", weights_only=True)
    for name, value in a["model"].items():
        assert torch.equal(value, b["model"][name]), name
    assert [r["val_loss"] for r in a["history"]] == [r["val_loss"] for r in b["history"]]
