"""stage(): every local source kind, idempotence, atomic publish, faults, kills, and the CLI."""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

from colabkit import _io
from colabkit.data import archive, sources
from colabkit.data import stage as stage_mod
from colabkit.data.stage import MARKER, cli_stage, stage
from colabkit.errors import ChecksumError, InsufficientSpaceError, UnsafeArchiveError
from colabkit.testing import fake_colab

MEMBERS = {f"flowers/{kind}/{i:03d}.jpg": f"{kind}{i}".encode() * 300 for kind in ("rose", "tulip") for i in range(60)}


def write_zip(path: Path, members: dict[str, bytes] = MEMBERS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def files_under(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MARKER
    }


def entries(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


@pytest.fixture(autouse=True)
def _no_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "sleep", lambda seconds: None)


@pytest.mark.parametrize("workers", ["auto", 2])
def test_zip_with_one_top_folder_returns_that_folder(tmp_path: Path, workers: int | str) -> None:
    src = write_zip(tmp_path / "src" / "flowers.zip")
    root = stage(src, tmp_path / "data", workers=workers, progress=False)  # type: ignore[arg-type]
    assert root == tmp_path / "data" / "flowers" / "flowers"
    assert files_under(root) == {k.split("/", 1)[1]: v for k, v in MEMBERS.items()}
    marker = json.loads((tmp_path / "data" / "flowers" / MARKER).read_text())
    assert marker["result"] == "flowers"
    assert marker["files"] == len(MEMBERS)
    assert marker["identity"]["source"]["size"] == src.stat().st_size
    assert sorted(os.listdir(tmp_path / "data")) == ["flowers"]  # no scratch, lock or temp litter


def test_rerun_is_a_no_op_until_the_source_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = write_zip(tmp_path / "flowers.zip")
    root = stage(src, tmp_path / "data", progress=False)
    inode = root.stat().st_ino

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("an unchanged source must not be extracted again")

    monkeypatch.setattr(stage_mod, "extract_archive", boom)
    assert stage(src, tmp_path / "data", progress=False) == root
    assert root.stat().st_ino == inode
    monkeypatch.undo()
    monkeypatch.setattr(sources, "sleep", lambda seconds: None)

    write_zip(src, {"flowers/rose/new.jpg": b"new"})
    os.utime(src, ns=(time.time_ns(), time.time_ns() + 10**9))
    root2 = stage(src, tmp_path / "data", progress=False)
    assert root2 == root
    assert files_under(root2) == {"rose/new.jpg": b"new"}
    inode2 = root2.stat().st_ino
    assert stage(src, tmp_path / "data", overwrite=True, progress=False) == root
    assert root.stat().st_ino != inode2  # overwrite=True restaged
    assert [p for p in (tmp_path / "data").iterdir() if _io.is_temp_name(p.name)] == []


def test_archive_without_single_top_folder_returns_the_dataset_folder(tmp_path: Path) -> None:
    src = write_zip(tmp_path / "mixed.zip", {"a.txt": b"A", "sub/b.txt": b"B"})
    root = stage(src, tmp_path / "data", progress=False)
    assert root == tmp_path / "data" / "mixed"
    assert files_under(root) == {"a.txt": b"A", "sub/b.txt": b"B"}


@pytest.mark.parametrize(
    ("suffix", "mode"), [(".tar", "w"), (".tgz", "w:gz"), (".tar.bz2", "w:bz2"), (".tar.xz", "w:xz")]
)
def test_tar_archives(tmp_path: Path, suffix: str, mode: str) -> None:
    src = tmp_path / f"cifar{suffix}"
    with tarfile.open(src, mode) as tf:
        for name, data in list(MEMBERS.items())[:30]:
            info = tarfile.TarInfo(name.replace("flowers/", "cifar/"))
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    root = stage(src, tmp_path / "data", progress=False)
    assert root == tmp_path / "data" / "cifar" / "cifar"
    assert len(files_under(root)) == 30
    assert sorted(os.listdir(tmp_path / "data")) == ["cifar"]


def test_single_gz_plain_file_and_folder_sources(tmp_path: Path) -> None:
    gz = tmp_path / "train-labels-idx1-ubyte.gz"
    gz.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + bytes(range(10)) * 10))
    root = stage(gz, tmp_path / "data", progress=False)
    assert root == tmp_path / "data" / "train-labels-idx1-ubyte"
    assert (root / "train-labels-idx1-ubyte").read_bytes()[:4] == b"\x00\x00\x08\x01"

    plain = tmp_path / "labels.csv"
    plain.write_text("a,b\n")
    assert (stage(plain, tmp_path / "data", progress=False) / "labels.csv").read_text() == "a,b\n"
    assert plain.exists()  # a local source is copied, never moved

    kept = stage(write_zip(tmp_path / "keep.zip"), tmp_path / "data", extract=False, progress=False)
    assert os.listdir(kept) == ["keep.zip", MARKER] or sorted(os.listdir(kept)) == [MARKER, "keep.zip"]

    folder = tmp_path / "imgs"
    for i in range(50):
        (folder / f"c{i % 5}").mkdir(parents=True, exist_ok=True)
        (folder / f"c{i % 5}" / f"{i}.png").write_bytes(b"p" * i)
    root = stage(folder, tmp_path / "data", progress=False)
    assert root == tmp_path / "data" / "imgs"
    assert files_under(root) == files_under(folder)
    (folder / "c9").mkdir()
    (folder / "c9" / "new.png").write_bytes(b"n")
    assert "c9/new.png" in files_under(stage(folder, tmp_path / "data", progress=False))


def test_checksums(tmp_path: Path) -> None:
    src = write_zip(tmp_path / "flowers.zip")
    good = hashlib.sha256(src.read_bytes()).hexdigest()
    md5 = hashlib.md5(src.read_bytes()).hexdigest()
    assert stage(src, tmp_path / "data", sha256=good, md5=md5, progress=False).is_dir()
    with pytest.raises(ChecksumError, match=r"sha256 is .*Nothing was staged"):
        stage(src, tmp_path / "other", sha256="0" * 64, progress=False)
    assert not (tmp_path / "other" / "flowers").exists()
    assert hashlib.sha256(src.read_bytes()).hexdigest() == good  # a local source is never touched
    with pytest.raises(ChecksumError, match="md5 is"):
        stage(src, tmp_path / "other", md5="0" * 32, progress=False)
    assert os.listdir(tmp_path / "other") == []
    with pytest.raises(ValueError, match="64 hex digits"):
        stage(src, tmp_path / "data", sha256="abc", progress=False)


def test_drive_archive_is_copied_locally_and_a_bad_checksum_deletes_the_copy(tmp_path: Path) -> None:
    with fake_colab() as colab:
        from colabkit.drive import mount_drive

        mydrive = mount_drive()
        src = write_zip(mydrive / "datasets" / "flowers.zip")
        dest = colab.path("/content/data")
        with pytest.raises(ChecksumError, match="copy was deleted"):
            stage(src, sha256="f" * 64, progress=False)
        assert not (dest / "flowers").exists()
        assert not (dest / stage_mod.SCRATCH).exists()
        root = stage(src, progress=False)  # default dest: the runtime's data dir
        assert root == dest / "flowers" / "flowers"
        assert sorted(os.listdir(dest)) == ["flowers"]


@pytest.mark.parametrize("code", [errno.EIO, errno.ENOTCONN])
def test_drive_errors_mid_copy_are_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    with fake_colab() as colab:
        from colabkit.drive import mount_drive

        mydrive = mount_drive()
        src = write_zip(mydrive / "flowers.zip")
        folder = mydrive / "imgs"
        for i in range(40):
            (folder / f"c{i % 4}").mkdir(parents=True, exist_ok=True)
            (folder / f"c{i % 4}" / f"{i}.png").write_bytes(b"x" * (i + 1))
        real_read = _io.ops.copy_chunk
        failures = {"left": 1}

        def flaky_read(handle: io.BufferedReader, size: int) -> bytes:
            if handle.tell() > 0 and failures["left"] > 0:
                failures["left"] -= 1
                raise OSError(code, os.strerror(code))
            return real_read(handle, min(size, 4096))  # many chunks, so the fault hits mid-file

        monkeypatch.setattr(_io.ops, "copy_chunk", flaky_read)
        root = stage(src, progress=False)
        assert files_under(root) == {k.split("/", 1)[1]: v for k, v in MEMBERS.items()}
        assert failures["left"] == 0
        failures["left"] = 2
        copied = stage(folder, progress=False, workers=1)
        assert files_under(copied) == files_under(folder)
        assert failures["left"] == 0
        if code == errno.ENOTCONN:
            assert any(call.get("force_remount") for call in colab.calls_to("drive.mount"))


def test_persistent_drive_error_gives_up_and_publishes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(20):
        (folder / f"{i}.png").write_bytes(b"x")

    def dead(handle: io.BufferedReader, size: int) -> bytes:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(_io.ops, "copy_chunk", dead)
    with pytest.raises(OSError, match="Input/output error"):
        stage(folder, tmp_path / "data", retries=1, progress=False)
    assert os.listdir(tmp_path / "data") == []


@pytest.mark.parametrize("workers", [1, 2])
def test_disk_full_mid_extraction_is_a_clean_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    src = write_zip(tmp_path / "flowers.zip")
    old = stage(
        write_zip(tmp_path / "v1" / "flowers.zip", {"flowers/old.jpg": b"old"}), tmp_path / "data", progress=False
    )
    writes = {"n": 0}
    real = _io.ops.write_fd

    def filling(fd: int, data: bytes | memoryview) -> int:
        writes["n"] += 1
        if writes["n"] > 25:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(_io.ops, "write_fd", filling)
    with pytest.raises(InsufficientSpaceError, match="nothing was published"):
        stage(src, tmp_path / "data", workers=workers, progress=False)
    assert files_under(old) == {"old.jpg": b"old"}  # the previous good copy is untouched
    assert sorted(os.listdir(tmp_path / "data")) == ["flowers"]


def test_free_space_is_checked_before_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = write_zip(tmp_path / "flowers.zip")
    extracted = sum(len(v) for v in MEMBERS.values())
    monkeypatch.setattr(_io, "free_space", lambda path: 1000)
    with pytest.raises(
        InsufficientSpaceError, match=rf"extracted .*needs .* \({extracted} bytes\).* but .* \(1000 bytes\) free"
    ):
        stage(src, tmp_path / "data", progress=False)
    assert os.listdir(tmp_path / "data") == []


def test_free_space_check_names_the_copy_and_the_extracted_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    extracted = sum(len(v) for v in MEMBERS.values())
    with fake_colab() as colab:
        from colabkit.drive import mount_drive

        src = write_zip(mount_drive() / "flowers.zip")
        copy = src.stat().st_size
        free = stage_mod._SPACE_MARGIN + copy + extracted - 1  # room for either, not for both
        monkeypatch.setattr(_io, "free_space", lambda path: free)
        copied: list[str] = []
        with monkeypatch.context() as patch:
            patch.setattr(_io.ops, "copy_chunk", lambda *a, **k: copied.append(a[0]))
            with pytest.raises(InsufficientSpaceError) as caught:
                stage(src, progress=False)
        message = str(caught.value)
        assert f"local copy of the archive needs {_io.human_bytes(copy)} ({copy} bytes)" in message
        assert f"extracted data needs {_io.human_bytes(extracted)} ({extracted} bytes)" in message
        assert f"({free} bytes) free" in message and "dest=" in message
        assert copied == []  # refused before a byte was read from Drive
        assert os.listdir(colab.path("/content/data")) == []
        monkeypatch.setattr(_io, "free_space", lambda path: free + 1)  # one byte more is enough
        assert files_under(stage(src, progress=False)) == {k.split("/", 1)[1]: v for k, v in MEMBERS.items()}


def test_free_space_for_a_compressed_tar_counts_the_decompressed_tar(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "cifar.tar.gz"
    with tarfile.open(src, "w:gz") as tf:
        for name, data in list(MEMBERS.items())[:20]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with gzip.open(src) as stream:
        tar_size = len(stream.read())
    monkeypatch.setattr(_io, "free_space", lambda path: stage_mod._SPACE_MARGIN + tar_size * 2 - 1)
    with pytest.raises(InsufficientSpaceError, match=rf"\({tar_size} bytes\) twice over"):
        stage(src, tmp_path / "data", progress=False)
    assert os.listdir(tmp_path / "data") == []


def test_hostile_archive_leaves_destination_untouched(tmp_path: Path) -> None:
    dest = tmp_path / "data"
    old = stage(write_zip(tmp_path / "v1" / "evil.zip", {"evil/ok.txt": b"ok"}), dest, progress=False)
    before = files_under(dest)
    src = write_zip(tmp_path / "evil.zip", {"evil/fine.txt": b"1", "evil/../../escape.txt": b"x"})
    with pytest.raises(UnsafeArchiveError, match=r"'\.\.'"):
        stage(src, dest, progress=False)
    assert files_under(dest) == before
    assert files_under(old) == {"ok.txt": b"ok"}
    assert not list(tmp_path.rglob("escape.txt"))


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root``, files with their size and mtime: any write shows up.

    Folder mtimes are left out: the temporary sibling stage() made and removed touches dest's.
    """
    return {
        p.relative_to(root).as_posix(): (0, 0) if p.is_dir() else (p.lstat().st_size, p.lstat().st_mtime_ns)
        for p in root.rglob("*")
    }


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        (archive.ArchiveLimits(max_members=5), "more than 5 members"),
        (archive.ArchiveLimits(max_total_size=100_000), "more than 97.7 KB"),
        (archive.ArchiveLimits(max_ratio=20, ratio_grace=10_000), "zip bomb"),
    ],
)
def test_bombs_leave_the_destination_as_it_was(tmp_path: Path, limits: archive.ArchiveLimits, message: str) -> None:
    dest = tmp_path / "data"
    old = stage(write_zip(tmp_path / "v1" / "bomb.zip", {"bomb/ok.txt": b"ok"}), dest, progress=False)
    src = write_zip(tmp_path / "bomb.zip", {f"bomb/f{i}.bin": bytes(50_000) for i in range(10)})
    before = snapshot(tmp_path)
    with pytest.raises(UnsafeArchiveError, match=message):
        stage(src, dest, limits=limits, workers=2, progress=False)
    assert snapshot(tmp_path) == before  # nothing written in dest, next to it or anywhere else
    assert files_under(old) == {"ok.txt": b"ok"}
    assert files_under(stage(src, dest, progress=False))["f9.bin"] == bytes(50_000)  # default limits allow it


def test_destination_inside_the_source_folder_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"a")
    with pytest.raises(ValueError, match="lies inside the source folder"):
        stage(folder, folder / "staged", progress=False)
    with pytest.raises(ValueError, match="lies inside the source folder"):
        stage(folder, tmp_path, overwrite=True, progress=False)
    assert sorted(p.name for p in folder.iterdir()) == ["a.png"]


def test_foreign_folder_is_not_replaced_without_overwrite(tmp_path: Path) -> None:
    (tmp_path / "data" / "flowers").mkdir(parents=True)
    (tmp_path / "data" / "flowers" / "mine.txt").write_text("precious")
    src = write_zip(tmp_path / "flowers.zip")
    with pytest.raises(ValueError, match="was not created by stage"):
        stage(src, tmp_path / "data", progress=False)
    assert (tmp_path / "data" / "flowers" / "mine.txt").read_text() == "precious"
    root = stage(src, tmp_path / "data", overwrite=True, progress=False)
    assert not (tmp_path / "data" / "flowers" / "mine.txt").exists()
    assert root.is_dir()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "a/b"}, "folder name"),
        ({"name": ".hidden"}, "folder name"),
        ({"extract": "yes"}, "extract="),
        ({"retries": -1}, "retries="),
        ({"workers": 0}, "workers="),
        ({"md5": "xyz"}, "32 hex digits"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict[str, object], message: str) -> None:
    src = write_zip(tmp_path / "flowers.zip")
    with pytest.raises(ValueError, match=message):
        stage(src, tmp_path / "data", progress=False, **kwargs)  # type: ignore[arg-type]


KILLED_CHILD = textwrap.dedent(
    """
    import os, sys, time
    from colabkit import _io
    from colabkit.data.stage import stage
    real_create = _io.ops.create
    def slow_create(path, mode):
        if not os.path.exists(sys.argv[3]):
            open(sys.argv[3], "w").close()
        time.sleep(0.01)
        return real_create(path, mode)
    _io.ops.create = slow_create
    stage(sys.argv[1], sys.argv[2], workers=int(sys.argv[4]), progress=False)
    print("finished")
    """
)


@pytest.mark.parametrize("workers", [1, 2])
def test_killed_stage_leaves_nothing_that_looks_complete(
    tmp_path: Path, subprocess_env: dict[str, str], workers: int
) -> None:
    src = write_zip(tmp_path / "flowers.zip")
    dest = tmp_path / "data"
    started = tmp_path / "started"
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_CHILD, str(src), str(dest), str(started), str(workers)],
        env=subprocess_env,
        stdout=subprocess.PIPE,
    )
    deadline = time.monotonic() + 30
    while not started.exists() and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.01)
    time.sleep(0.1)
    child.send_signal(signal.SIGKILL)
    out, _ = child.communicate(timeout=30)
    assert b"finished" not in out
    assert not (dest / "flowers").exists()
    leftovers = [p.name for p in dest.iterdir()]
    assert leftovers and all(_io.is_temp_name(name) for name in leftovers)
    time.sleep(0.05)  # orphaned workers die with their parent (PR_SET_PDEATHSIG)
    root = stage(src, dest, progress=False)
    assert files_under(root) == {k.split("/", 1)[1]: v for k, v in MEMBERS.items()}
    assert sorted(os.listdir(dest)) == ["flowers"]


def test_cli_stage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_zip(tmp_path / "flowers.zip")
    assert cli_stage([str(src), str(tmp_path / "data"), "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "data" / "flowers" / "flowers")
    assert cli_stage([str(tmp_path / "missing.zip"), str(tmp_path / "data"), "--no-progress"]) == 1
    assert "nothing exists" in capsys.readouterr().err
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    assert cli_stage([str(src), str(tmp_path / "d2"), "--sha256", sha, "--name", "x", "--no-progress"]) == 0
    assert (tmp_path / "d2" / "x" / "flowers" / "rose" / "000.jpg").exists()


def test_python_dash_m_colabkit_stage(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    src = write_zip(tmp_path / "flowers.zip")
    command = [sys.executable, "-m", "colabkit", "stage", str(src), str(tmp_path / "data"), "--no-progress"]
    done = subprocess.run(command, env=subprocess_env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / "data" / "flowers" / "flowers")
    assert files_under(Path(done.stdout.strip())) == {k.split("/", 1)[1]: v for k, v in MEMBERS.items()}
    bad = [sys.executable, "-m", "colabkit", "stage", str(src), str(tmp_path / "d2"), "--md5", "0" * 32]
    failed = subprocess.run(bad, env=subprocess_env, capture_output=True, text=True, timeout=60, check=False)
    assert failed.returncode == 1
    assert "colabkit stage: error:" in failed.stderr and "md5 is" in failed.stderr
    assert not (tmp_path / "d2" / "flowers").exists()


def test_make_archive_round_trips_through_stage(tmp_path: Path) -> None:
    folder = tmp_path / "pets"
    for i in range(30):
        (folder / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        (folder / f"c{i % 3}" / f"{i}.jpg").write_bytes(os.urandom(200))
        (folder / f"c{i % 3}" / f"{i}.txt").write_bytes(b"label " * 50)
    packed = archive.make_archive(folder, tmp_path / "drive" / "pets.zip", progress=False)
    with zipfile.ZipFile(packed) as zf:
        methods = {Path(info.filename).suffix: info.compress_type for info in zf.infolist()}
    assert methods == {".jpg": zipfile.ZIP_STORED, ".txt": zipfile.ZIP_DEFLATED}
    root = stage(packed, tmp_path / "data", progress=False)
    assert root == tmp_path / "data" / "pets" / "pets"
    assert files_under(root) == files_under(folder)


def test_progress_false_is_silent_for_every_step(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with fake_colab() as colab:
        from colabkit.drive import mount_drive

        mydrive = mount_drive()
        capsys.readouterr()
        zipped = write_zip(mydrive / "flowers.zip")  # Drive: a copy, then a parallel extraction
        tgz = mydrive / "small.tgz"
        with tarfile.open(tgz, "w:gz") as tf:
            info = tarfile.TarInfo("small/a.txt")
            info.size = 3
            tf.addfile(info, io.BytesIO(b"abc"))
        gz = mydrive / "labels.gz"
        gz.write_bytes(gzip.compress(b"x" * 1000))
        for src in (zipped, tgz, gz, mydrive):
            stage(src, colab.path("/content/data"), workers=2, progress=False)
        archive.make_archive(colab.path("/content/data/flowers"), tmp_path / "out.zip", progress=False)
        captured = capsys.readouterr()
        assert (captured.out, captured.err) == ("", "")
        stage(zipped, colab.path("/content/other"), workers=2, progress=True)
        assert "copy flowers.zip" in capsys.readouterr().err


def test_progress_bars_show_and_can_be_silenced(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_zip(tmp_path / "flowers.zip")
    stage(src, tmp_path / "a", workers=2, progress=True)
    assert "extract flowers.zip" in capsys.readouterr().err
    folder = tmp_path / "a" / "flowers" / "flowers"
    stage(folder, tmp_path / "b", progress=False)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_concurrent_calls_stage_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    src = write_zip(tmp_path / "flowers.zip")
    calls = []
    real = stage_mod.extract_archive

    def counting(*args: object, **kwargs: object) -> object:
        calls.append(1)
        time.sleep(0.05)  # widen the window in which a second caller could slip in
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(stage_mod, "extract_archive", counting)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(stage(src, tmp_path / "data", progress=False))) for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 3 and len(set(results)) == 1
    assert calls == [1]


def test_staging_into_drive_warns(tmp_path: Path) -> None:
    with fake_colab():
        from colabkit.drive import mount_drive

        mydrive = mount_drive()
        src = write_zip(tmp_path / "flowers.zip")
        with pytest.warns(UserWarning, match="slow for many small files"):
            stage(src, mydrive / "data", progress=False)


def test_colab_paths_work_unchanged_under_fake_colab(tmp_path: Path) -> None:
    import zipfile

    import colabkit
    from colabkit.testing import fake_colab

    with fake_colab() as colab:
        mydrive = colabkit.mount_drive()
        with zipfile.ZipFile(mydrive / "digits.zip", "w") as archive:
            archive.writestr("digits/0/a.txt", "zero")
        staged = colabkit.stage("/content/drive/MyDrive/digits.zip", progress=False)
        assert staged == colab.path("/content/data/digits/digits")
        assert (staged / "0" / "a.txt").read_text() == "zero"
        other = colabkit.stage("/content/drive/MyDrive/digits.zip", "/content/elsewhere", progress=False)
        assert other.is_relative_to(colab.path("/content/elsewhere"))
