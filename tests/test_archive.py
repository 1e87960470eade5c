"""Archive validation, extraction and make_archive, with real archives (hostile ones included)."""

from __future__ import annotations

import errno
import io
import os
import stat
import struct
import tarfile
import zipfile
from pathlib import Path

import pytest

from colabkit import _io
from colabkit.data import zipdir
from colabkit.data.archive import ArchiveLimits, archive_format, extract_archive, make_archive, scan_archive
from colabkit.data.archive import workers as archive_workers
from colabkit.errors import ChecksumError, UnsafeArchiveError


def tree(root: Path) -> dict[str, bytes | str]:
    """Every entry under ``root``: files map to content, links to their target, folders to 'dir'."""
    found: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath, name)
            rel = full.relative_to(root).as_posix()
            if full.is_symlink():
                found[rel] = "-> " + os.readlink(full)
            elif full.is_dir():
                found[rel] = "dir"
            else:
                found[rel] = full.read_bytes()
    return found


def make_zip(path: Path, members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", method) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def zip_with_infos(path: Path, entries: list[tuple[zipfile.ZipInfo, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for info, data in entries:
            zf.writestr(info, data)
    return path


def symlink_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


def make_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            else:
                tf.addfile(info)
    return path


def tar_member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


DATA = {f"ds/class{c}/img{i}.bin": bytes([c, i]) * (100 + i) for c in range(3) for i in range(40)}


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("method", [zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_zip_extracts_every_member(tmp_path: Path, workers: int, method: int) -> None:
    src = make_zip(tmp_path / "a.zip", DATA, method)
    out = tmp_path / "out"
    out.mkdir()
    result = extract_archive(src, out, workers=workers, progress=False)
    assert result.files == len(DATA)
    assert result.bytes == sum(len(v) for v in DATA.values())
    assert result.top_level == ("ds",)
    assert {k: v for k, v in tree(out).items() if v != "dir"} == DATA


def test_big_member_streams_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(archive_workers, "BIG", 1000)
    payload = os.urandom(5000) + b"z" * 20000
    src = make_zip(tmp_path / "big.zip", {"big.bin": payload, "small.txt": b"hi"})
    out = tmp_path / "out"
    out.mkdir()
    extract_archive(src, out, workers=1, progress=False)
    assert (out / "big.bin").read_bytes() == payload


@pytest.mark.parametrize(
    ("suffix", "mode"), [(".tar", "w"), (".tar.gz", "w:gz"), (".tar.bz2", "w:bz2"), (".tar.xz", "w:xz")]
)
def test_tar_formats_extract_with_links_inside(tmp_path: Path, suffix: str, mode: str) -> None:
    members: list[tuple[tarfile.TarInfo, bytes | None]] = [
        (tar_member("root", tarfile.DIRTYPE), None),
        (tar_member("root/a.txt"), b"alpha"),
        (tar_member("root/sub/b.txt"), b"beta"),
        (tar_member("root/link", tarfile.SYMTYPE, "sub/b.txt"), None),
        (tar_member("root/hard", tarfile.LNKTYPE, "root/a.txt"), None),
    ]
    src = make_tar(tmp_path / f"t{suffix}", members, mode)
    assert archive_format(src) == ("tar" if suffix == ".tar" else suffix[1:])
    out = tmp_path / "out"
    out.mkdir()
    result = extract_archive(src, out, workers=2, progress=False)
    assert result.top_level == ("root",)
    assert tree(out) == {
        "root": "dir",
        "root/sub": "dir",
        "root/a.txt": b"alpha",
        "root/sub/b.txt": b"beta",
        "root/link": "-> sub/b.txt",
        "root/hard": b"alpha",
    }
    assert [p for p in tmp_path.iterdir() if "colabkit-tmp" in p.name] == []  # the scratch .tar is gone


def test_single_gz_file_is_decompressed(tmp_path: Path) -> None:
    import gzip

    src = tmp_path / "train-images-idx3-ubyte.gz"
    src.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + b"\x07" * 1000))
    out = tmp_path / "out"
    out.mkdir()
    result = extract_archive(src, out, progress=False)
    assert result.top_level == ("train-images-idx3-ubyte",)
    assert (out / "train-images-idx3-ubyte").read_bytes() == b"\x00\x00\x08\x03" + b"\x07" * 1000


def test_format_is_sniffed_from_content(tmp_path: Path) -> None:
    zipped = make_zip(tmp_path / "noext", {"a": b"1"})
    tarred = make_tar(tmp_path / "noext2", [(tar_member("a"), b"1")], "w:gz")
    plain = tmp_path / "plain"
    plain.write_bytes(b"hello")
    assert archive_format(zipped) == "zip"
    assert archive_format(tarred) == "tar.gz"
    assert archive_format(plain) is None


def zip_bomb_declared_small(path: Path) -> Path:
    """A member whose central header claims 100 bytes but that inflates to 100,000."""
    make_zip(path, {"bomb.bin": b"\x00" * 100_000})
    data = bytearray(path.read_bytes())
    central = data.rfind(b"PK\x01\x02")
    struct.pack_into("<I", data, central + 24, 100)
    path.write_bytes(bytes(data))
    return path


def zip_overlapping(path: Path) -> Path:
    """Two central entries sharing one member's data: the overlapping-entry zip bomb."""
    make_zip(path, {"a.bin": b"\x00" * 5000})
    data = bytearray(path.read_bytes())
    central = data.rfind(b"PK\x01\x02")
    eocd = data.rfind(b"PK\x05\x06")
    record = bytes(data[central:eocd]).replace(b"a.bin", b"b.bin")
    count, size = struct.unpack_from("<HI", data, eocd + 10)
    new = data[:eocd] + record + data[eocd:]
    eocd += len(record)
    struct.pack_into("<HHI", new, eocd + 8, count + 1, count + 1, size + len(record))
    path.write_bytes(bytes(new))
    return path


def bad_crc_zip(path: Path) -> Path:
    make_zip(path, {"a.txt": b"hello world" * 10}, zipfile.ZIP_STORED)
    data = bytearray(path.read_bytes())
    at = data.find(b"hello world")
    data[at] = ord("j")
    path.write_bytes(bytes(data))
    return path


HOSTILE = {
    "absolute": (lambda p: make_zip(p / "x.zip", {"ok.txt": b"1", "/abs_evil.txt": b"x"}), "absolute path"),
    "dotdot": (lambda p: make_zip(p / "x.zip", {"ok.txt": b"1", "../evil.txt": b"x"}), r"'\.\.'"),
    "dotdot-inner": (lambda p: make_zip(p / "x.zip", {"a/../../evil.txt": b"x"}), r"'\.\.'"),
    "backslash-dotdot": (lambda p: make_zip(p / "x.zip", {"..\\evil.txt": b"x"}), r"'\.\.'"),
    "drive-letter": (lambda p: make_zip(p / "x.zip", {"C:/evil.txt": b"x"}), "drive letter"),
    "drive-letter-backslash": (lambda p: make_zip(p / "x.zip", {"D:\\evil.txt": b"x"}), "drive letter"),
    "zip-symlink-abs": (lambda p: zip_with_infos(p / "x.zip", [(symlink_info("ln"), b"/etc/passwd")]), "absolute"),
    "zip-symlink-up": (lambda p: zip_with_infos(p / "x.zip", [(symlink_info("d/ln"), b"../../x")]), "outside"),
    "zip-write-through-link": (
        lambda p: zip_with_infos(p / "x.zip", [(symlink_info("ln"), b"sub"), (zipfile.ZipInfo("ln/f.txt"), b"x")]),
        "lies under 'ln'",
    ),
    "zip-device": (
        lambda p: zip_with_infos(p / "x.zip", [(_attr(zipfile.ZipInfo("dev"), stat.S_IFCHR | 0o600), b"")]),
        "device",
    ),
    "duplicate": (lambda p: make_zip(p / "x.zip", {"dup.txt": b"1", "./dup.txt": b"2"}), "appears twice"),
    "file-and-folder": (lambda p: make_zip(p / "x.zip", {"a": b"1", "a/b": b"2"}), "lies under 'a'|appears twice"),
    "declared-size-lie": (lambda p: zip_bomb_declared_small(p / "x.zip"), "inflates past"),
    "overlapping": (lambda p: zip_overlapping(p / "x.zip"), "overlap"),
    "tar-symlink-abs": (
        lambda p: make_tar(p / "x.tar", [(tar_member("ok"), b"1"), (tar_member("ln", tarfile.SYMTYPE, "/etc"), None)]),
        "absolute",
    ),
    "tar-symlink-up": (
        lambda p: make_tar(p / "x.tar", [(tar_member("ln", tarfile.SYMTYPE, "../../etc"), None)]),
        "outside",
    ),
    "tar-link-chain": (
        lambda p: make_tar(
            p / "x.tar",
            [
                (tar_member("p/q/f"), b"1"),
                (tar_member("p/q/d1", tarfile.SYMTYPE, "../z"), None),
                (tar_member("a/f"), b"2"),
                # Lexically inside ("x"), but through p/q/d1 -> p/z it climbs one level out.
                (tar_member("a/l", tarfile.SYMTYPE, "../p/q/d1/../../../x"), None),
            ],
        ),
        "goes through another link",
    ),
    "tar-hardlink-out": (
        lambda p: make_tar(p / "x.tar", [(tar_member("hl", tarfile.LNKTYPE, "/etc/passwd"), None)]),
        "absolute",
    ),
    "tar-hardlink-missing": (
        lambda p: make_tar(p / "x.tar", [(tar_member("hl", tarfile.LNKTYPE, "nothere"), None)]),
        "does not point to a file",
    ),
    "tar-chardev": (lambda p: make_tar(p / "x.tar", [(tar_member("dev", tarfile.CHRTYPE), None)]), "device"),
    "tar-fifo": (lambda p: make_tar(p / "x.tar", [(tar_member("fifo", tarfile.FIFOTYPE), None)]), "FIFO"),
    "tar-dotdot-gz": (
        lambda p: make_tar(p / "x.tar.gz", [(tar_member("ok"), b"1"), (tar_member("../evil"), b"x")], "w:gz"),
        r"'\.\.'",
    ),
    "tar-absolute": (
        lambda p: make_tar(p / "x.tar", [(tar_member("ok"), b"1"), (tar_member("/tmp/evil"), b"x")]),
        "absolute",
    ),
    "tar-drive-letter": (lambda p: make_tar(p / "x.tar", [(tar_member("C:\\evil"), b"x")]), "drive letter"),
    "tar-blockdev": (lambda p: make_tar(p / "x.tar", [(tar_member("sda", tarfile.BLKTYPE), None)]), "device"),
    "tar-write-through-link": (
        lambda p: make_tar(p / "x.tar", [(tar_member("ln", tarfile.SYMTYPE, "."), None), (tar_member("ln/f"), b"x")]),
        "lies under 'ln'",
    ),
    "zip-ratio-bomb": (lambda p: make_zip(p / "x.zip", {"zeros.bin": bytes(5 * 1024 * 1024)}), "zip bomb"),
    "tar-duplicate": (
        lambda p: make_tar(p / "x.tar", [(tar_member("a.txt"), b"1"), (tar_member("a.txt"), b"2")]),
        "appears twice",
    ),
}


def _attr(info: zipfile.ZipInfo, mode: int) -> zipfile.ZipInfo:
    info.create_system = 3
    info.external_attr = mode << 16
    return info


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archive_is_rejected_before_writing(tmp_path: Path, case: str) -> None:
    build, message = HOSTILE[case]
    box = tmp_path / "box"
    box.mkdir()
    src = build(box)
    out = box / "deep" / "out"
    out.mkdir(parents=True)
    before = tree(tmp_path)
    with pytest.raises(UnsafeArchiveError, match=message):
        extract_archive(src, out, workers=2, progress=False)
    assert tree(tmp_path) == before  # nothing inside out, nothing next to it, nothing above it


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        (ArchiveLimits(max_members=5), "more than 5 members"),
        (ArchiveLimits(max_total_size=1000), "more than"),
        (ArchiveLimits(max_ratio=10, ratio_grace=1000), "expands"),
    ],
)
def test_bomb_limits_reject_and_can_be_raised(tmp_path: Path, limits: ArchiveLimits, message: str) -> None:
    src = make_zip(tmp_path / "z.zip", {f"f{i}.bin": b"\x00" * 50_000 for i in range(10)})
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UnsafeArchiveError, match=message):
        extract_archive(src, out, limits=limits, progress=False)
    assert list(out.iterdir()) == []
    assert extract_archive(src, out, limits=ArchiveLimits(), progress=False).files == 10


def test_gz_bomb_is_stopped_by_the_ratio_limit(tmp_path: Path) -> None:
    import gzip

    src = tmp_path / "zeros.gz"
    src.write_bytes(gzip.compress(b"\x00" * 3_000_000))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UnsafeArchiveError, match="expands"):
        extract_archive(src, out, limits=ArchiveLimits(max_ratio=50, ratio_grace=1000), progress=False)


@pytest.mark.parametrize("workers", [1, 2])
def test_corrupt_member_fails_its_crc_check(tmp_path: Path, workers: int) -> None:
    src = bad_crc_zip(tmp_path / "bad.zip")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ChecksumError, match="CRC"):
        extract_archive(src, out, workers=workers, progress=False)


def test_scan_archive_reports_without_writing(tmp_path: Path) -> None:
    src = make_zip(tmp_path / "a.zip", DATA)
    result = scan_archive(src)
    assert (result.files, result.top_level) == (len(DATA), ("ds",))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zip"]


def test_enospc_in_a_worker_process_reaches_the_caller(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real = _io.ops.write_fd

    def failing_write(fd: int, data: bytes | memoryview) -> int:
        calls["n"] += 1
        if calls["n"] > 30:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(_io.ops, "write_fd", failing_write)  # forked workers inherit the patch
    src = make_zip(tmp_path / "a.zip", DATA)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(OSError, match="No space") as caught:
        extract_archive(src, out, workers=2, progress=False)
    assert caught.value.errno == errno.ENOSPC


def test_make_archive_stores_compressed_files_and_round_trips(tmp_path: Path) -> None:
    folder = tmp_path / "flowers"
    (folder / "roses").mkdir(parents=True)
    (folder / "empty").mkdir()
    (folder / "roses" / "a.jpg").write_bytes(b"\xff\xd8" + b"j" * 5000)
    (folder / "roses" / "b.txt").write_bytes(b"t" * 5000)
    out = make_archive(folder, tmp_path / "up" / "flowers.zip", progress=False)
    with zipfile.ZipFile(out) as zf:
        methods = {info.filename: info.compress_type for info in zf.infolist()}
    assert methods == {
        "flowers/empty/": zipfile.ZIP_STORED,
        "flowers/roses/a.jpg": zipfile.ZIP_STORED,
        "flowers/roses/b.txt": zipfile.ZIP_DEFLATED,
    }
    again = tmp_path / "again"
    again.mkdir()
    extract_archive(out, again, progress=False)
    assert tree(again) == {"flowers": "dir", **{f"flowers/{k}": v for k, v in tree(folder).items()}}
    stored = make_archive(folder, tmp_path / "s.zip", compression="store", progress=False)
    with zipfile.ZipFile(stored) as zf:
        assert {info.compress_type for info in zf.infolist()} == {zipfile.ZIP_STORED}


def test_make_archive_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a folder"):
        make_archive(tmp_path / "missing", tmp_path / "x.zip")
    with pytest.raises(ValueError, match="compression="):
        make_archive(tmp_path, tmp_path / "x.zip", compression="lz4")  # type: ignore[arg-type]


def test_zip_with_prepended_data_takes_the_fast_reader(tmp_path: Path) -> None:
    plain = make_zip(tmp_path / "a.zip", DATA)
    prefixed = tmp_path / "sfx.zip"
    stub = b"#!/bin/sh\nexit 0\n"
    prefixed.write_bytes(stub + plain.read_bytes())  # a self-extractor's stub, offsets not adjusted
    plain_entries, plain_start = zipdir.read_central(str(plain))
    entries, start = zipdir.read_central(str(prefixed))
    assert start == plain_start + len(stub)
    assert [entry[7] for entry in entries] == [entry[7] + len(stub) for entry in plain_entries]
    for src in (prefixed, plain):
        out = tmp_path / f"out-{src.stem}"
        out.mkdir()
        extract_archive(src, out, workers=2, progress=False)
        assert {k: v for k, v in tree(out).items() if v != "dir"} == DATA
