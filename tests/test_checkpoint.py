"""CheckpointManager: atomic commits, verification, rotation, safe loading, mirroring, kills."""

from __future__ import annotations

import collections
import errno
import json
import logging
import os
import pickle
import random
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from colabkit import _io, _notify, versions
from colabkit.checkpoint import (
    CheckpointInfo,
    CheckpointListing,
    CheckpointManager,
    load_checkpoint,
    load_weights,
    registry,
    restore_state,
    unwrap_model,
    weights_problems,
)
from colabkit.checkpoint import mirror as mirror_module
from colabkit.checkpoint import state as state_module
from colabkit.checkpoint.lease import LEASE_NAME
from colabkit.errors import (
    ArgumentError,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    ColabkitWarning,
)
from colabkit.train.state import capture_rng_state, restore_rng_state

WORKER = Path(__file__).with_name("_ckpt_worker.py")


def tiny_state(step: int, **extra: Any) -> dict[str, Any]:
    return {"model_state_dict": {"w": torch.full((8,), float(step))}, "epoch": step, **extra}


def manifests(folder: Path) -> dict[int, dict[str, Any]]:
    return {int(p.name[5:14]): json.loads(p.read_text()) for p in folder.iterdir() if p.name.endswith(".json")}


def files(folder: Path) -> list[Path]:
    """The folder's entries, less the lease an open manager holds there."""
    return [p for p in folder.iterdir() if p.name != LEASE_NAME]


def assert_clean(folder: Path) -> None:
    """Every file is a committed checkpoint whose hash matches: nothing partial, nothing orphaned."""
    found = manifests(folder)
    referenced = {m["files"][0]["name"] for m in found.values()}
    for path in folder.iterdir():
        assert not _io.is_temp_name(path.name), f"leftover temporary {path.name}"
        if path.suffix == ".pt":
            assert path.name in referenced, f"unreferenced data file {path.name}"
    for data in found.values():
        entry = data["files"][0]
        path = folder / entry["name"]
        assert path.stat().st_size == entry["size"]
        assert _io.hash_file(path) == entry["sha256"]
        assert torch.load(path, weights_only=True)["step"] == data["step"]


@pytest.fixture
def no_retry_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mirror_module, "_mirror_retry", lambda fn: _io.retry(fn, retries=3, sleep=lambda _s: None))


# --------------------------------------------------------------------------- basics


def test_save_commits_data_and_manifest_last(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    with CheckpointManager(tmp_path) as ckpt:
        path = ckpt.save(
            {"model_state_dict": model.state_dict(), "epoch": 4}, step=40, metrics={"val_loss": np.float64(0.25)}
        )
        ckpt.wait()
        assert ckpt.latest() == path
    data = manifests(tmp_path)[40]
    assert data["format"] == "colabkit.checkpoint"
    assert data["step"] == 40 and data["epoch"] == 4
    assert data["metrics"] == {"val_loss": 0.25}
    assert data["torch_version"] == torch.__version__
    assert "colabkit_version" in data
    assert data["files"][0]["sha256"] == _io.hash_file(path)
    # Plain PyTorch reads it the tutorial way.
    plain = torch.load(path)
    assert torch.equal(plain["model_state_dict"]["weight"], model.weight)
    assert plain["epoch"] == 4 and plain["step"] == 40 and plain["metrics"] == {"val_loss": 0.25}
    assert_clean(tmp_path)


def test_save_snapshots_so_training_can_go_on(tmp_path: Path) -> None:
    gate = threading.Event()
    weights = torch.zeros(4)
    history = [{"loss": 1.0}]
    with CheckpointManager(tmp_path) as ckpt:
        original = ckpt._commit
        ckpt._commit = lambda *a: (gate.wait(5), original(*a))  # type: ignore[method-assign]
        ckpt.save({"model_state_dict": {"w": weights}, "history": history}, step=1)
        # The caller keeps training before the background write even started.
        weights.add_(5)
        history.append({"loss": 0.5})
        history[0]["loss"] = 99.0
        assert manifests(tmp_path) == {} and files(tmp_path) == []
        gate.set()
        state = ckpt.load()  # load() waits for the local commit
    assert torch.equal(state["model_state_dict"]["w"], torch.zeros(4))
    assert state["history"] == [{"loss": 1.0}]


def test_consecutive_saves_keep_their_own_values(tmp_path: Path) -> None:
    # Snapshots reuse the previous save's CPU buffers: each file must still hold its own values.
    model = torch.nn.Linear(16, 16)
    tied = {"a": model.weight, "b": model.weight, "t": model.weight.t()}
    with CheckpointManager(tmp_path, keep_last=3) as ckpt:
        paths = []
        for step in range(3):
            with torch.no_grad():
                model.weight.fill_(step)
            paths.append(ckpt.save({"model_state_dict": model.state_dict(), "tied": tied}, step=step))
        ckpt.wait()
    for step, path in enumerate(paths):
        state = torch.load(path, weights_only=True)
        assert torch.equal(state["model_state_dict"]["weight"], torch.full((16, 16), float(step)))
        assert state["tied"]["a"].untyped_storage().data_ptr() == state["tied"]["b"].untyped_storage().data_ptr()
        assert torch.equal(state["tied"]["t"], torch.full((16, 16), float(step)))


def test_large_states_are_written_before_save_returns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state_module, "SNAPSHOT_MAX_BYTES", 0)
    gate = threading.Event()
    with CheckpointManager(tmp_path) as ckpt:
        original = ckpt._commit
        ckpt._commit = lambda *a: (gate.wait(5), original(*a))  # type: ignore[method-assign]
        ckpt.save(tiny_state(1), step=1)
        # Serialised under a temporary name, not committed: invisible to anyone scanning the folder.
        assert manifests(tmp_path) == {}
        assert [_io.is_temp_name(p.name) for p in files(tmp_path)] == [True]
        gate.set()
        assert ckpt.latest() is not None  # latest() waits for the local commit
        ckpt._commit = original  # type: ignore[method-assign]
        ckpt.save(tiny_state(2), step=2, blocking=True)
        assert 2 in manifests(tmp_path)
    assert_clean(tmp_path)


def test_restore_round_trip_and_returns_the_rest(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    model(torch.randn(5, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    state = {
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
        "scheduler_state_dict": scheduler.state_dict(),
        "scaler_state_dict": scaler.state_dict(),
        "epoch": 3,
        "history": [{"epoch": 1, "loss": 0.5}],
        "rng": capture_rng_state(),
    }
    with CheckpointManager(tmp_path) as ckpt:
        ckpt.save(state, step=7)
        fresh = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 1))
        fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
        fresh_sched = torch.optim.lr_scheduler.StepLR(fresh_opt, step_size=1, gamma=0.5)
        fresh_scaler = torch.amp.GradScaler("cpu", init_scale=1.0)
        rest = ckpt.restore(fresh, fresh_opt, fresh_sched, fresh_scaler)
    assert set(rest) == {"epoch", "history", "rng", "step"}
    assert rest["epoch"] == 3 and rest["step"] == 7 and rest["history"] == [{"epoch": 1, "loss": 0.5}]
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert fresh_sched.get_last_lr() == scheduler.get_last_lr()
    assert fresh_scaler.get_scale() == 1024.0
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])


def test_restore_with_nothing_saved_is_a_fresh_start(tmp_path: Path) -> None:
    model = torch.nn.Linear(2, 2)
    before = model.weight.clone()
    with CheckpointManager(tmp_path) as ckpt:
        assert ckpt.latest() is None
        assert ckpt.restore(model) == {}
        with pytest.raises(CheckpointNotFoundError, match="no usable checkpoint"):
            ckpt.load()
    assert torch.equal(model.weight, before)


def test_tutorial_format_files_restore(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    tutorial = tmp_path / "model.pt"
    torch.save(
        {
            "epoch": 5,
            "model_state_dict": model.state_dict(),
            "optimizer_state_dict": optimizer.state_dict(),
            "loss": 0.125,
        },
        tutorial,
    )
    bare = tmp_path / "weights.pth"
    torch.save(model.state_dict(), bare)
    with CheckpointManager(tmp_path / "ckpt") as ckpt:
        net, opt = torch.nn.Linear(3, 3), None
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        rest = ckpt.restore(net, opt, path=tutorial)
        assert rest == {"epoch": 5, "loss": 0.125}
        assert torch.equal(net.weight, model.weight)
        assert torch.equal(
            opt.state_dict()["state"][0]["momentum_buffer"], optimizer.state_dict()["state"][0]["momentum_buffer"]
        )
        other = torch.nn.Linear(3, 3)
        assert ckpt.restore(other, path=bare) == {}
        assert torch.equal(other.bias, model.bias)


def test_restore_mismatch_is_a_clear_error(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path) as ckpt:
        ckpt.save({"model_state_dict": torch.nn.Linear(3, 3).state_dict()}, step=1)
        with pytest.raises(CheckpointMismatchError, match="do not fit Linear"):
            ckpt.restore(torch.nn.Linear(4, 3))
        with pytest.raises(CheckpointNotFoundError, match="does not exist"):
            ckpt.restore(torch.nn.Linear(3, 3), path=tmp_path / "nope.pt")


def test_wrapped_models_save_and_load_plain(tmp_path: Path) -> None:
    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    parallel = torch.nn.DataParallel(net)
    compiled = torch.compile(net)  # wrapping only; nothing is compiled until it is called
    assert unwrap_model(parallel) is net
    assert unwrap_model(compiled) is net
    assert unwrap_model(torch.nn.DataParallel(torch.compile(net))) is net
    assert all(k.startswith("module.") for k in parallel.state_dict())
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    with CheckpointManager(tmp_path) as ckpt:
        path = ckpt.save({"model_state_dict": parallel.state_dict()}, step=1, blocking=True)
        assert sorted(torch.load(path)["model_state_dict"]) == sorted(net.state_dict())
        ckpt.save({"model_state_dict": compiled.state_dict()}, step=2)
        target = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
        ckpt.restore(torch.compile(target))
        assert torch.equal(target[0].weight, net[0].weight)
        # A file someone saved from a DDP model, keys prefixed, restores into a plain model.
        prefixed = tmp_path / "ddp.pt"
        torch.save({"model_state_dict": torch.nn.DataParallel(net).state_dict(), "epoch": 1}, prefixed)
        plain = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
        assert ckpt.restore(plain, path=prefixed) == {"epoch": 1}
        assert torch.equal(plain[2].bias, net[2].bias)


def test_rng_states_round_trip_through_weights_only(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    torch.manual_seed(3)
    state = capture_rng_state()
    expected = (random.random(), random.gauss(0, 1), np.random.rand(3), np.random.randn(), torch.rand(4))
    with CheckpointManager(tmp_path) as ckpt:
        ckpt.save({"rng": state}, step=1)
        random.seed(99)
        np.random.seed(99)
        torch.manual_seed(99)
        loaded = ckpt.load()  # weights_only=True, no safe globals registered
    restore_rng_state(loaded["rng"])
    again = (random.random(), random.gauss(0, 1), np.random.rand(3), np.random.randn(), torch.rand(4))
    assert again[0] == expected[0] and again[1] == expected[1] and again[3] == expected[3]
    assert np.array_equal(again[2], expected[2])
    assert torch.equal(again[4], expected[4])
    # torch before 2.4 has no allow-list at all, so nothing can have been added to it.
    allowed = getattr(torch.serialization, "get_safe_globals", list)()
    assert not [g for g in allowed if "numpy" in str(getattr(g, "__module__", g))], "numpy was allow-listed"
    with pytest.raises(ArgumentError, match="capture_rng_state"):
        restore_rng_state([1, 2])  # type: ignore[arg-type]


def test_rng_states_of_every_cuda_device_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No GPU here: fake two initialised CUDA devices with distinct generator states.
    devices = [torch.arange(16, dtype=torch.uint8), torch.arange(16, 32, dtype=torch.uint8)]
    restored: dict[int, torch.Tensor] = {}

    def fake_cuda(count: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [d.clone() for d in devices])
        monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.__setitem__(device, state))

    fake_cuda(2)
    state = capture_rng_state()
    monkeypatch.undo()  # saving and loading see the real (GPU-less) torch
    with CheckpointManager(tmp_path) as ckpt:
        ckpt.save({"rng": state}, step=1)
        loaded = ckpt.load()  # weights_only=True
    fake_cuda(2)
    restore_rng_state(loaded["rng"])
    assert sorted(restored) == [0, 1]
    assert torch.equal(restored[0], devices[0]) and torch.equal(restored[1], devices[1])
    fake_cuda(1)
    restored.clear()
    with pytest.warns(ColabkitWarning, match="RNG states for 2 CUDA devices but 1 are visible"):
        restore_rng_state(loaded["rng"])
    assert sorted(restored) == [0]


def test_save_refuses_what_weights_only_cannot_read(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path) as ckpt:
        with pytest.raises(ArgumentError, match=r"state\['extra'\]\['table'\] is a numpy.ndarray.*torch.from_numpy"):
            ckpt.save({"extra": {"table": np.zeros(3)}}, step=1)
        with pytest.raises(ArgumentError, match=r"state\['model'\] is a .*Linear.*state_dict\(\)"):
            ckpt.save({"model": torch.nn.Linear(1, 1)}, step=1)
        with pytest.raises(ArgumentError, match="step must be an int >= 0"):
            ckpt.save({}, step=-1)
        with pytest.raises(ArgumentError, match="step must be an int >= 0"):
            ckpt.save({}, step=True)
        with pytest.raises(ArgumentError, match="state must be a dict"):
            ckpt.save([1], step=1)  # type: ignore[arg-type]
        with pytest.raises(ArgumentError, match=r"metrics\['acc'\] is a list"):
            ckpt.save({}, step=1, metrics={"acc": [1]})
        assert manifests(tmp_path) == {}
        # numpy scalars (sklearn metrics, say) are stored as plain numbers.
        path = ckpt.save({"history": [{"acc": np.float32(0.5), "n": np.int64(3)}]}, step=2, blocking=True)
        assert torch.load(path, weights_only=True)["history"] == [{"acc": 0.5, "n": 3}]


def test_bad_options_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ArgumentError, match="keep_last must be"):
        CheckpointManager(tmp_path, keep_last=0)
    with pytest.raises(ArgumentError, match="keep_best=2 needs monitor"):
        CheckpointManager(tmp_path, keep_best=2)
    with pytest.raises(ArgumentError, match="mode must be 'min' or 'max'"):
        CheckpointManager(tmp_path, mode="lowest")  # type: ignore[arg-type]
    with pytest.raises(ArgumentError, match="is the checkpoint folder itself"):
        CheckpointManager(tmp_path, mirror=tmp_path)
    with CheckpointManager(tmp_path) as ckpt, pytest.raises(ArgumentError, match="best\\(\\) needs"):
        ckpt.best()
    with pytest.raises(CheckpointError, match="is closed"):
        ckpt.save({}, step=1)


def test_old_torch_notice_is_logged_once_and_never_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(versions, "torch_version_text", lambda: "2.9.1+cu121")
    _notify.reset_once()
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING, logger="colabkit"):
        warnings.simplefilter("error")  # a warnings-as-errors run on an old torch still works
        CheckpointManager(tmp_path).close()
        CheckpointManager(tmp_path).close()
    notices = [r.getMessage() for r in caplog.records if "CVE-2026-24747" in r.getMessage()]
    assert len(notices) == 1 and notices[0].startswith("torch 2.9.1+cu121 is older than 2.10")
    caplog.clear()
    monkeypatch.setattr(versions, "torch_version_text", lambda: "2.10.0")
    _notify.reset_once()
    with caplog.at_level(logging.WARNING, logger="colabkit"):
        CheckpointManager(tmp_path).close()
    assert not [r for r in caplog.records if "CVE" in r.getMessage()]


# --------------------------------------------------------------------------- rotation


def test_rotation_keeps_last_and_never_touches_foreign_files(tmp_path: Path) -> None:
    foreign = ["notes.txt", "step-000000001.pt", "best.pt", ".x.pt.colabkit-tmp-1-abcdef12"]
    for name in foreign:
        (tmp_path / name).write_text("mine")
    os.symlink(tmp_path / "notes.txt", tmp_path / "step-000000009-0000abcd.pt")
    with CheckpointManager(tmp_path, keep_last=2) as ckpt:
        for step in range(5):
            ckpt.save(tiny_state(step), step=step)
        ckpt.wait()
        assert [c.step for c in ckpt.checkpoints()] == [3, 4]
    assert sorted(manifests(tmp_path)) == [3, 4]
    for name in foreign:
        assert (tmp_path / name).read_text() == "mine"
    assert (tmp_path / "step-000000009-0000abcd.pt").is_symlink()
    assert len(list(tmp_path.glob("step-*-*.pt"))) == 3  # two checkpoints + the symlink


def test_opening_never_prunes_without_a_new_commit(tmp_path: Path) -> None:
    local, mirror = tmp_path / "local", tmp_path / "mirror"
    with CheckpointManager(local, keep_last=3, mirror=mirror) as ckpt:
        for step in range(3):
            ckpt.save(tiny_state(step), step=step)
    with CheckpointManager(local, keep_last=1, mirror=mirror) as reader:
        assert reader.load()["epoch"] == 2
        reader.wait()
        assert sorted(manifests(local)) == sorted(manifests(mirror)) == [0, 1, 2]
        reader.save(tiny_state(3), step=3)
        reader.wait()
    assert sorted(manifests(local)) == sorted(manifests(mirror)) == [3]


def test_keep_best_by_monitor(tmp_path: Path) -> None:
    losses = [0.9, 0.2, 0.5, 0.1, 0.7, 0.8]
    with CheckpointManager(tmp_path, keep_last=1, keep_best=2, monitor="val_loss") as ckpt:
        for step, loss in enumerate(losses):
            ckpt.save(tiny_state(step), step=step, metrics={"val_loss": loss})
        ckpt.wait()
        assert sorted(manifests(tmp_path)) == [1, 3, 5]
        assert ckpt.best() is not None and ckpt.best().name.startswith("step-000000003-")  # type: ignore[union-attr]
        assert ckpt.latest().name.startswith("step-000000005-")  # type: ignore[union-attr]
    with CheckpointManager(tmp_path / "max", keep_last=1, keep_best=1, monitor="acc", mode="max") as ckpt:
        for step, acc in enumerate([0.1, 0.9, float("nan"), 0.3]):
            ckpt.save(tiny_state(step), step=step, metrics={"acc": acc})
        ckpt.wait()
        assert sorted(manifests(tmp_path / "max")) == [1, 3]
        assert ckpt.best().name.startswith("step-000000001-")  # type: ignore[union-attr]


def test_resaving_a_step_replaces_it_only_when_complete(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, keep_last=3) as ckpt:
        first = ckpt.save(tiny_state(1, revision=1), step=1, blocking=True)
        second = ckpt.save(tiny_state(1, revision=2), step=1, blocking=True)
        assert first != second and not first.exists()
        assert ckpt.load()["revision"] == 2
    assert_clean(tmp_path)


def test_newest_by_save_time_not_step(tmp_path: Path) -> None:
    # Resuming from an earlier step must not let rotation eat the new checkpoints.
    with CheckpointManager(tmp_path, keep_last=2) as ckpt:
        for step in (100, 200, 150, 160):
            ckpt.save(tiny_state(step), step=step)
        ckpt.wait()
        assert sorted(manifests(tmp_path)) == [150, 160]
        assert ckpt.load()["epoch"] == 160


def test_stale_temporaries_are_cleaned_on_start(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    ours = tmp_path / f".step-000000003-0badf00d.pt{_io.TEMP_MARK}{dead_pid}-deadbeef"
    ours.write_bytes(b"partial")
    alive = tmp_path / f".step-000000004-0badf00d.pt{_io.TEMP_MARK}{os.getpid()}-deadbeef"
    alive.write_bytes(b"being written")
    old_orphan = tmp_path / "step-000000002-00000000.pt"
    old_orphan.write_bytes(b"no manifest")
    os.utime(old_orphan, (1, 1))
    fresh_orphan = tmp_path / "step-000000005-00000000.pt"
    fresh_orphan.write_bytes(b"maybe being committed by a live writer")
    foreign = tmp_path / f".data.bin{_io.TEMP_MARK}{dead_pid}-deadbeef"
    foreign.write_bytes(b"someone else's")
    CheckpointManager(tmp_path).close()  # a reader deletes nothing
    assert ours.exists() and old_orphan.exists()
    CheckpointManager(tmp_path).acquire().close()  # a writer's start cleans up
    assert not ours.exists() and not old_orphan.exists()
    assert alive.exists() and fresh_orphan.exists() and foreign.exists()


# --------------------------------------------------------------------------- corruption and safety


def _three_checkpoints(folder: Path) -> list[Path]:
    with CheckpointManager(folder, keep_last=3) as ckpt:
        paths = [ckpt.save(tiny_state(step), step=step) for step in (1, 2, 3)]
    return paths


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "manifest"])
def test_corrupt_newest_falls_back_with_a_warning(tmp_path: Path, damage: str) -> None:
    paths = _three_checkpoints(tmp_path)
    newest = paths[-1]
    if damage == "flip":
        data = bytearray(newest.read_bytes())
        data[len(data) // 2] ^= 0xFF
        newest.write_bytes(bytes(data))
    elif damage == "truncate":
        newest.write_bytes(newest.read_bytes()[:100])
    elif damage == "delete":
        newest.unlink()
    else:
        (tmp_path / "step-000000003.json").write_text('{"format": "colabkit.checkpoint", "step": 3, "fi')
    ckpt = CheckpointManager(tmp_path, keep_last=3)
    with pytest.warns(ColabkitWarning, match="skipping checkpoint .*step-000000003"):
        assert ckpt.latest() == paths[1]
    if damage == "manifest":
        assert ckpt.load()["epoch"] == 2  # an unreadable manifest is reported once
    else:
        with pytest.warns(ColabkitWarning, match="skipping checkpoint .*step-000000003"):
            assert ckpt.load()["epoch"] == 2
    ckpt.close()
    if damage == "flip":
        with pytest.raises(CheckpointError, match="sha256 does not match"):
            load_checkpoint(newest)


def test_load_rehashes_what_latest_trusts(tmp_path: Path) -> None:
    # latest() trusts an unchanged (size, mtime); load() still checks the full sha256.
    paths = _three_checkpoints(tmp_path)
    newest = paths[-1]
    stat = newest.stat()
    data = bytearray(newest.read_bytes())
    data[-30] ^= 0x01
    newest.write_bytes(bytes(data))
    os.utime(newest, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with CheckpointManager(tmp_path, keep_last=3) as ckpt:
        assert ckpt.latest() == newest
        with pytest.warns(ColabkitWarning, match="sha256 does not match"):
            assert ckpt.load()["epoch"] == 2


class Payload:
    """Unpickling this creates the sentinel file: proof that code ran."""

    sentinel = ""

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.sentinel, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path) -> None:
    sentinel = tmp_path / "pwned"
    Payload.sentinel = str(sentinel)
    torch_file = tmp_path / "evil.pt"
    torch.save({"model_state_dict": {}, "x": Payload()}, torch_file)
    raw_file = tmp_path / "evil.pkl"
    raw_file.write_bytes(pickle.dumps({"x": Payload()}))
    with CheckpointManager(tmp_path / "ckpt", keep_last=3) as ckpt:
        for bad in (torch_file, raw_file):
            with pytest.raises(CheckpointError, match=r"refused to load .*never loads such files unsafely"):
                ckpt.load(bad)
            with pytest.raises(CheckpointError, match="refused"):
                ckpt.restore(torch.nn.Linear(1, 1), path=bad)
        # Planted as the newest checkpoint, with a manifest that matches its bytes.
        good = ckpt.save(tiny_state(1), step=1, blocking=True)
        planted = good.with_name("step-000000002-0badc0de.pt")
        planted.write_bytes(torch_file.read_bytes())
        manifest = json.loads((good.parent / "step-000000001.json").read_text())
        manifest.update(step=2, created_ns=manifest["created_ns"] + 1)
        manifest["files"][0].update(name=planted.name, size=planted.stat().st_size, sha256=_io.hash_file(planted))
        (good.parent / "step-000000002.json").write_text(json.dumps(manifest))
        with pytest.warns(ColabkitWarning, match="refused to load"):
            assert ckpt.load()["epoch"] == 1
    assert not sentinel.exists()


# --------------------------------------------------------------------------- fault injection


class FaultyOps(_io.FileOps):
    """Fails the n-th call of one operation with one errno; counts calls otherwise."""

    def __init__(self, op: str = "", nth: int = 0, code: int = errno.EIO) -> None:
        self.op, self.nth, self.code = op, nth, code
        self.calls: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()
        self.fired = False

    def _tick(self, op: str) -> None:
        with self.lock:
            self.calls[op] += 1
            if op == self.op and self.calls[op] == self.nth:
                self.fired = True
                raise OSError(self.code, f"injected {errno.errorcode[self.code]} on {op} #{self.nth}")

    def open(self, path: Any, mode: str) -> Any:
        self._tick("open")
        return super().open(path, mode)

    def write(self, handle: Any, data: bytes) -> None:
        self._tick("write")
        super().write(handle, data)

    def fsync(self, fd: int) -> None:
        self._tick("fsync")
        super().fsync(fd)

    def replace(self, src: Any, dst: Any) -> None:
        self._tick("replace")
        super().replace(src, dst)

    def copy_chunk(self, src: Any, size: int) -> bytes:
        self._tick("copy_chunk")
        return super().copy_chunk(src, size)


def _save_second(root: Path, monkeypatch: pytest.MonkeyPatch, ops: FaultyOps) -> CheckpointError | None:
    local, mirror = root / "local", root / "mirror"
    with CheckpointManager(local, mirror=mirror) as ckpt:
        ckpt.save(tiny_state(1), step=1)
    ckpt = CheckpointManager(local, mirror=mirror).acquire()
    monkeypatch.setattr(_io, "ops", ops)  # after the lease is taken: this is about saving
    error = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ColabkitWarning)
            ckpt.save(tiny_state(2), step=2)
            ckpt.close()
    except CheckpointError as exc:
        error = exc
        ckpt._closed = True
    finally:
        monkeypatch.setattr(_io, "ops", _io.FileOps())
    return error


@pytest.mark.slow
def test_fail_each_write_fsync_rename_and_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_retry_sleep: None
) -> None:
    counter = FaultyOps()
    assert _save_second(tmp_path / "count", monkeypatch, counter) is None
    assert all(counter.calls[op] for op in ("open", "write", "fsync", "replace", "copy_chunk")), counter.calls
    trials = 0
    for op, total in sorted(counter.calls.items()):
        for code in (errno.EIO, errno.ENOSPC, errno.EXDEV):
            for nth in range(1, total + 1):
                root = tmp_path / f"{op}-{errno.errorcode[code]}-{nth}"
                faulty = FaultyOps(op, nth, code)
                error = _save_second(root, monkeypatch, faulty)
                assert faulty.fired, (op, nth)
                trials += 1
                for folder in (root / "local", root / "mirror"):
                    assert_clean(folder)
                    # The previous checkpoint is intact wherever it was.
                    assert 1 in manifests(folder), (op, code, nth, folder)
                    step2 = manifests(folder).get(2)
                    if step2 is None:
                        # Not saved there: the caller was told (EIO on the mirror is retried instead).
                        assert error is not None, (op, code, nth, folder)
                        assert "step 2" in str(error)
                with CheckpointManager(root / "local", mirror=root / "mirror") as ckpt:
                    assert ckpt.load()["epoch"] in (1, 2)
    assert trials > 50


def test_transient_mirror_errors_are_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_retry_sleep: None
) -> None:
    faulty = FaultyOps("copy_chunk", 1, errno.ENOTCONN)
    assert _save_second(tmp_path, monkeypatch, faulty) is None
    assert faulty.fired
    assert sorted(manifests(tmp_path / "mirror")) == [1, 2]
    assert_clean(tmp_path / "mirror")


def test_mirror_uses_drive_retry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from colabkit import drive

    calls: list[int] = []

    def fake_drive_retry(fn: Any, *, retries: int = 3, sleep: Any = None) -> Any:
        calls.append(retries)
        return fn()

    monkeypatch.setattr(drive, "drive_retry", fake_drive_retry)
    with CheckpointManager(tmp_path / "a", mirror=tmp_path / "b") as ckpt:
        ckpt.save(tiny_state(1), step=1)
    assert calls and set(calls) == {3}


def test_persistent_mirror_failure_is_loud_then_heals(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_retry_sleep: None
) -> None:
    mirror = tmp_path / "drive"

    class FullDrive(_io.FileOps):
        def write(self, handle: Any, data: bytes) -> None:
            if str(mirror) in str(getattr(handle, "name", "")):
                raise OSError(errno.ENOSPC, "No space left on device")
            super().write(handle, data)

    ckpt = CheckpointManager(tmp_path / "local", mirror=mirror)
    monkeypatch.setattr(_io, "ops", FullDrive())
    ckpt.save(tiny_state(1), step=1)
    with (
        pytest.warns(ColabkitWarning, match=r"could not copy checkpoint step 1 to .*drive.*No space left"),
        pytest.raises(CheckpointError, match="could not copy checkpoint step 1"),
    ):
        ckpt.wait()
    assert manifests(mirror) == {}
    assert ckpt.load()["epoch"] == 1  # the local copy is intact
    monkeypatch.setattr(_io, "ops", _io.FileOps())
    ckpt.save(tiny_state(2), step=2)
    ckpt.close()  # the next pass copies what the mirror lacks, step 1 included
    assert sorted(manifests(mirror)) == [1, 2]
    assert_clean(mirror)


def test_a_mirror_copy_that_reads_back_wrong_is_not_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_retry_sleep: None
) -> None:
    mirror = tmp_path / "drive"

    class LossyDrive(_io.FileOps):
        # A FUSE mount that acknowledges writes but stores other bytes.
        def write(self, handle: Any, data: bytes) -> None:
            if str(mirror) in str(getattr(handle, "name", "")) and data:
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            super().write(handle, data)

    ckpt = CheckpointManager(tmp_path / "local", mirror=mirror)
    monkeypatch.setattr(_io, "ops", LossyDrive())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ColabkitWarning)
        ckpt.save(tiny_state(1), step=1)
        with pytest.raises(CheckpointError, match="read back with a different sha256"):
            ckpt.wait()
    assert manifests(mirror) == {}
    assert list(mirror.iterdir()) == []  # the bad copy is gone, not left unreferenced
    monkeypatch.setattr(_io, "ops", _io.FileOps())
    ckpt.save(tiny_state(2), step=2)
    ckpt.close()  # the next pass copies step 1 too
    assert sorted(manifests(mirror)) == [1, 2]
    assert_clean(mirror)


# --------------------------------------------------------------------------- mirror / Drive


def test_mirror_copies_rotates_and_serves_a_fresh_runtime(tmp_path: Path) -> None:
    local, mirror = tmp_path / "local", tmp_path / "drive" / "run"
    with CheckpointManager(local, keep_last=2, mirror=mirror) as ckpt:
        for step in range(4):
            ckpt.save(tiny_state(step), step=step, metrics={"loss": 1.0})
        ckpt.wait()
        assert sorted(manifests(mirror)) == [2, 3]
    assert not [t for t in threading.enumerate() if t.name.startswith("colabkit-checkpoint")]
    assert_clean(mirror)
    for path in local.iterdir():
        path.unlink()  # the runtime died: local disk is gone, Drive remains
    with CheckpointManager(local, mirror=mirror) as ckpt:
        assert ckpt.latest() is not None and ckpt.latest().parent == mirror  # type: ignore[union-attr]
        model = torch.nn.Linear(1, 1)
        rest = ckpt.restore(path=None)
        assert rest["epoch"] == 3
        ckpt.save(tiny_state(4), step=4)
        ckpt.wait()
        assert sorted(manifests(mirror)) == [3, 4]
    del model


def test_catch_up_mirrors_what_an_interrupted_run_left(tmp_path: Path) -> None:
    local, mirror = tmp_path / "local", tmp_path / "mirror"
    with CheckpointManager(local) as ckpt:  # the mirror never got these
        ckpt.save(tiny_state(1), step=1)
        ckpt.save(tiny_state(2), step=2)
    stale = mirror / f".step-000000002-12345678.pt{_io.TEMP_MARK}999999999-abcdef12"
    mirror.mkdir()
    stale.write_bytes(b"half a copy")
    os.utime(stale, (1, 1))
    with CheckpointManager(local, mirror=mirror) as ckpt:
        ckpt.wait()  # a reader copies nothing
        assert stale.exists() and manifests(mirror) == {}
        ckpt.acquire()  # the writer catches the mirror up
        ckpt.wait()
    assert sorted(manifests(mirror)) == [1, 2]
    assert not stale.exists()
    assert_clean(mirror)


def test_drive_directory_is_staged_locally(tmp_path: Path) -> None:
    from colabkit.testing import fake_colab

    with fake_colab(root=tmp_path) as colab:
        target = colab.path("/content/drive/MyDrive/run1/checkpoints")
        with CheckpointManager(target) as ckpt:
            assert ckpt.local_dir != target
            assert colab.path("/content") in ckpt.local_dir.parents
            path = ckpt.save(tiny_state(1), step=1)
            assert path.parent == ckpt.local_dir
            ckpt.wait()
            assert sorted(manifests(target)) == [1]
        assert_clean(target)
        with CheckpointManager(target, staging_dir=None) as direct:
            assert direct.local_dir == target
            assert direct.load()["epoch"] == 1


# --------------------------------------------------------------------------- kill anywhere


@pytest.fixture
def zygote(subprocess_env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), "zygote"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    yield proc
    assert proc.stdin is not None
    proc.stdin.write("quit\n")
    proc.stdin.flush()
    proc.wait(timeout=30)
    proc.stdin.close()
    proc.stdout.close()
    assert proc.stderr is not None
    proc.stderr.close()


@pytest.mark.slow
def test_kill_anywhere(tmp_path: Path, zygote: subprocess.Popen[str]) -> None:
    """A saver SIGKILLed at random moments never leaves latest() pointing at a bad checkpoint.

    No rate is assumed: most kills wait for the saver's next one or two commits, then land
    a few random milliseconds into the saves that follow, however slow the machine is; the
    rest land at random in its start-up (leftover cleanup, first save). On a slow machine
    the run ends after a time budget, once it has made at least ``least`` kills.
    """
    rng = random.Random(20261121)
    assert zygote.stdin is not None and zygote.stdout is not None
    folder = tmp_path / "ckpt"
    seen_steps: list[int] = []
    previous = -1
    kills, least, budget_s, waited = 220, 60, 90.0, 0
    started = time.monotonic()
    for trial in range(kills):
        if trial >= least and time.monotonic() - started > budget_s:
            break
        commits = 0 if rng.random() < 0.25 else rng.choice((1, 2))
        waited += commits > 0
        delay_ms = rng.uniform(0, 40) if commits == 0 else rng.uniform(0, 15)
        zygote.stdin.write(f"kill {folder} {commits} {delay_ms:.2f}\n")
        zygote.stdin.flush()
        reply = zygote.stdout.readline().split()
        assert reply != ["stalled"], f"trial {trial}: the saver committed nothing new for a minute"
        assert reply[0] == "status", reply
        assert int(reply[1]) == -9, f"trial {trial}: saver exited {reply[1]} instead of being killed"
        # Every committed (manifest-visible) checkpoint is whole, not just the one latest() picks.
        for step, data in manifests(folder).items():
            entry = data["files"][0]
            path = folder / entry["name"]
            assert path.exists(), f"trial {trial}: step {step} committed without its data"
            assert path.stat().st_size == entry["size"], f"trial {trial}: step {step} truncated"
            assert _io.hash_file(path) == entry["sha256"], f"trial {trial}: step {step} corrupt"
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback needed: nothing broken was ever visible
            ckpt = CheckpointManager(folder, keep_last=2)
            latest = ckpt.latest()
        with ckpt:
            if latest is None:
                assert previous == -1, f"trial {trial}: checkpoints vanished"
                continue
            state = ckpt.load(latest)
            entry = manifests(folder)[state["step"]]["files"][0]
            assert entry["name"] == latest.name
            assert entry["size"] == latest.stat().st_size
            assert entry["sha256"] == _io.hash_file(latest)
            assert torch.equal(state["model_state_dict"]["w"], torch.full((64,), float(state["step"])))
            assert state["epoch"] == state["step"]
            # Committed checkpoints only ever get newer: rotation never ran ahead of a commit.
            assert state["step"] >= previous, f"trial {trial}: went back from {previous} to {state['step']}"
            previous = state["step"]
            seen_steps.append(previous)
            ckpt.acquire()  # as the next writer: the killed saver's leftovers go (a reader deletes nothing)
            assert not any(_io.is_temp_name(p.name) for p in folder.iterdir())
    # Each waited-for commit stays visible after the kill, so latest() moved on at least that often.
    assert len(set(seen_steps)) >= waited, "a committed checkpoint was lost to a later kill"


def test_forked_child_does_not_wait_for_or_write_with_parent_threads(tmp_path: Path) -> None:
    gate = threading.Event()
    ckpt = CheckpointManager(tmp_path)
    original = ckpt._commit
    ckpt._commit = lambda *a: (gate.wait(10), original(*a))  # type: ignore[method-assign]
    ckpt.save(tiny_state(1), step=1)  # a commit is pending in a thread the child will not have
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            ckpt.wait()  # must return at once: the thread it would wait for does not exist here
            try:
                ckpt.save(tiny_state(2), step=2)
            except CheckpointError:
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    gate.set()
    ckpt.close()
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert sorted(manifests(tmp_path)) == [1]


def test_end_session_waits_for_pending_mirror_copies(tmp_path: Path) -> None:
    from colabkit import session

    manager = CheckpointManager(tmp_path / "local", mirror=tmp_path / "mirror")
    manager.save({"model_state_dict": {"w": torch.ones(3)}, "epoch": 1}, step=1)
    assert manager in registry.live_managers()
    session.end_session(flush=False)
    mirrored = CheckpointListing(tmp_path / "mirror").latest()  # a reader: no lease, no threads
    assert mirrored is not None
    manager.close()


# --------------------------------------------------------------------------- shutdown and interruption

EXIT_SCRIPT = r"""
import atexit, sys, time
import torch
from colabkit.checkpoint import CheckpointManager, mirror

ckpt = CheckpointManager(sys.argv[1] + "/local", mirror=sys.argv[1] + "/mirror")
ckpt.wait()  # the mirror lane's thread is gone: the copy below needs a new one
original = ckpt._commit
ckpt._commit = lambda *a: (time.sleep(0.3), original(*a))
ckpt.save({"model_state_dict": {"w": torch.ones(4)}, "epoch": 1}, step=1)


def forbid_threads(thread):
    raise RuntimeError("can't create new thread at interpreter shutdown")


# Registered last, so it runs first: from here on threads cannot start, as on Python 3.12+.
atexit.register(lambda: setattr(mirror, "_start_thread", forbid_threads))
"""


def test_exit_flush_copies_even_when_no_thread_may_start(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    # The script never calls close(): the atexit flush must commit and mirror without new threads.
    done = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        env=subprocess_env,
        timeout=60,  # before the fix, exit hung forever joining a thread that never started
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "background checkpoint job failed" not in done.stderr
    assert sorted(manifests(tmp_path / "local")) == sorted(manifests(tmp_path / "mirror")) == [1]
    assert_clean(tmp_path / "mirror")


def test_lanes_run_inline_when_threads_cannot_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def forbid(thread: threading.Thread) -> None:
        raise RuntimeError("can't create new thread at interpreter shutdown")

    monkeypatch.setattr(mirror_module, "_start_thread", forbid)
    with CheckpointManager(tmp_path / "local", mirror=tmp_path / "mirror") as ckpt:
        path = ckpt.save(tiny_state(1), step=1)
        assert path.exists()  # done in this thread
        ckpt.save(tiny_state(2), step=2)
    assert sorted(manifests(tmp_path / "mirror")) == [1, 2]
    assert not [t for t in threading.enumerate() if t.name.startswith("colabkit-checkpoint")]


def test_interrupted_close_still_flushes_later(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = CheckpointManager(tmp_path / "local", mirror=tmp_path / "mirror")
    ckpt.save(tiny_state(1), step=1)
    real_wait = ckpt.wait

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "wait", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ckpt.close()  # Ctrl-C while closing
    with pytest.raises(CheckpointError, match="is closed"):
        ckpt.save(tiny_state(2), step=2)
    assert registry.is_live(ckpt), "the exit flush would skip a manager whose close() was interrupted"
    monkeypatch.setattr(ckpt, "wait", real_wait)
    ckpt.close()
    assert not registry.is_live(ckpt)
    assert sorted(manifests(tmp_path / "mirror")) == [1]


def test_wait_retries_a_failed_mirror_copy_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_retry_sleep: None, capsys: pytest.CaptureFixture[str]
) -> None:
    # ENOSPC is not transient, so the copy's own retries give up; wait() tries the pass once more.
    faulty = FaultyOps("copy_chunk", 1, errno.ENOSPC)
    assert _save_second(tmp_path, monkeypatch, faulty) is None
    assert faulty.fired
    assert "could not copy checkpoint step 2" in capsys.readouterr().out  # the failure was still loud
    assert sorted(manifests(tmp_path / "mirror")) == [1, 2]


def test_a_copy_superseded_by_a_resave_is_not_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = CheckpointManager(tmp_path / "local", mirror=tmp_path / "mirror")
    original = ckpt._mirror.mirror_one
    calls: list[int] = []

    def resaved_meanwhile(info: CheckpointInfo, remote: Any) -> bool:
        calls.append(info.step)
        if len(calls) == 1:
            info.path.unlink()  # what committing a re-save of this step does to the old file
        return original(info, remote)

    monkeypatch.setattr(ckpt._mirror, "mirror_one", resaved_meanwhile)
    ckpt.save(tiny_state(1), step=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ckpt.wait()
    assert calls[0] == 1
    ckpt.close()


def test_a_background_commit_failure_surfaces_at_the_next_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = CheckpointManager(tmp_path)
    monkeypatch.setattr(_io, "ops", FaultyOps("fsync", 1, errno.ENOSPC))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt.save(tiny_state(1), step=1)  # returns before the (failing) background commit
        with pytest.raises(CheckpointError, match=r"step 1 was not saved in .*ENOSPC.*free disk space"):
            ckpt.save(tiny_state(2), step=2)
    assert any("step 1 was not saved" in str(w.message) for w in caught), "the failure was not warned about"
    assert manifests(tmp_path) == {}
    ckpt.save(tiny_state(2), step=2, blocking=True)  # reported once; saving goes on
    ckpt.close()
    assert sorted(manifests(tmp_path)) == [2]
    assert_clean(tmp_path)


OLD_FOLDER = Path(__file__).parent / "data" / "old_checkpoint"


def test_checkpoints_written_by_the_old_single_module_still_load(tmp_path: Path) -> None:
    """tests/data/old_checkpoint was written by colabkit/checkpoint.py before it became a package."""
    import shutil

    folder = tmp_path / "old"
    shutil.copytree(OLD_FOLDER, folder)
    torch.manual_seed(0)
    expected = torch.nn.Linear(3, 2).state_dict()  # the weights saved at step 5 (doubled at step 9)
    with CheckpointManager(folder, keep_last=2, monitor="val_loss", staging_dir=None) as ckpt:
        assert [info.step for info in ckpt.checkpoints()] == [5, 9]
        latest, best = ckpt.latest(), ckpt.best()
        assert latest is not None and latest.name.startswith("step-000000009-")
        assert best is not None and best.name.startswith("step-000000005-")
        model = torch.nn.Linear(3, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        rest = ckpt.restore(model, optimizer, path=best)
    assert rest["epoch"] == 1 and rest["metrics"] == {"val_loss": 0.5}
    assert optimizer.param_groups[0]["lr"] == 0.1
    for key, value in expected.items():
        assert torch.equal(model.state_dict()[key], value)
    newest = load_checkpoint(folder)
    assert torch.equal(newest["model_state_dict"]["bias"], expected["bias"] * 2)
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in OLD_FOLDER.iterdir())


def test_one_weights_check_names_missing_unexpected_and_reshaped_keys() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    saved = {f"module.{k}": v for k, v in model.state_dict().items()}  # DDP keys fit once stripped
    assert weights_problems(torch.nn.DataParallel(model), saved) == []
    saved["module.1.weight"] = torch.zeros(5, 3)
    del saved["module.0.bias"]
    saved["module.head.weight"] = torch.zeros(1)
    problems = weights_problems(model, saved)
    assert problems == [
        "missing keys ['0.bias']",
        "unexpected keys ['head.weight']",
        "size mismatch for '1.weight': [5, 3] saved, [2, 3] in the model",
    ]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match=r"weights do not fit Sequential: missing keys \['0\.bias'\]"):
        load_weights(model, saved)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "a failed load changed the model"


def test_a_listing_reads_like_the_manager_and_writes_nothing(tmp_path: Path) -> None:
    with CheckpointManager(tmp_path, keep_last=None, monitor="val_loss") as ckpt:
        for step, loss in ((1, 0.3), (2, 0.1), (3, 0.2)):
            ckpt.save(tiny_state(step), step=step, metrics={"val_loss": loss})
        ckpt.wait()
        expected = (ckpt.latest(), ckpt.best(), [i.step for i in ckpt.checkpoints()])
    leftover = tmp_path / "step-000000009-0123abcd.pt"
    leftover.write_bytes(b"x")
    os.utime(leftover, (1, 1))  # stale and unreferenced: a manager's start would delete it
    listing = CheckpointListing(tmp_path)
    latest, best = listing.latest(), listing.best("val_loss")
    assert latest is not None and best is not None
    assert (latest.path, best.path, [i.step for i in listing.checkpoints()]) == expected
    worst = listing.best("val_loss", "max")
    assert worst is not None and worst.step == 1
    assert listing.load()["step"] == 3
    assert leftover.exists()


def test_the_optimizer_built_here_keeps_its_own_implementation_flags() -> None:
    """A checkpoint from a torch with a fused CPU kernel resumes on one without: the update is the same,
    only how this torch runs it differs, so fused/foreach stay this optimizer's (torch 2.3 has no
    fused AdamW on the CPU and fails at the first step with fused=True)."""
    model = torch.nn.Linear(3, 2)
    saved_optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, foreach=False)
    saved = saved_optimizer.state_dict()
    saved["param_groups"][0].update(fused=True, foreach=True)  # as a newer torch wrote it
    here = torch.optim.AdamW(model.parameters(), lr=0.5, foreach=False)
    restore_state({"optimizer_state_dict": saved}, optimizer=here)
    group = here.param_groups[0]
    assert (group["fused"], group["foreach"]) == (None, False)  # this process's choice
    assert group["lr"] == 0.1  # the hyperparameters are the checkpoint's
    model(torch.ones(1, 3)).sum().backward()
    here.step()
