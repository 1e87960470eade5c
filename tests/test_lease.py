"""The checkpoint folder's lease: one writer, dead and stale holders taken over, races settled."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from colabkit.checkpoint import lease as lease_mod
from colabkit.checkpoint.lease import LEASE_NAME, STALE_PERIODS, Holder, LeaseSystem, acquire, read_holder
from colabkit.errors import CheckpointError, CheckpointInUseError


class OtherHost(LeaseSystem):
    """This machine as if it were another runtime: another host name, a clock of our choosing."""

    def __init__(self, host: str = "other-runtime", *, offset: float = 0.0) -> None:
        self._host = host
        self.offset = offset
        self.slept: list[float] = []
        self.on_sleep: Callable[[], None] | None = None

    def host(self) -> str:
        return self._host

    def machine(self) -> str:
        return f"machine-of-{self._host}"

    def now(self) -> float:
        return time.time() + self.offset

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        if self.on_sleep is not None:
            self.on_sleep()


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def read_line(proc: subprocess.Popen[str], timeout: float = 60.0) -> str:
    """The child's next stdout line, or an AssertionError after ``timeout`` seconds (never a hang)."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise AssertionError(f"no output from the child within {timeout} s")
    return proc.stdout.readline()


def lease_json(folder: Path) -> dict[str, object]:
    return json.loads((folder / LEASE_NAME).read_text())


HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from colabkit.checkpoint.lease import acquire
    lease = acquire(sys.argv[1], period=float(sys.argv[2]))
    print("held", flush=True)
    stop = Path(sys.argv[1]) / "stop"
    while not stop.exists():
        time.sleep(0.02)
    lease.check()
    lease.release()
    print("released", flush=True)
    """
)


class Children:
    """Child processes a test starts (text pipes to stdout and stderr); killed and reaped at the end."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.started: list[subprocess.Popen[str]] = []

    def start(self, *argv: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env
        )
        self.started.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.started:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.communicate()


@pytest.fixture
def holder_process(subprocess_env: dict[str, str]) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    children = Children(subprocess_env)

    def start(folder: Path, period: float = 60.0) -> subprocess.Popen[str]:
        proc = children.start("-c", HOLDER, str(folder), str(period))
        line = read_line(proc)
        assert line == "held\n", line
        return proc

    yield start
    children.close()


def test_acquire_writes_who_holds_it_and_release_removes_it(tmp_path: Path) -> None:
    with acquire(tmp_path, heartbeat=False) as held:
        data = lease_json(tmp_path)
        assert data["pid"] == os.getpid()
        assert data["run_id"] == held.holder.run_id
        assert data["host"] == LeaseSystem().host()
        assert data["renewed"] == data["started"]
        assert held.held
    assert not (tmp_path / LEASE_NAME).exists()
    assert not held.held
    held.release()  # idempotent


def test_a_second_process_is_refused_with_the_holder_and_the_ways_forward(
    tmp_path: Path, holder_process: Callable[..., subprocess.Popen[str]], subprocess_env: dict[str, str]
) -> None:
    proc = holder_process(tmp_path)
    with pytest.raises(CheckpointInUseError) as info:
        acquire(tmp_path, heartbeat=False)
    message = str(info.value)
    assert f"pid {proc.pid}" in message
    assert repr(LeaseSystem().host()) in message
    assert "started 20" in message and "UTC" in message and "last renewed" in message
    assert "stop the other run" in message
    assert "another checkpoint folder" in message
    assert "takeover=True" in message
    assert info.value.errno == 16  # EBUSY
    assert lease_json(tmp_path)["pid"] == proc.pid  # the refused run changed nothing
    (tmp_path / "stop").touch()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "released" in out
    assert not (tmp_path / LEASE_NAME).exists()


def test_a_sigkilled_holder_is_taken_over_at_once(
    tmp_path: Path, holder_process: Callable[..., subprocess.Popen[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    proc = holder_process(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert lease_json(tmp_path)["pid"] == proc.pid  # a kill leaves the lease behind
    with acquire(tmp_path, heartbeat=False) as held:
        assert lease_json(tmp_path)["run_id"] == held.holder.run_id
    assert "its process is gone" in capsys.readouterr().out


def test_a_reused_pid_does_not_keep_a_dead_holder_alive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The lease names a live pid (ours) but another process start: the pid was reused.
    system = LeaseSystem()
    now = system.now()
    stale = Holder("deadbeef0000", system.host(), system.machine(), os.getpid(), "1", "x", now, now, 60.0)
    (tmp_path / LEASE_NAME).write_bytes(stale.to_bytes())
    if system.process_start(os.getpid()) in ("", "1"):
        pytest.skip("process start times are not readable here")
    with acquire(tmp_path, heartbeat=False):
        pass
    assert "its process is gone" in capsys.readouterr().out


def test_another_hosts_stale_heartbeat_is_taken_over_a_fresh_one_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A run on another runtime took the lease, with a 60 s period, and stopped renewing.
    other = OtherHost()
    theirs = acquire(tmp_path, heartbeat=False, system=other)
    limit = STALE_PERIODS * 60.0
    # Still fresh just inside the limit: refused.
    with pytest.raises(CheckpointInUseError, match="other-runtime"):
        acquire(tmp_path, heartbeat=False, system=OtherHost("me", offset=limit - 5))
    # Just past the limit: taken over at once, with a notice.
    mine = acquire(tmp_path, heartbeat=False, system=OtherHost("me", offset=limit + 5))
    assert lease_json(tmp_path)["host"] == "me"
    assert "heartbeat is older than" in capsys.readouterr().out
    # The old holder learns it at its next renewal and stops saving.
    assert theirs.renew() is False
    with pytest.raises(CheckpointInUseError, match="taken over"):
        theirs.check()
    theirs.release()
    assert lease_json(tmp_path)["host"] == "me"  # the loser does not delete the winner's lease
    mine.release()


def test_a_live_holder_on_another_host_is_not_judged_by_pid(tmp_path: Path) -> None:
    # The other host's pid means nothing here, even if no such process runs on this machine.
    other = OtherHost()
    now = other.now()
    (tmp_path / LEASE_NAME).write_bytes(
        Holder("abcdef012345", "other-runtime", "m", 2**22 + 7, "", "", now, now, 60.0).to_bytes()
    )
    with pytest.raises(CheckpointInUseError):
        acquire(tmp_path, heartbeat=False)


@pytest.mark.parametrize("content", [b"", b'{"format": "colabkit.lease", "run_id": "x"', b"\x00\xff garbage"])
def test_a_torn_lease_counts_as_stale(tmp_path: Path, content: bytes, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / LEASE_NAME).write_bytes(content)
    with acquire(tmp_path, heartbeat=False) as held:
        assert lease_json(tmp_path)["run_id"] == held.holder.run_id
    assert "unreadable" in capsys.readouterr().out


def test_takeover_true_takes_a_live_lease_and_the_holder_stops(
    tmp_path: Path, holder_process: Callable[..., subprocess.Popen[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    proc = holder_process(tmp_path, period=0.05)
    mine = acquire(tmp_path, takeover=True, heartbeat=False)
    assert "takeover=True" in capsys.readouterr().out
    # The holder's heartbeat finds our lease, says so and gives up; its check() then raises.
    assert "another run took over" in read_line(proc)
    (tmp_path / "stop").touch()
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "CheckpointInUseError" in err and "taken over" in err
    assert lease_json(tmp_path)["run_id"] == mine.holder.run_id
    mine.release()


def test_heartbeat_renews_and_stops_at_release(tmp_path: Path) -> None:
    held = acquire(tmp_path, period=0.05)
    first = float(lease_json(tmp_path)["renewed"])  # type: ignore[arg-type]
    wait_for(lambda: float(lease_json(tmp_path)["renewed"]) > first, "a renewal")  # type: ignore[arg-type]
    held.release()
    assert held._thread is not None and not held._thread.is_alive()
    assert not (tmp_path / LEASE_NAME).exists()


def test_same_host_racers_only_one_wins(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    # Every racer pauses inside the read-decide-write: without the folder lock all of them
    # would read "no lease" and all would win.
    racer = textwrap.dedent(
        """
        import contextlib, sys, time
        from pathlib import Path
        from colabkit.checkpoint import lease
        from colabkit.errors import CheckpointInUseError

        class Slow(lease.LeaseSystem):
            @contextlib.contextmanager
            def guard(self, folder):
                with super().guard(folder):
                    time.sleep(0.3)
                    yield

        folder = Path(sys.argv[1])
        while not (folder / "go").exists():
            time.sleep(0.005)
        try:
            held = lease.acquire(folder, heartbeat=False, system=Slow())
        except CheckpointInUseError:
            print("refused", flush=True)
        else:
            print("won", flush=True)
            while not (folder / "stop").exists():
                time.sleep(0.02)
            held.release()
        """
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", racer, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=subprocess_env
        )
        for _ in range(3)
    ]
    try:
        (tmp_path / "go").touch()
        lines = [read_line(proc).strip() for proc in procs]
        assert sorted(lines) == ["refused", "refused", "won"]
    finally:
        (tmp_path / "stop").touch()
        for proc in procs:
            proc.communicate(timeout=60)


def test_cross_host_race_is_settled_by_reading_back(tmp_path: Path) -> None:
    # No lock spans two runtimes: while we wait, another runtime writes its own lease.
    system = OtherHost("me")
    rival = OtherHost("rival")

    def rival_writes() -> None:
        now = rival.now()
        (tmp_path / LEASE_NAME).write_bytes(Holder("rival0000000", "rival", "m", 1, "", "", now, now, 60.0).to_bytes())

    system.on_sleep = rival_writes
    with pytest.raises(CheckpointInUseError, match="at the same moment"):
        acquire(tmp_path, settle=2.0, heartbeat=False, system=system)
    assert system.slept == [2.0]
    # Without a rival the read-back confirms the lease.
    (tmp_path / LEASE_NAME).unlink()
    system.on_sleep = None
    with acquire(tmp_path, settle=2.0, heartbeat=False, system=system) as held:
        assert held.held


def test_a_second_writer_in_the_same_process_takes_over(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A notebook cell that builds a manager, run twice: the first one was never closed.
    first = acquire(tmp_path, heartbeat=False)
    second = acquire(tmp_path, heartbeat=False)
    assert "earlier writer in this process" in capsys.readouterr().out
    with pytest.raises(CheckpointInUseError):
        first.check()
    first.release()
    assert lease_json(tmp_path)["run_id"] == second.holder.run_id
    second.check()
    second.release()
    assert not (tmp_path / LEASE_NAME).exists()


def test_an_unwritable_folder_is_a_clear_error(tmp_path: Path) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    with pytest.raises(CheckpointError, match="must be a writable folder"):
        acquire(not_a_folder, heartbeat=False)


def test_a_forked_child_does_not_release_its_parents_lease(tmp_path: Path) -> None:
    held = acquire(tmp_path, heartbeat=False)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        held.release()
        os._exit(0)
    os.waitpid(pid, 0)
    assert lease_json(tmp_path)["run_id"] == held.holder.run_id
    held.release()


def test_read_holder_needs_no_lease(tmp_path: Path) -> None:
    assert read_holder(tmp_path) == (None, None)
    with acquire(tmp_path, heartbeat=False) as held:
        found, problem = read_holder(tmp_path)
        assert problem is None and found == held.holder


def test_release_at_exit(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    code = f"from colabkit.checkpoint.lease import acquire; acquire({str(tmp_path)!r}, period=60)"
    subprocess.run([sys.executable, "-c", code], check=True, env=subprocess_env, timeout=120)
    assert not (tmp_path / LEASE_NAME).exists()
    assert lease_mod.LEASE_NAME == LEASE_NAME
