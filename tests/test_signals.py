"""save_on_signal(): SIGTERM / SIGINT become a flag; handlers restored; real signals, real processes."""

from __future__ import annotations

import builtins
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from colabkit._signals import SignalFlag, save_on_signal

WORKER = Path(__file__).with_name("_ckpt_worker.py")


def test_sigterm_sets_the_flag_and_handlers_come_back() -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with save_on_signal() as flag:
        assert flag.installed and not flag.requested and flag.exit_code == 0
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # the handler runs in the main thread at the next bytecode
        assert flag.requested
        assert flag.signal == "SIGTERM" and flag.count == 1 and flag.exit_code == 143
    assert {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)} == before


def test_first_sigint_is_a_flag_second_interrupts_at_once() -> None:
    with pytest.raises(KeyboardInterrupt), save_on_signal() as flag:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert flag.requested and flag.signal == "SIGINT" and flag.exit_code == 130
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
        pytest.fail("a second SIGINT did not interrupt")
    assert flag.count == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_second_sigterm_exits() -> None:
    with pytest.raises(SystemExit) as info, save_on_signal() as flag:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
    assert info.value.code == 143 and flag.count == 2


def test_previous_custom_handler_is_restored() -> None:
    seen: list[int] = []

    def mine(signum: int, frame: Any) -> None:
        seen.append(signum)

    old = signal.signal(signal.SIGTERM, mine)
    try:
        with save_on_signal() as flag:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
        assert flag.requested and seen == []  # deferred to the flag while inside
        assert signal.getsignal(signal.SIGTERM) is mine
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, old)


def test_ignored_signals_stay_ignored() -> None:
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with save_on_signal() as flag:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
            assert not flag.requested
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, old)


def test_handler_does_no_io(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("I/O inside the signal handler")

    with save_on_signal() as flag:
        monkeypatch.setattr(builtins, "open", forbidden)
        monkeypatch.setattr(builtins, "print", forbidden)
        monkeypatch.setattr(os, "write", forbidden)
        monkeypatch.setattr(sys.stdout, "write", forbidden)
        monkeypatch.setattr(sys.stderr, "write", forbidden)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        monkeypatch.undo()
    assert flag.requested


def test_off_the_main_thread_it_is_a_no_op() -> None:
    before = signal.getsignal(signal.SIGTERM)
    result: list[SignalFlag] = []

    def worker() -> None:
        with save_on_signal() as flag:
            assert signal.getsignal(signal.SIGTERM) is before
            result.append(flag)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert result and not result[0].installed and not result[0].requested


def test_flag_can_be_requested_by_hand() -> None:
    flag = SignalFlag()
    flag.request(signal.SIGTERM)
    flag.request(signal.SIGINT)
    assert flag.signal == "SIGTERM" and flag.count == 2 and flag.exit_code == 143


def _trainer(tmp_path: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), "signal", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def test_sigterm_saves_at_a_step_boundary_and_exits_143(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    proc = _trainer(tmp_path, subprocess_env)
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "after SIGTERM count=1" in out
    assert "restored True" in out
    saved_step = int(out.split("saved ")[1].split()[0])
    from colabkit.checkpoint import CheckpointManager

    with CheckpointManager(tmp_path) as ckpt:
        state = ckpt.load()
    assert state["step"] == saved_step > 0
    assert torch.nn.Linear(4, 1).load_state_dict(state["model_state_dict"]) is not None


def test_second_sigint_interrupts_a_process(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    proc = _trainer(tmp_path, {**subprocess_env, "CKPT_WAIT_SECOND": "1"})
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    assert proc.stdout is not None
    saved = proc.stdout.readline()
    assert "after SIGINT" in saved
    assert proc.stdout.readline().strip() == "waiting"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert "KeyboardInterrupt" in err
    assert "no second signal" not in out
    assert proc.returncode in (-signal.SIGINT, 1, 130)
    from colabkit.checkpoint import CheckpointManager

    with CheckpointManager(tmp_path) as ckpt:  # the first signal's checkpoint survived
        assert ckpt.load()["step"] == int(saved.split()[1])
