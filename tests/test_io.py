"""Atomic writes, retries and copies in colabkit._io, with injected failures."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path

import pytest

from colabkit import _io
from colabkit.errors import InsufficientSpaceError


def test_atomic_write_replaces_only_when_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "state.bin"
    _io.atomic_write_bytes(target, b"old")

    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(_io.ops, "fsync", failing_fsync)
    with pytest.raises(OSError, match="Input/output"):
        _io.atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.bin"]  # no temporary left


@pytest.mark.parametrize("failing", ["write", "replace"])
def test_any_failing_step_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str) -> None:
    target = tmp_path / "f"
    _io.atomic_write_bytes(target, b"v1")

    def boom(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_io.ops, failing, boom)
    with pytest.raises(OSError, match="No space"):
        _io.atomic_write_bytes(target, b"v2")
    assert target.read_bytes() == b"v1"
    assert not any(_io.is_temp_name(p.name) for p in tmp_path.iterdir())


def test_interrupt_inside_atomic_open_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "f"
    with pytest.raises(KeyboardInterrupt), _io.atomic_open(target) as handle:
        handle.write(b"partial")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_retry_transient_then_success() -> None:
    attempts: list[int] = []
    sleeps: list[float] = []
    retried: list[int] = []

    def flaky() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise OSError(errno.ENOTCONN if len(attempts) == 1 else errno.EIO, "transport")
        return "ok"

    result = _io.retry(flaky, retries=3, delay=0.1, sleep=sleeps.append, on_retry=lambda e, n: retried.append(n))
    assert result == "ok"
    assert sleeps == [0.1, 0.2]
    assert retried == [1, 2]


def test_retry_gives_up_and_skips_permanent_errors() -> None:
    def always() -> None:
        raise OSError(errno.EIO, "io")

    with pytest.raises(OSError, match="io"):
        _io.retry(always, retries=2, sleep=lambda s: None)
    calls: list[int] = []

    def permanent() -> None:
        calls.append(1)
        raise FileNotFoundError(errno.ENOENT, "gone")

    with pytest.raises(FileNotFoundError):
        _io.retry(permanent, retries=5, sleep=lambda s: None)
    assert calls == [1]


def test_copy_file_hashes_while_copying(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    data = bytes(range(256)) * 5000
    src.write_bytes(data)
    seen: list[int] = []
    digest = hashlib.sha256()
    copied = _io.copy_file(src, tmp_path / "dst.bin", chunk_size=4096, progress=seen.append, hashers=(digest,))
    assert copied == len(data) == sum(seen)
    assert (tmp_path / "dst.bin").read_bytes() == data
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest() == _io.hash_file(src)


def test_ensure_free_space_names_both_numbers(tmp_path: Path) -> None:
    _io.ensure_free_space(tmp_path, 1, what="a byte")
    with pytest.raises(InsufficientSpaceError, match=r"needs .*PB|needs .* but .* free") as info:
        _io.ensure_free_space(tmp_path / "not" / "yet", 2**60, what="the dataset")
    assert info.value.errno == errno.ENOSPC
    assert str(2**60) in str(info.value)


def test_human_bytes() -> None:
    assert _io.human_bytes(512) == "512 B"
    assert _io.human_bytes(1536) == "1.5 KB"
    assert _io.human_bytes(3 * 1024**3) == "3.0 GB"


def test_temp_owner_alive(tmp_path: Path) -> None:
    import subprocess
    import sys

    mine = _io.temp_name(tmp_path / "x").name
    assert _io.temp_owner_alive(mine)
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = mine.replace(f"{_io.TEMP_MARK}{os.getpid()}-", f"{_io.TEMP_MARK}{int(child.stdout)}-")
    assert not _io.temp_owner_alive(dead)
    assert not _io.temp_owner_alive("plain-name")


def test_discard_empties_the_file_before_removing_it(tmp_path: Path) -> None:
    # A hard link stands in for Drive's trash, which keeps a reference to a deleted file.
    target = tmp_path / "step.pt"
    target.write_bytes(b"x" * 100_000)
    trash = tmp_path / "trash-copy"
    os.link(target, trash)
    _io.discard(target)
    assert not target.exists()
    assert trash.stat().st_size == 0


def test_discard_tolerates_missing_files_and_spares_symlink_targets(tmp_path: Path) -> None:
    _io.discard(tmp_path / "never-there")
    precious = tmp_path / "precious"
    precious.write_bytes(b"keep me")
    link = tmp_path / "link"
    link.symlink_to(precious)
    _io.discard(link)
    assert not link.exists() and not link.is_symlink()
    assert precious.read_bytes() == b"keep me"


def test_copy_stream_feeds_hashers_and_progress() -> None:
    import io

    data = os.urandom(10_000)
    out = io.BytesIO()
    seen: list[int] = []
    digest = hashlib.sha256()
    copied = _io.copy_stream(io.BytesIO(data).read, out.write, chunk_size=3000, progress=seen.append, hashers=[digest])
    assert copied == len(data) and out.getvalue() == data
    assert seen == [3000, 3000, 3000, 1000]
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()


def test_copy_file_in_place_never_writes_through_an_existing_entry(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"payload" * 1000)
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    link = tmp_path / "dst"
    link.symlink_to(victim)
    with pytest.raises(FileExistsError):
        _io.copy_file(src, link, atomic=False)
    assert victim.read_bytes() == b"keep me"
    assert _io.copy_file(src, tmp_path / "new", atomic=False, durable=False) == 7000
    assert (tmp_path / "new").read_bytes() == src.read_bytes()


def test_copy_reads_go_through_the_seam(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 100)
    opened: list[str] = []
    real_open = _io.ops.open

    def spy(path: str | os.PathLike[str], mode: str) -> object:
        opened.append(mode)
        return real_open(path, mode)

    monkeypatch.setattr(_io.ops, "open", spy)
    _io.copy_file(src, tmp_path / "a")
    assert opened[0] == "rb"
