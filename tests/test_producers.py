"""stage() on archives made by the real tools people use, from one source tree.

Each producer packs the same folder (non-ASCII and space-containing names, a
deep long path, empty files and folders, an executable, incompressible and
highly compressible data); the staged tree must be byte-identical to it.
A missing tool skips its case, naming the Debian package that provides it.
"""

from __future__ import annotations

import os
import shutil
import stat
import struct
import subprocess
import sys
import textwrap
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest

from colabkit.data import zipdir
from colabkit.data.archive import tools as archive_tools
from colabkit.data.archive import workers as archive_workers
from colabkit.data.stage import MARKER, stage
from colabkit.errors import ChecksumError, ColabkitError, MissingDependencyError, UnsafeArchiveError

PACKAGES = {"zip": "zip", "unzip": "unzip", "7z": "p7zip-full", "bsdtar": "libarchive-tools", "jar": "default-jdk"}
PACKAGES |= {"tar": "tar", "zstd": "zstd"}
UTF8_ENV = {**os.environ, "LC_ALL": "C.UTF-8"}


def need(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install -y {PACKAGES.get(tool, tool)})")


def run(args: list[str], cwd: Path) -> None:
    subprocess.run(args, cwd=cwd, check=True, env=UTF8_ENV, stdout=subprocess.DEVNULL)


def build_tree(root: Path) -> Path:
    data = root / "data"
    deep = data / "deep" / ("d" * 60) / ("e" * 60) / ("f" * 60) / "g"
    for folder in (data / "été", data / "日本語", data / "with space", deep, data / "empty folder"):
        folder.mkdir(parents=True)
    (data / "été" / "crème brûlée.png").write_bytes(os.urandom(3000))
    (data / "日本語" / "猫.txt").write_text("ねこ\n" * 50, encoding="utf-8")
    (data / "with space" / "a b.txt").write_bytes(b"spaces\n")
    (deep / ("long-name-" + "x" * 90 + ".bin")).write_bytes(b"deep" * 100)
    (data / "empty.txt").write_bytes(b"")
    (data / "noise.bin").write_bytes(os.urandom(300_000))
    (data / "zeros.bin").write_bytes(bytes(1_000_000))
    script = data / "run.sh"
    script.write_bytes(b"#!/bin/sh\necho hi\n")
    script.chmod(0o755)
    return data


def snapshot(root: Path) -> dict[str, object]:
    """Every entry under ``root``: files as (bytes, executable?), folders as 'dir'."""
    found: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath, name)
            rel = full.relative_to(root).as_posix()
            if rel == MARKER:
                continue
            if full.is_dir():
                found[rel] = "dir"
            else:
                found[rel] = (full.read_bytes(), bool(full.stat().st_mode & stat.S_IXUSR))
    return found


def without_modes(tree: dict[str, object]) -> dict[str, object]:
    return {k: v[0] if isinstance(v, tuple) else v for k, v in tree.items()}


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tree(tmp_path_factory.mktemp("src"))


PIPE_WRITER = textwrap.dedent(
    """
    import os, sys, zipfile
    root = sys.argv[1]
    # sys.stdout is a pipe: zipfile cannot seek back, so it writes data descriptors.
    with zipfile.ZipFile(sys.stdout.buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(dirnames + filenames):
                full = os.path.join(dirpath, name)
                zf.write(full, os.path.relpath(full, os.path.dirname(root)))
    """
)


def python_pipe(src: Path, out: Path) -> None:
    with open(out, "wb") as handle:
        writer = subprocess.Popen([sys.executable, "-c", PIPE_WRITER, str(src)], stdout=subprocess.PIPE)
        cat = subprocess.Popen(["cat"], stdin=writer.stdout, stdout=handle)
        assert writer.stdout is not None
        writer.stdout.close()
        assert cat.wait() == 0 and writer.wait() == 0
    with zipfile.ZipFile(out) as zf:
        assert all(info.flag_bits & 0x8 for info in zf.infolist() if not info.is_dir())  # data descriptors


def python_zip64(src: Path, out: Path) -> None:
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zf:
        for dirpath, dirnames, filenames in os.walk(src):
            dirnames.sort()
            for name in sorted(dirnames + filenames):
                full = Path(dirpath, name)
                arcname = full.relative_to(src.parent).as_posix()
                if full.is_dir():
                    zf.write(full, arcname)
                    continue
                info = zipfile.ZipInfo.from_file(full, arcname)
                info.compress_type = zipfile.ZIP_DEFLATED
                with zf.open(info, "w", force_zip64=True) as member:
                    member.write(full.read_bytes())


def sfx(make: Callable[[Path, Path], None], adjust: bool) -> Callable[[Path, Path], None]:
    def build(src: Path, out: Path) -> None:
        plain = out.with_name("plain-" + out.name)
        make(src, plain)
        out.write_bytes(b"#!/bin/sh\necho self-extractor stub\nexit 0\n" * 20 + plain.read_bytes())
        if adjust:
            run(["zip", "-A", "-q", str(out)], out.parent)  # what makes a real self-extractor

    return build


def tool(*args: str, tools: tuple[str, ...] = ()) -> tuple[tuple[str, ...], Callable[[Path, Path], None]]:
    def build(src: Path, out: Path) -> None:
        run([a.replace("{out}", str(out)) for a in args], src.parent)

    return (tools or (args[0],)), build


PRODUCERS: dict[str, tuple[str, tuple[str, ...], Callable[[Path, Path], None], bool]] = {
    # name: (archive file name, tools needed, builder, exec bit kept)
    "info-zip": ("data.zip", *tool("zip", "-r", "-q", "{out}", "data"), True),
    "info-zip-zip64": ("data.zip", *tool("zip", "-r", "-q", "-fz", "{out}", "data"), True),
    "info-zip-sfx-adjusted": ("data.zip", ("zip",), sfx(tool("zip", "-r", "-q", "{out}", "data")[1], True), True),
    "info-zip-sfx-raw": ("data.zip", ("zip",), sfx(tool("zip", "-r", "-q", "{out}", "data")[1], False), True),
    "7z-zip": ("data.zip", *tool("7z", "a", "-tzip", "-bd", "{out}", "data"), False),
    "7z-deflate64": ("data.zip", *tool("7z", "a", "-tzip", "-mm=Deflate64", "-bd", "{out}", "data"), False),
    "bsdtar-zip": ("data.zip", *tool("bsdtar", "--format", "zip", "-cf", "{out}", "data"), True),
    "bsdtar-tgz": ("data.tar.gz", *tool("bsdtar", "-czf", "{out}", "data"), True),
    "jar": ("data.jar", *tool("jar", "cfM", "{out}", "data"), False),
    "python-pipe": ("data.zip", (), lambda src, out: python_pipe(src, out), True),
    "python-zip64": ("data.zip", (), lambda src, out: python_zip64(src, out), True),
    "gnu-tar-gnu": ("data.tar", *tool("tar", "--format=gnu", "-cf", "{out}", "data"), True),
    "gnu-tar-pax": ("data.tar", *tool("tar", "--format=pax", "-cf", "{out}", "data"), True),
    "gnu-tgz": ("data.tgz", *tool("tar", "-czf", "{out}", "data"), True),
    "gnu-tar-bz2": ("data.tar.bz2", *tool("tar", "-cjf", "{out}", "data"), True),
    "gnu-tar-xz": ("data.tar.xz", *tool("tar", "-cJf", "{out}", "data"), True),
    "gnu-tar-zst": ("data.tar.zst", *tool("tar", "--zstd", "-cf", "{out}", "data", tools=("tar", "zstd")), True),
}


@pytest.mark.parametrize("producer", sorted(PRODUCERS))
def test_every_producer_stages_byte_identical(tmp_path: Path, source: Path, producer: str) -> None:
    filename, tools, build, keeps_mode = PRODUCERS[producer]
    need(*tools)
    if producer == "7z-deflate64":
        need("unzip")
    if filename.endswith(".zst"):
        pytest.importorskip("zstandard", reason="pip install zstandard (colabkit's 'zstd' extra)")
    out = tmp_path / filename
    build(source, out)
    root = stage(out, tmp_path / "staged", progress=False)
    assert root.name == "data"  # one top-level folder: that folder is returned
    want, got = snapshot(source), snapshot(root)
    if keeps_mode:
        assert got == want
    else:
        assert without_modes(got) == without_modes(want)
    assert os.listdir(tmp_path / "staged") == [root.parent.name]  # no temporary left


def test_info_zip_names_take_the_fast_reader(tmp_path: Path, source: Path) -> None:
    need("zip")
    out = tmp_path / "data.zip"
    run(["zip", "-r", "-q", str(out), "data"], source.parent)
    names = {entry[0] for entry in zipdir.read_central(str(out))[0]}
    assert "data/été/crème brûlée.png" in names and "data/日本語/猫.txt" in names
    with zipfile.ZipFile(out) as zf:  # what stage() used to write: zipfile's cp437 reading
        assert "data/├⌐t├⌐/cr├¿me br├╗l├⌐e.png" in zf.namelist()


def test_deflate64_without_unzip_uses_7z_and_without_either_names_the_fix(
    tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    need("7z")
    out = tmp_path / "data.zip"
    run(["7z", "a", "-tzip", "-mm=Deflate64", "-bd", str(out), "data"], source.parent)
    real_which = shutil.which
    monkeypatch.setattr(archive_tools.shutil, "which", lambda name: None if name == "unzip" else real_which(name))
    root = stage(out, tmp_path / "by-7z", progress=False)
    assert without_modes(snapshot(root)) == without_modes(snapshot(source))
    monkeypatch.setattr(archive_tools.shutil, "which", lambda name: None)
    with pytest.raises(MissingDependencyError, match=r"Deflate64 \(method 9\).*apt-get install -y unzip"):
        stage(out, tmp_path / "none", progress=False)
    assert not (tmp_path / "none").exists() or os.listdir(tmp_path / "none") == []


def test_a_tool_stream_that_does_not_match_the_directory_is_refused(tmp_path: Path, source: Path) -> None:
    need("7z", "unzip")
    out = tmp_path / "data.zip"
    run(["7z", "a", "-tzip", "-mm=Deflate64", "-bd", str(out), "data"], source.parent)
    data = bytearray(out.read_bytes())
    # The central directory says one member is a byte shorter than the data unzip produces.
    at = central_entry(data, b"data/zeros.bin")
    size = struct.unpack_from("<L", data, at + 24)[0]
    assert size == 1_000_000
    struct.pack_into("<L", data, at + 24, size - 1)
    out.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=r"data\.zip: member 'data/zeros\.bin'|fails its CRC"):
        stage(out, tmp_path / "staged", progress=False)
    assert os.listdir(tmp_path / "staged") == []


def central_entry(data: bytes | bytearray, name: bytes) -> int:
    """Where the central-directory entry of member ``name`` starts."""
    at = data.find(b"PK\x01\x02")
    while at >= 0:
        length = struct.unpack_from("<H", data, at + 28)[0]
        if data[at + 46 : at + 46 + length] == name:
            return at
        at = data.find(b"PK\x01\x02", at + 1)
    raise AssertionError(name)


def unicode_path_zip(path: Path, crc_ok: bool) -> Path:
    """A zip whose raw name is cp437 bytes and whose 0x7075 extra holds the real UTF-8 name."""
    raw = b"\x81t\x81.png"  # not valid UTF-8; cp437 reads it as "ütü.png"
    real = "été.png".encode()
    crc = zlib.crc32(raw) ^ (0 if crc_ok else 1)
    extra = struct.pack("<HHBL", 0x7075, 5 + len(real), 1, crc) + real
    info = zipfile.ZipInfo("XtX.png")
    info.extra = extra
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(info, b"pixels")
    data = path.read_bytes().replace(b"XtX.png", raw)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("crc_ok", [True, False])
def test_unicode_path_extra_field_is_used_when_its_crc_matches(tmp_path: Path, crc_ok: bool) -> None:
    src = unicode_path_zip(tmp_path / "u.zip", crc_ok)
    root = stage(src, tmp_path / "out", progress=False)
    expected = "été.png" if crc_ok else "ütü.png"  # a stale CRC: another tool renamed it, the raw name wins
    assert sorted(os.listdir(root)) == sorted([expected, MARKER])
    assert (root / expected).read_bytes() == b"pixels"


def test_macos_finder_zip_skips_litter_and_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "flowers.zip"
    with zipfile.ZipFile(src, "w") as zf:
        zf.writestr("flowers/rose/1.png", b"rose")
        zf.writestr("flowers/tulip/2.png", b"tulip")
        zf.writestr("flowers/.DS_Store", b"\x00\x00\x00\x01Bud1")
        zf.writestr("flowers/rose/.DS_Store", b"\x00\x00\x00\x01Bud1")
        zf.writestr("__MACOSX/", b"")
        zf.writestr("__MACOSX/flowers/", b"")
        zf.writestr("__MACOSX/flowers/._.DS_Store", b"\x00\x05\x16\x07")
        zf.writestr("__MACOSX/flowers/rose/._1.png", b"\x00\x05\x16\x07")
        zf.writestr("flowers/Thumbs.db", b"thumbs")
        zf.writestr("flowers/tulip/desktop.ini", b"[.ShellClassInfo]")
    root = stage(src, tmp_path / "data", progress=True)
    assert root == tmp_path / "data" / "flowers" / "flowers"  # __MACOSX does not count as a second folder
    assert without_modes(snapshot(root)) == {
        "rose": "dir",
        "tulip": "dir",
        "rose/1.png": b"rose",
        "tulip/2.png": b"tulip",
    }
    assert not (tmp_path / "data" / "flowers" / "__MACOSX").exists()
    said = capsys.readouterr().out
    assert "skipped 8 macOS/Windows metadata files" in said and "keep_platform_files=True" in said
    kept = stage(src, tmp_path / "kept", progress=False, keep_platform_files=True)
    assert kept == tmp_path / "kept" / "flowers" / "flowers"
    assert (kept / ".DS_Store").exists() and (kept / "tulip" / "desktop.ini").exists()
    assert (kept.parent / "__MACOSX" / "flowers" / "rose" / "._1.png").read_bytes() == b"\x00\x05\x16\x07"


def test_windows_backslash_zip_makes_folders_and_still_refuses_dotdot(tmp_path: Path) -> None:
    src = tmp_path / "win.zip"
    with zipfile.ZipFile(src, "w") as zf:
        zf.writestr("data\\train\\cat\\1.png", b"cat")
        zf.writestr("data\\train\\dog\\2.png", b"dog")
    root = stage(src, tmp_path / "out", progress=False)
    assert root.name == "data"
    assert without_modes(snapshot(root)) == {
        "train": "dir",
        "train/cat": "dir",
        "train/dog": "dir",
        "train/cat/1.png": b"cat",
        "train/dog/2.png": b"dog",
    }
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("data\\ok.png", b"ok")
        zf.writestr("data\\..\\..\\evil.png", b"evil")
    with pytest.raises(UnsafeArchiveError, match=r"'\.\.'"):
        stage(evil, tmp_path / "bad", progress=False)
    assert os.listdir(tmp_path / "bad") == []


def test_names_equal_after_unicode_normalisation_are_duplicates(tmp_path: Path) -> None:
    src = tmp_path / "nfd.zip"
    with zipfile.ZipFile(src, "w") as zf:
        zf.writestr("d/\u00e9.png", b"composed")  # NFC: one code point
        zf.writestr("d/e\u0301.png", b"decomposed")  # NFD, as macOS writes it
    with pytest.raises(UnsafeArchiveError, match="Unicode-normalised"):
        stage(src, tmp_path / "out", progress=False)
    kelvin = tmp_path / "kelvin.zip"
    with zipfile.ZipFile(kelvin, "w") as zf:
        zf.writestr("K.txt", b"ascii")
        zf.writestr("\u212a.txt", b"kelvin sign")  # NFC turns it into plain 'K'
    with pytest.raises(UnsafeArchiveError, match="Unicode-normalised"):
        stage(kelvin, tmp_path / "out2", progress=False)


def damaged_truncated(path: Path) -> str:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return "truncated|end-of-archive"


def damaged_crc(path: Path) -> str:
    data = bytearray(path.read_bytes())
    at = data.find(b"incompressible-marker")
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    return "member 'd/b.bin' fails its CRC"


def damaged_lying_size(path: Path) -> str:
    data = bytearray(path.read_bytes())
    at = data.rfind(b"PK\x01\x02")  # the last member's central entry: d/b.bin
    size = struct.unpack_from("<L", data, at + 24)[0]
    struct.pack_into("<L", data, at + 24, size + 10)
    path.write_bytes(bytes(data))
    return "member 'd/b.bin'"


@pytest.mark.parametrize("damage", [damaged_truncated, damaged_crc, damaged_lying_size])
@pytest.mark.parametrize("workers", [1, 2])
def test_damaged_zip_names_archive_and_member_and_changes_nothing(
    tmp_path: Path, damage: Callable[[Path], str], workers: int
) -> None:
    src = tmp_path / "d.zip"
    with zipfile.ZipFile(src, "w") as zf:
        for i in range(1500):
            zf.writestr(f"d/a{i}.txt", b"a" * 100)
        zf.writestr("d/b.bin", b"incompressible-marker" + os.urandom(2000), compress_type=zipfile.ZIP_STORED)
    dest = tmp_path / "data"
    old = stage(_zip_with(tmp_path / "v1" / "d.zip", {"d/old.txt": b"old"}), dest, progress=False)
    message = damage(src)
    with pytest.raises(ColabkitError, match=rf"d\.zip.*({message})"):
        stage(src, dest, progress=False, workers=workers, overwrite=True)
    assert snapshot(old) == {"old.txt": (b"old", False)}
    assert sorted(os.listdir(dest)) == ["d"]  # no temporary folder left


def _zip_with(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_7z_archives_need_py7zr_and_are_validated(tmp_path: Path, source: Path) -> None:
    need("7z")
    out = tmp_path / "data.7z"
    run(["7z", "a", "-bd", str(out), "data"], source.parent)
    try:
        import py7zr  # noqa: F401
    except ImportError:
        with pytest.raises(MissingDependencyError, match="pip install py7zr"):
            stage(out, tmp_path / "x", progress=False)
        return
    root = stage(out, tmp_path / "staged", progress=False)
    assert without_modes(snapshot(root)) == without_modes(snapshot(source))


def dotdot_7z(folder: Path) -> Path:
    """A .7z with a member '../evil.txt' (7z itself refuses to write one: patched in, CRCs redone)."""
    (folder / "ab").mkdir(parents=True)
    (folder / "ab" / "evil.txt").write_bytes(b"evil")
    (folder / "ok.txt").write_bytes(b"ok")
    out = folder / "evil.7z"
    run(["7z", "a", "-mhc=off", "-bd", str(out), "ok.txt", "ab/evil.txt"], folder)
    data = bytearray(out.read_bytes())
    offset, size = struct.unpack_from("<QQ", data, 12)
    start = 32 + offset
    header = bytes(data[start : start + size])
    assert header.count("ab".encode("utf-16-le")) == 1
    header = header.replace("ab".encode("utf-16-le"), "..".encode("utf-16-le"))
    data[start : start + size] = header
    struct.pack_into("<L", data, 28, zlib.crc32(header))
    struct.pack_into("<L", data, 8, zlib.crc32(bytes(data[12:32])))
    out.write_bytes(bytes(data))
    return out


def test_hostile_7z_is_refused(tmp_path: Path) -> None:
    need("7z")
    pytest.importorskip("py7zr", reason="pip install py7zr (colabkit's '7z' extra)")
    out = dotdot_7z(tmp_path / "build")
    with pytest.raises(UnsafeArchiveError, match=r"'\.\.'"):
        stage(out, tmp_path / "staged", progress=False)
    assert os.listdir(tmp_path / "staged") == []
    assert not (tmp_path / "evil.txt").exists()


def test_zstd_single_file_and_missing_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    need("zstd")
    plain = tmp_path / "labels.csv"
    plain.write_bytes(b"id,label\n" * 1000)
    subprocess.run(["zstd", "-q", str(plain), "-o", str(tmp_path / "labels.csv.zst")], check=True)
    try:
        import zstandard  # noqa: F401
    except ImportError:
        with pytest.raises(MissingDependencyError, match="pip install zstandard"):
            stage(tmp_path / "labels.csv.zst", tmp_path / "out", progress=False)
        return
    root = stage(tmp_path / "labels.csv.zst", tmp_path / "out", progress=False)
    assert (root / "labels.csv").read_bytes() == plain.read_bytes()


@pytest.mark.slow
def test_70000_entry_zip_takes_the_parallel_fast_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "mnist.zip"
    count = 70_000
    with zipfile.ZipFile(src, "w", zipfile.ZIP_STORED) as zf:
        for i in range(count):
            zf.writestr(f"mnist/{i % 10}/{i:05d}.png", b"%d" % i)
    with open(src, "rb") as handle:
        handle.seek(-200, os.SEEK_END)
        assert b"PK\x06\x06" in handle.read()  # past 65,535 entries: the zip64 end record
    entries, _ = zipdir.read_central(str(src))
    assert len(entries) == count
    forked: list[int] = []
    real = archive_workers.run_forked

    def spy(task: object, chunks: list[object], workers: int, done: object) -> None:
        forked.append(workers)
        real(task, chunks, workers, done)  # type: ignore[arg-type]

    monkeypatch.setattr(archive_workers, "run_forked", spy)
    monkeypatch.setattr(archive_workers.os, "cpu_count", lambda: 2)
    root = stage(src, tmp_path / "out", progress=False)
    assert forked == [2]
    assert (root / "7" / "12347.png").read_bytes() == b"12347"
    assert sum(len(files) for _, _, files in os.walk(root)) == count


def test_overlapping_member_for_the_tool_is_refused_before_writing(tmp_path: Path, source: Path) -> None:
    need("7z", "unzip")
    out = tmp_path / "data.zip"
    run(["7z", "a", "-tzip", "-mm=Deflate64", "-bd", str(out), "data"], source.parent)
    data = bytearray(out.read_bytes())
    at = central_entry(data, "data/日本語/猫.txt".encode())
    assert struct.unpack_from("<H", data, at + 10)[0] == 9  # Deflate64
    packed = struct.unpack_from("<L", data, at + 20)[0]
    # Still short of the next header by the central directory's rough count, past it by the exact one.
    struct.pack_into("<L", data, at + 20, packed + 5)
    out.write_bytes(bytes(data))
    with pytest.raises(UnsafeArchiveError, match=r"猫\.txt' overlaps the next one"):
        stage(out, tmp_path / "staged", progress=False)
    assert os.listdir(tmp_path / "staged") == []
