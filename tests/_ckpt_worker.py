"""Helper processes for tests/test_checkpoint.py and tests/test_signals.py (not a test module).

``python tests/_ckpt_worker.py zygote``
    Imports torch once, then serves lines on stdin: ``kill DIR COMMITS DELAY_MS`` forks a
    child that saves checkpoints into DIR in an endless loop, waits until COMMITS newer
    checkpoints are committed (manifest visible; 0: no wait), then SIGKILLs it after
    DELAY_MS more and answers ``status N`` (N = -9 when the kill landed), or ``stalled``
    when the commits did not come within a minute. Waiting for commits instead of
    assuming a rate keeps the kills meaningful on a busy machine. Forking from a warm
    process makes hundreds of kills affordable.

``python tests/_ckpt_worker.py signal DIR``
    Trains a tiny model under ``colabkit.save_on_signal()``, prints ``ready``,
    saves a checkpoint when signalled and exits with ``flag.exit_code``.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time
import traceback

import torch


def saver(directory: str) -> None:
    """Save forever; every fifth step is saved twice to exercise replacement."""
    from colabkit.checkpoint import CheckpointManager

    manager = CheckpointManager(directory, keep_last=2)
    existing = manager.checkpoints()
    step = existing[-1].step + 1 if existing else 0
    weights = torch.zeros(64)
    while True:
        for revision in (0, 1) if step % 5 == 0 else (0,):
            weights.fill_(step)
            state = {"model_state_dict": {"w": weights}, "epoch": step, "revision": revision}
            manager.save(state, step=step, metrics={"loss": 1.0 / (step + 1)}, blocking=step % 3 == 0)
        step += 1


MANIFEST = re.compile(r"step-(\d{9})\.json")
STALLED_AFTER_S = 60.0


def newest_commit(directory: str) -> int:
    """The highest committed step in ``directory`` (a manifest exists only once its data is whole), or -1."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return -1
    return max((int(m.group(1)) for m in map(MANIFEST.fullmatch, names) if m), default=-1)


def await_commits(directory: str, after: int, count: int) -> bool:
    """Wait until a step at least ``count`` past ``after`` is committed; False after STALLED_AFTER_S."""
    deadline = time.monotonic() + STALLED_AFTER_S
    while newest_commit(directory) < after + count:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


def zygote() -> None:
    torch.set_num_threads(1)  # no OpenMP pool to inherit into forked children
    import colabkit.checkpoint
    import colabkit.drive  # imported once here, so each child starts saving within a millisecond

    colabkit.drive.is_drive_path(os.getcwd())
    print("ready", flush=True)
    for line in sys.stdin:
        parts = line.split()
        if not parts or parts[0] == "quit":
            return
        directory, commits, delay_ms = parts[1], int(parts[2]), float(parts[3])
        before = newest_commit(directory)
        pid = os.fork()
        if pid == 0:
            try:
                saver(directory)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(3)  # a clean exit here means the saver crashed: the test sees status 3
        progressed = await_commits(directory, before, commits)
        time.sleep(delay_ms / 1000)
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(f"status {code}" if progressed else "stalled", flush=True)


def signal_trainer(directory: str) -> int:
    import colabkit._signals as signals
    from colabkit.checkpoint import CheckpointManager

    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with CheckpointManager(directory) as ckpt, signals.save_on_signal() as stop:
        print("ready", flush=True)
        step = 0
        while not stop.requested:
            loss = model(torch.randn(8, 4)).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            time.sleep(0.001)
        # The handler only set the flag: the save happens here, at a step boundary.
        ckpt.save(
            {"model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer.state_dict(), "step": step},
            step=step,
        )
        print(f"saved {step} after {stop.signal} count={stop.count}", flush=True)
        # A second SIGINT now must interrupt at once; the test may send one while we wait here.
        if os.environ.get("CKPT_WAIT_SECOND"):
            print("waiting", flush=True)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                time.sleep(0.01)
            print("no second signal", flush=True)
    restored = signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    print(f"restored {restored}", flush=True)
    return stop.exit_code


if __name__ == "__main__":
    if sys.argv[1] == "zygote":
        zygote()
    elif sys.argv[1] == "signal":
        sys.exit(signal_trainer(sys.argv[2]))
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]!r}")
