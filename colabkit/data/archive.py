"""Safe, parallel archive extraction and :func:`make_archive`.

Extraction reads the whole member list first and refuses the archive before
a single byte is written when any member is hostile: absolute names, drive
letters, ``..``, links that leave the destination, chain through other links
or that other members would be written through, device files and FIFOs,
duplicate names, and bombs (total size, member count, compression ratio; see
:class:`ArchiveLimits`). Only then are files written, into an empty folder the
caller owns (``stage()`` uses a temporary sibling of the destination). What
only the data can show (a member that inflates past its declared size, a bad
CRC, overlapping data) stops extraction midway; everything written is then
removed, so the folder is left as it was.

Speed comes from skipping the per-file overhead of :mod:`zipfile` and
:mod:`tarfile`: members are located once from the headers, then worker
processes (forked, each with its own file descriptor on the archive) read
member data with ``pread``, inflate it with :mod:`zlib`, check the CRC and
write it with ``os.open``/``os.write``. Folders are created once up front;
nothing is fsynced per file (publishing the folder is the commit point).

Seams for tests: :data:`out_ops` (how member files are created and written).
"""

from __future__ import annotations

import bz2
import contextlib
import dataclasses
import gzip
import lzma
import os
import shutil
import signal
import stat
import struct
import sys
import tarfile
import warnings
import zipfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, Literal

from colabkit import _io, display
from colabkit.errors import ArgumentError, ChecksumError, ColabkitIOError, UnsafeArchiveError

__all__ = [
    "COMPRESSED_SUFFIXES",
    "ArchiveLimits",
    "ExtractResult",
    "archive_format",
    "extract_archive",
    "extracted_size",
    "make_archive",
    "scan_archive",
]

Format = Literal["zip", "tar", "tar.gz", "tar.bz2", "tar.xz", "gz"]

#: File types already compressed: make_archive stores them as they are.
_PACKED = ".jpg .jpeg .png .gif .webp .avif .heic .jp2 .mp4 .mkv .webm .mov .avi .mp3 .m4a .aac .ogg .opus .flac"
_PACKED += " .zip .gz .tgz .bz2 .xz .zst .lz4 .7z .rar .npz .pt .pth .safetensors .parquet .tfrecord .pdf .docx .xlsx"
COMPRESSED_SUFFIXES = frozenset(_PACKED.split())

_MiB = 1024 * 1024
_BIG = 8 * _MiB  # members above this stream in chunks instead of going through memory whole
_OUT_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")
_LOCAL_SIG = b"PK\x03\x04"
_HEAD_SLACK = _LOCAL_HEADER.size + 1024  # local header + name + extra, read with the data in one go
_ZIP_METHODS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA)


@dataclasses.dataclass(frozen=True)
class ArchiveLimits:
    """Limits that reject archive bombs; raise them for unusual but trusted archives.

    Attributes:
        max_members: Most members (files, folders, links) an archive may hold.
        max_total_size: Most bytes all members may add up to once extracted.
        max_ratio: Highest uncompressed / compressed ratio of one member (and of
            the whole archive); ordinary data compresses 1-10x, bombs 1000x.
        ratio_grace: Members (and archives) smaller than this once extracted are
            exempt from the ratio check: tiny files of zeros are harmless.

    Example:
        >>> stage("masks.zip", limits=ArchiveLimits(max_ratio=5000))  # doctest: +SKIP
    """

    max_members: int = 10_000_000
    max_total_size: int = 1024**4
    max_ratio: float = 250.0
    ratio_grace: int = 4 * _MiB


@dataclasses.dataclass(frozen=True)
class ExtractResult:
    """What an extraction wrote.

    Attributes:
        files: Regular files written.
        bytes: Their total size.
        top_level: Names directly inside the destination.
    """

    files: int
    bytes: int
    top_level: tuple[str, ...]


@dataclasses.dataclass
class _Plan:
    # A file job: (relative path, offset, compressed size, size, method, crc or -1, mode, limit);
    # see _extract_chunk.
    files: list[tuple[str, int, int, int, int, int, int, int]] = dataclasses.field(default_factory=list)
    dirs: set[str] = dataclasses.field(default_factory=set)
    symlinks: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    hardlinks: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    total: int = 0
    members: int = 0

    @property
    def top_level(self) -> tuple[str, ...]:
        names = {name.split("/", 1)[0] for name, *_ in self.files}
        names |= {name.split("/", 1)[0] for name in self.dirs}
        names |= {name.split("/", 1)[0] for name, _ in self.symlinks + self.hardlinks}
        return tuple(sorted(names))


class OutOps:
    """How extracted files are created and written: the seam for fault injection."""

    def open(self, path: str, mode: int) -> int:
        return os.open(path, _OUT_FLAGS, mode)

    def write(self, fd: int, data: bytes | memoryview) -> int:
        return os.write(fd, data)


out_ops = OutOps()


# -- format detection ---------------------------------------------------------------------------


def archive_format(path: str | os.PathLike[str], *, name: str | None = None) -> Format | None:
    """The archive format of ``path`` (by name, then by its first bytes), or None for other files.

    Args:
        path: The file to look at.
        name: The file's original name when ``path`` is a download with a made-up name.
    """
    lowered = (name or os.fspath(path)).lower()
    for suffixes, fmt in (
        ((".tar.gz", ".tgz"), "tar.gz"),
        ((".tar.bz2", ".tbz", ".tbz2"), "tar.bz2"),
        ((".tar.xz", ".txz"), "tar.xz"),
        ((".tar",), "tar"),
        ((".zip",), "zip"),
        ((".gz",), "gz"),
    ):
        if lowered.endswith(suffixes):
            return fmt  # type: ignore[return-value]
    try:
        with open(path, "rb") as handle:
            head = handle.read(512 + 8)
    except (IsADirectoryError, FileNotFoundError):
        return None
    if head.startswith(_LOCAL_SIG) or head.startswith(b"PK\x05\x06"):
        return "zip"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    for magic, opener, fmt in (
        (b"\x1f\x8b", gzip.open, "gz"),
        (b"BZh", bz2.open, "tar.bz2"),
        (b"\xfd7zXZ\x00", lzma.open, "tar.xz"),
    ):
        if head.startswith(magic):
            try:
                with opener(path, "rb") as inner:
                    block = inner.read(262)
            except (OSError, EOFError, lzma.LZMAError):
                return None
            if block[257:262] == b"ustar":
                return "tar.gz" if fmt == "gz" else fmt  # type: ignore[return-value]
            return "gz" if fmt == "gz" else None
    return None


# -- member validation --------------------------------------------------------------------------


def _clean_name(raw: str, archive: str) -> str:
    """Normalise a member name, or raise for a name that could leave the destination."""
    if (
        # The common, plainly safe name: skip the general path (20,000 members add up).
        raw
        and raw[0] not in "/."
        and raw[1:2] != ":"
        and ".." not in raw
        and "\\" not in raw
        and "//" not in raw
        and "/." not in raw
        and "\x00" not in raw
    ):
        return raw[:-1] if raw.endswith("/") else raw
    name = raw.replace("\\", "/")
    if "\x00" in name:
        raise UnsafeArchiveError(f"{archive}: member {raw!r} has a NUL byte in its name; the archive is corrupt")
    if name.startswith("/"):
        raise UnsafeArchiveError(
            f"{archive}: member {raw!r} has an absolute path; refusing to extract an archive that writes outside "
            "its destination (re-create it with relative names)"
        )
    if len(name) >= 2 and name[1] == ":" and name[0].isalpha():
        raise UnsafeArchiveError(
            f"{archive}: member {raw!r} starts with a drive letter; refusing to extract it (re-create the archive "
            "with relative names)"
        )
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(
            f"{archive}: member {raw!r} contains '..' and would be written outside the destination; "
            "refusing to extract it"
        )
    if not parts:
        raise UnsafeArchiveError(f"{archive}: member {raw!r} has an empty name; the archive is malformed")
    return "/".join(parts)


class _Names:
    """Tracks member names to catch duplicates, file/folder clashes and paths through links."""

    def __init__(self, archive: str) -> None:
        self.archive = archive
        self.kinds: dict[str, str] = {}

    def add(self, name: str, kind: str) -> None:
        kinds = self.kinds
        parent = name.rpartition("/")[0]
        if kind != "dir" and name not in kinds and (not parent or kinds.get(parent) == "dir"):
            kinds[name] = kind  # the usual case: a new file in a folder already seen
            return
        parts = name.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            seen = self.kinds.get(parent)
            if seen is None:
                self.kinds[parent] = "dir"
            elif seen != "dir":
                raise UnsafeArchiveError(
                    f"{self.archive}: member {name!r} lies under {parent!r}, which is a {seen} in the same archive; "
                    "refusing to write through it"
                )
        seen = self.kinds.get(name)
        if seen is not None and not (seen == "dir" and kind == "dir"):
            raise UnsafeArchiveError(
                f"{self.archive}: member name {name!r} appears twice (as {seen} and as {kind}); the second copy "
                "would silently replace the first, so the archive is rejected"
            )
        self.kinds[name] = kind


def _check_link(archive: str, name: str, target: str, kind: str, names: _Names) -> str:
    """Validate a link member; returns where it points, relative to the destination.

    The target is walked one component at a time from the link's folder (a hard
    link's from the destination). No member lies under a link (see :class:`_Names`),
    so every step that is not itself a link is a real folder and the walk matches
    what the OS will do; a walk that reaches a link, or climbs above the
    destination, is rejected.
    """
    if not target or "\x00" in target:
        raise UnsafeArchiveError(f"{archive}: {kind} {name!r} has an empty or malformed target")
    norm = target.replace("\\", "/")
    if norm.startswith("/") or (len(norm) >= 2 and norm[1] == ":"):
        raise UnsafeArchiveError(
            f"{archive}: {kind} {name!r} points to the absolute path {target!r}, outside the destination; rejected"
        )
    stack = name.split("/")[:-1] if kind == "symlink" else []
    for part in norm.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not stack:
                raise UnsafeArchiveError(
                    f"{archive}: {kind} {name!r} -> {target!r} points outside the destination; rejected"
                )
            stack.pop()
            continue
        stack.append(part)
        if names.kinds.get("/".join(stack)) in ("symlink", "hardlink"):
            raise UnsafeArchiveError(
                f"{archive}: {kind} {name!r} -> {target!r} goes through another link; chains of links could "
                "leave the destination, so the archive is rejected"
            )
    if not stack:
        raise UnsafeArchiveError(f"{archive}: {kind} {name!r} -> {target!r} points at the destination itself; rejected")
    return "/".join(stack)


def _check_budget(archive: str, plan: _Plan, limits: ArchiveLimits) -> None:
    if plan.members > limits.max_members:
        raise UnsafeArchiveError(
            f"{archive}: holds more than {limits.max_members} members (ArchiveLimits.max_members); if you trust it, "
            "pass limits=ArchiveLimits(max_members=...) with a higher value"
        )
    if plan.total > limits.max_total_size:
        raise UnsafeArchiveError(
            f"{archive}: would extract to more than {_io.human_bytes(limits.max_total_size)} "
            f"({plan.total} bytes declared; ArchiveLimits.max_total_size); if you trust it, raise the limit"
        )


def _check_ratio(archive: str, what: str, size: int, packed: int, limits: ArchiveLimits) -> None:
    if size > limits.ratio_grace and size > limits.max_ratio * max(packed, 1):
        raise UnsafeArchiveError(
            f"{archive}: {what} expands {size / max(packed, 1):.0f}x ({packed} -> {size} bytes), more than "
            f"ArchiveLimits.max_ratio={limits.max_ratio:g}; this looks like a zip bomb. If you trust the archive, "
            "pass limits=ArchiveLimits(max_ratio=...) with a higher value"
        )


_CENTRAL = struct.Struct("<4s4B4HL2L5H2L")
_END = struct.Struct("<4s4H2LH")

# A central-directory entry: (name, flag bits, method, crc, packed size, size, unix mode, header offset).
_Entry = tuple[str, int, int, int, int, int, int, int]


def _fast_central(path: str) -> tuple[list[_Entry], int] | None:
    """Parse a plain (non-zip64) central directory in one read; None when zipfile must do it.

    ``ZipFile.infolist()`` builds a ZipInfo object per member, a third of the scan
    time for 20,000 small files; this reads the same fields straight into tuples.
    """
    with open(path, "rb") as handle:
        size = handle.seek(0, os.SEEK_END)
        tail_size = min(size, 65536 + _END.size)
        handle.seek(size - tail_size)
        tail = handle.read(tail_size)
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or at + _END.size > len(tail):
            return None
        _, disk, _, count, total, cd_size, cd_offset, _ = _END.unpack_from(tail, at)
        end_pos = size - tail_size + at
        if disk or count != total or 0xFFFF in (count, total) or 0xFFFFFFFF in (cd_size, cd_offset):
            return None  # multi-disk or zip64: leave it to zipfile
        if cd_offset + cd_size != end_pos or (end_pos >= 20 and tail[max(0, at - 20) : at].startswith(b"PK\x06\x07")):
            return None  # data prepended (self-extractor) or a zip64 locator
        handle.seek(cd_offset)
        central = handle.read(cd_size)
    entries: list[_Entry] = []
    pos = 0
    unpack = _CENTRAL.unpack_from
    for _ in range(count):
        if central[pos : pos + 4] != b"PK\x01\x02":
            return None
        fields = unpack(central, pos)
        flags, name_len = fields[5], fields[12]
        raw_name = central[pos + 46 : pos + 46 + name_len]
        if 0xFFFFFFFF in (fields[10], fields[11], fields[18]):
            return None
        name = raw_name.decode("utf-8" if flags & 0x800 or raw_name.isascii() else "cp437")
        mode = (fields[17] >> 16) & 0xFFFF if fields[2] == 3 else 0
        entries.append((name, flags, fields[6], fields[9], fields[10], fields[11], mode, fields[18]))
        pos += 46 + name_len + fields[13] + fields[14]
    return entries, cd_offset


def _zipfile_central(path: str) -> tuple[list[_Entry], int]:
    try:
        with zipfile.ZipFile(path) as zf:
            infos, start_dir = zf.infolist(), zf.start_dir
    except zipfile.BadZipFile as exc:
        raise UnsafeArchiveError(f"{path}: not a readable zip archive ({exc}); re-download or re-create it") from exc
    return [
        (
            info.filename,
            info.flag_bits,
            info.compress_type,
            info.CRC,
            info.compress_size,
            info.file_size,
            (info.external_attr >> 16) & 0xFFFF if info.create_system == 3 else 0,
            info.header_offset,
        )
        for info in infos
    ], start_dir


def _scan_zip(path: str, limits: ArchiveLimits) -> _Plan:
    try:
        found = _fast_central(path)
    except (OSError, UnicodeDecodeError, struct.error):
        found = None
    entries, start_dir = found if found is not None else _zipfile_central(path)
    plan = _Plan(members=len(entries))
    _check_budget(path, plan, limits)
    names = _Names(path)
    packed_total = 0
    links: list[str] = []
    # Overlapping members are the "quoted overlap" zip bomb (CVE-2019-13232, CVE-2024-0450): each
    # member's data must end before the next member's header. Checked here from the central
    # directory (a lower bound on each member's extent) and exactly by the workers from the
    # local headers, which they read anyway.
    offsets = sorted(entry[7] for entry in entries)
    if len(set(offsets)) != len(offsets):
        raise UnsafeArchiveError(
            f"{path}: two members share one data record; this is an overlapping-entry zip bomb or a corrupt "
            "archive, rejected"
        )
    following = dict(zip(offsets, [*offsets[1:], start_dir], strict=True))
    files = plan.files
    for filename, flags, method, crc, packed, size, mode, offset in entries:
        name = _clean_name(filename, path)
        limit = following[offset]
        if offset + _LOCAL_HEADER.size + len(filename) + packed > limit:
            raise UnsafeArchiveError(
                f"{path}: member {filename!r} overlaps the next one; this is an overlapping-entry zip bomb or "
                "a corrupt archive, rejected"
            )
        if flags & 0x1:
            raise UnsafeArchiveError(
                f"{path}: member {filename!r} is encrypted; decrypt the archive first (stage() does not take passwords)"
            )
        if filename.endswith("/"):
            names.add(name, "dir")
            plan.dirs.add(name)
            continue
        ftype = mode & 0o170000
        if ftype == stat.S_IFLNK:
            names.add(name, "symlink")
            links.append(filename)
            continue
        if ftype and ftype != stat.S_IFREG:
            raise UnsafeArchiveError(
                f"{path}: member {filename!r} is a device, FIFO or socket (mode {oct(mode)}); datasets hold "
                "only files and folders, so the archive is rejected"
            )
        names.add(name, "file")
        if method not in _ZIP_METHODS:
            raise UnsafeArchiveError(
                f"{path}: member {filename!r} uses compression method {method}, which Python cannot read; "
                "re-create the archive with deflate"
            )
        if size > limits.ratio_grace:
            _check_ratio(path, f"member {filename!r}", size, packed, limits)
        files.append((name, offset, packed, size, method, crc, 0o755 if mode & 0o111 else 0o644, limit))
        plan.total += size
        packed_total += packed
    if links:
        with zipfile.ZipFile(path) as zf:
            for filename in links:
                name = _clean_name(filename, path)
                info = zf.getinfo(filename)
                target = zf.read(info).decode("utf-8", "replace") if info.file_size < 4096 else ""
                _check_link(path, name, target, "symlink", names)
                plan.symlinks.append((name, target.replace("\\", "/")))
    _check_budget(path, plan, limits)
    _check_ratio(path, "the archive", plan.total, packed_total, limits)
    return plan


def _scan_tar(path: str, limits: ArchiveLimits) -> _Plan:
    plan = _Plan()
    names = _Names(path)
    pending: list[tuple[str, str, str]] = []
    try:
        tf = tarfile.open(path, "r:")  # noqa: SIM115 - closed by the with below
    except tarfile.TarError as exc:
        raise UnsafeArchiveError(f"{path}: not a readable tar archive ({exc}); re-download or re-create it") from exc
    with tf:
        try:
            for info in tf:
                plan.members += 1
                if plan.members > limits.max_members:
                    _check_budget(path, plan, limits)
                name = _clean_name(info.name, path)
                if info.isdir():
                    names.add(name, "dir")
                    plan.dirs.add(name)
                elif info.isreg():
                    if info.sparse is not None:
                        raise UnsafeArchiveError(
                            f"{path}: member {info.name!r} is a GNU sparse file, which stage() does not write; "
                            "re-create the archive without --sparse"
                        )
                    names.add(name, "file")
                    file_mode = 0o755 if info.mode & 0o111 else 0o644
                    plan.files.append(
                        (name, info.offset_data, info.size, info.size, zipfile.ZIP_STORED, -1, file_mode, -1)
                    )
                    plan.total += info.size
                    if plan.total > limits.max_total_size:
                        _check_budget(path, plan, limits)
                elif info.issym():
                    names.add(name, "symlink")
                    pending.append((name, info.linkname, "symlink"))
                elif info.islnk():
                    names.add(name, "hardlink")
                    pending.append((name, info.linkname, "hardlink"))
                else:
                    raise UnsafeArchiveError(
                        f"{path}: member {info.name!r} is a device, FIFO or other special file; datasets hold only "
                        "files and folders, so the archive is rejected"
                    )
        except tarfile.TarError as exc:
            raise UnsafeArchiveError(
                f"{path}: the tar archive is corrupt ({exc}); re-download or re-create it"
            ) from exc
    for name, target, kind in pending:
        joined = _check_link(path, name, target, kind, names)
        if kind == "hardlink":
            if names.kinds.get(joined) != "file":
                raise UnsafeArchiveError(
                    f"{path}: hard link {name!r} -> {target!r} does not point to a file in the archive; rejected"
                )
            plan.hardlinks.append((name, joined))
        else:
            plan.symlinks.append((name, target.replace("\\", "/")))
    _check_budget(path, plan, limits)
    return plan


def scan_archive(path: str | os.PathLike[str], *, limits: ArchiveLimits | None = None) -> ExtractResult:
    """Validate every member of a zip or uncompressed tar without extracting anything.

    Args:
        path: The archive.
        limits: Bomb limits; the defaults of :class:`ArchiveLimits` when None.

    Returns:
        What extraction would write.

    Raises:
        UnsafeArchiveError: A member is hostile or a limit is exceeded.
    """
    plan = _scan(os.fspath(path), archive_format(path), limits or ArchiveLimits())
    return ExtractResult(len(plan.files), plan.total, plan.top_level)


def _scan(path: str, fmt: Format | None, limits: ArchiveLimits) -> _Plan:
    if fmt == "zip":
        return _scan_zip(path, limits)
    if fmt == "tar":
        return _scan_tar(path, limits)
    raise ArgumentError(f"{path}: format {fmt!r} cannot be scanned directly; only zip and plain tar can")


# -- extraction workers ---------------------------------------------------------------------------


def _write_all(fd: int, data: bytes | memoryview) -> None:
    written = out_ops.write(fd, data)
    if written == len(data):
        return  # the usual case: one write
    view = memoryview(data)[written:]
    while view:
        written = out_ops.write(fd, view)
        view = view[written:]


def _member_error(archive: str, name: str, problem: str) -> ChecksumError:
    return ChecksumError(f"{archive}: member {name!r} {problem}; the archive is corrupt, re-download or re-create it")


def _extract_chunk(archive: str, root: str, jobs: Sequence[tuple[str, int, int, int, int, int, int, int]]) -> int:
    """Write ``jobs`` (file members) under ``root``; runs in a worker process or in-process.

    A job is ``(name, offset, packed size, size, method, crc or -1, mode, limit)``. For zip
    members ``offset`` is the local header and ``limit`` where the next member starts; for
    tar members (``limit == -1``) ``offset`` is the data itself.
    """
    fd = os.open(archive, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    zf: zipfile.ZipFile | None = None
    by_offset: dict[int, zipfile.ZipInfo] = {}
    written = 0
    try:
        for name, offset, packed, size, method, crc, mode, limit in jobs:
            small = size <= _BIG and packed <= _BIG and method in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
            raw: bytes | memoryview = b""
            data: bytes | memoryview = b""
            start = offset
            if limit >= 0:
                # One read brings the local header and (for small members) the data after it.
                head = os.pread(fd, _HEAD_SLACK + (packed if small else 0), offset)
                if len(head) < _LOCAL_HEADER.size or head[:4] != _LOCAL_SIG:
                    raise _member_error(archive, name, "has a bad local header")
                name_len, extra_len = struct.unpack_from("<HH", head, 26)
                start = offset + _LOCAL_HEADER.size + name_len + extra_len
                if start + packed > limit:
                    raise UnsafeArchiveError(
                        f"{archive}: member {name!r} overlaps the next one; this is an overlapping-entry zip bomb, "
                        "rejected"
                    )
                if small:
                    skip = start - offset
                    raw = memoryview(head)[skip : skip + packed]
                    if len(raw) < packed:
                        raw = os.pread(fd, packed, start)
            elif small:
                raw = os.pread(fd, packed, offset)
            if small:
                data = _inflate(raw, packed, size, archive, name) if method == zipfile.ZIP_DEFLATED else raw
                if len(data) != size:
                    raise _member_error(archive, name, f"is {len(data)} bytes, its header says {size}")
                if crc >= 0 and zlib.crc32(data) != crc:
                    raise _member_error(archive, name, "fails its CRC check")
            out = out_ops.open(f"{root}/{name}", mode)
            try:
                if small:
                    _write_all(out, data)
                elif method in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                    _stream_member(fd, out, archive, name, start, packed, size, method, crc)
                else:
                    if zf is None:
                        zf = zipfile.ZipFile(archive)
                        by_offset = {info.header_offset: info for info in zf.infolist()}
                    _stream_zipfile(zf, by_offset[offset], out, archive, name)
            finally:
                os.close(out)
            written += 1
    except zlib.error as exc:
        raise ChecksumError(f"{archive}: a member does not inflate ({exc}); the archive is corrupt") from exc
    finally:
        os.close(fd)
        if zf is not None:
            zf.close()
    return written


def _inflate(raw: bytes | memoryview, packed: int, size: int, archive: str, name: str) -> bytes:
    if packed <= 65536:
        # Deflate expands at most ~1032x, so a small member cannot blow up memory; one call is fastest.
        data = zlib.decompress(raw, -15, size or 1)
    else:
        # One byte past the declared size is enough to tell a lying header.
        data = zlib.decompressobj(-15).decompress(raw, size + 1)
    if len(data) > size:
        raise UnsafeArchiveError(f"{archive}: member {name!r} inflates past its declared {size} bytes; rejected")
    return data


def _stream_member(
    fd: int, out: int, archive: str, name: str, offset: int, packed: int, size: int, method: int, crc: int
) -> None:
    inflater = zlib.decompressobj(-15) if method == zipfile.ZIP_DEFLATED else None
    produced = 0
    running = 0

    def emit(piece: bytes) -> None:
        nonlocal produced, running
        produced += len(piece)
        if produced > size:
            raise UnsafeArchiveError(f"{archive}: member {name!r} inflates past its declared {size} bytes; rejected")
        running = zlib.crc32(piece, running)
        _write_all(out, piece)

    position, end = offset, offset + packed
    while position < end:
        raw = os.pread(fd, min(_BIG, end - position), position)
        if not raw:
            raise _member_error(archive, name, "is truncated")
        position += len(raw)
        if inflater is None:
            emit(raw)
            continue
        # max_length bounds memory: a bomb never inflates more than one chunk at a time.
        emit(inflater.decompress(raw, _BIG))
        while inflater.unconsumed_tail:
            emit(inflater.decompress(inflater.unconsumed_tail, _BIG))
    if produced != size:
        raise _member_error(archive, name, f"is {produced} bytes, its header says {size}")
    if crc >= 0 and running != crc:
        raise _member_error(archive, name, "fails its CRC check")


def _stream_zipfile(zf: zipfile.ZipFile, info: zipfile.ZipInfo, out: int, archive: str, name: str) -> None:
    # bzip2 / lzma members are rare: zipfile reads them (and checks their CRC and size).
    try:
        with zf.open(info) as member:
            while block := member.read(_BIG):
                _write_all(out, block)
    except zipfile.BadZipFile as exc:
        raise _member_error(archive, name, f"is damaged ({exc})") from exc


def _encode_error(exc: BaseException) -> bytes:
    code = getattr(exc, "errno", None) or 0
    kind = type(exc).__name__
    message = str(exc).replace("\n", " ")
    return f"E\t{kind}\t{code}\t{message}\n".encode("utf-8", "replace")[:4000]


def _decode_error(line: str) -> BaseException:
    _, kind, code, message = [*line.split("\t", 3), "", "", ""][:4]
    if kind == "UnsafeArchiveError":
        return UnsafeArchiveError(message)
    if kind == "ChecksumError":
        return ChecksumError(message)
    if code and int(code):
        return OSError(int(code), message.split("] ", 1)[-1])
    return ColabkitIOError(f"extraction worker failed: {kind}: {message}")


def _set_parent_death_signal() -> None:
    # An extraction worker must not outlive a killed stage(): it would keep writing into a
    # staging folder that the next stage() is about to remove.
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _run_forked(
    task: Callable[[Sequence[Any]], int], chunks: list[Sequence[Any]], workers: int, done: Callable[[int], None]
) -> None:
    """Run ``task`` over ``chunks`` in ``workers`` forked processes that pull chunks from a pipe."""
    work_r, work_w = os.pipe()
    # All chunk numbers go in before forking; the caller caps them so the pipe buffer holds them all.
    os.write(work_w, b"".join(struct.pack("<I", index) for index in range(len(chunks))))
    os.close(work_w)
    result_r, result_w = os.pipe()
    pids: list[int] = []
    try:
        for _ in range(workers):
            with warnings.catch_warnings():
                # Python 3.12+ warns about forking a threaded process; the child only does
                # os.* calls and zlib, touching no lock another thread could hold.
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
            if pid == 0:  # pragma: no cover - runs in the child; covered through the parent's checks
                status = 0
                try:
                    os.close(result_r)
                    _set_parent_death_signal()
                    while len(raw := os.read(work_r, 4)) == 4:
                        count = task(chunks[struct.unpack("<I", raw)[0]])
                        os.write(result_w, f"D\t{count}\n".encode())
                except BaseException as exc:
                    status = 1
                    with contextlib.suppress(BaseException):
                        os.write(result_w, _encode_error(exc))
                finally:
                    os._exit(status)
            pids.append(pid)
    except BaseException:
        # fork() failed part-way: stop and reap the workers already started.
        _kill(pids)
        for pid in pids:
            os.waitpid(pid, 0)
        os.close(result_r)
        raise
    finally:
        os.close(work_r)
        os.close(result_w)
    error: BaseException | None = None
    try:
        with os.fdopen(result_r, "r", encoding="utf-8", errors="replace") as results:
            for line in results:
                if line.startswith("D\t"):
                    done(int(line[2:]))
                elif line.startswith("E\t") and error is None:
                    error = _decode_error(line.rstrip("\n"))
                    _kill(pids)
    except BaseException:
        _kill(pids)
        raise
    finally:
        statuses = [os.waitpid(pid, 0)[1] for pid in pids]
    if error is not None:
        raise error
    if any(statuses):
        raise ColabkitIOError(f"an extraction worker died unexpectedly (wait statuses {statuses}); try workers=1")


def _kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def _run_chunks(
    task: Callable[[Sequence[Any]], int], items: Sequence[Any], workers: int, done: Callable[[int], None]
) -> None:
    if not items:
        return
    if workers <= 1 or len(items) < 2 or not hasattr(os, "fork") or sys.platform == "darwin":
        step = max(256, len(items) // 64)
        for start in range(0, len(items), step):
            done(task(items[start : start + step]))
        return
    _run_forked(task, _folder_chunks(items, workers), workers, done)


def _folder_chunks(items: Sequence[Any], workers: int) -> list[Sequence[Any]]:
    """Split file jobs into chunks that each stay in one folder, ordered so that chunks
    handed out one after another are in different folders.

    Two processes creating files in one folder queue on that folder's lock (and on
    ext4 share its block group); in different folders they run side by side.
    """
    # Many small chunks balance the load; capped so every chunk number fits the pipe buffer at once.
    size = max(64, len(items) // min(4096, max(workers * 8, len(items) // 512)))
    by_folder: dict[str, list[Any]] = {}
    for item in items:
        by_folder.setdefault(item[0].rpartition("/")[0], []).append(item)
    per_folder = [[group[start : start + size] for start in range(0, len(group), size)] for group in by_folder.values()]
    chunks: list[Sequence[Any]] = []
    for round_ in range(max(len(c) for c in per_folder)):
        chunks.extend(c[round_] for c in per_folder if round_ < len(c))
    if len(chunks) > 4096:  # many tiny folders: fall back to plain ranges
        step = -(-len(items) // 4096)
        chunks = [items[start : start + step] for start in range(0, len(items), step)]
    return chunks


def _auto_workers(workers: int | Literal["auto"], files: int, total: int) -> int:
    if workers != "auto":
        return workers
    if files < 1000 and total < 64 * _MiB:
        return 1  # forking costs more than it saves on small archives
    return max(1, min(os.cpu_count() or 1, 8))


def _decompress_stream(src: str, fmt: Format, out_path: Path, limits: ArchiveLimits, progress: bool, what: str) -> int:
    """Decompress a .gz / .bz2 / .xz stream into ``out_path`` (a new file), enforcing the bomb limits."""
    opener: Any = {"tar.gz": gzip.open, "gz": gzip.open, "tar.bz2": bz2.open, "tar.xz": lzma.open}[fmt]
    packed = os.path.getsize(src)
    produced = 0
    fd = out_ops.open(os.fspath(out_path), 0o644)
    try:
        with (
            opener(src, "rb") as stream,
            display.bar(packed, desc=f"decompress {what}", unit="B", enabled=progress) as bar,
        ):
            raw: IO[bytes] = stream
            last = 0
            while block := raw.read(_BIG):
                produced += len(block)
                if produced > limits.max_total_size:
                    raise UnsafeArchiveError(
                        f"{src}: decompresses to more than {_io.human_bytes(limits.max_total_size)} "
                        "(ArchiveLimits.max_total_size); if you trust it, raise the limit"
                    )
                _check_ratio(src, "the compressed stream", produced, packed, limits)
                _write_all(fd, block)
                position = _compressed_position(stream)
                if position is not None:
                    bar.update(position - last)
                    last = position
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise
        raise ChecksumError(f"{src}: the compressed data is corrupt or truncated ({exc}); re-download it") from exc
    finally:
        os.close(fd)
    return produced


def _compressed_position(stream: Any) -> int | None:
    with contextlib.suppress(Exception):
        return int(stream.fileobj.tell()) if hasattr(stream, "fileobj") else int(stream._fp.tell())
    return None


def extract_archive(
    archive: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    fmt: Format | None = None,
    workers: int | Literal["auto"] = "auto",
    limits: ArchiveLimits | None = None,
    progress: bool = True,
    scratch: str | os.PathLike[str] | None = None,
) -> ExtractResult:
    """Validate every member of ``archive``, then extract it into the empty folder ``dest``.

    ``dest`` should be a fresh folder (``stage()`` passes a temporary sibling of the
    final location); on an error the caller discards it. Nothing is written anywhere
    before all members passed validation, and nothing is ever written outside ``dest``
    (``scratch`` receives the decompressed tar of a ``.tar.gz``/``.tar.bz2``/``.tar.xz``).

    Args:
        archive: A ``.zip``, ``.tar``, ``.tar.gz``/``.tgz``, ``.tar.bz2``, ``.tar.xz`` or single ``.gz`` file.
        dest: Existing, empty folder to extract into.
        fmt: The format, when the name does not tell it; detected from the name and content otherwise.
        workers: Worker processes; ``"auto"`` uses every core for big archives and one for small ones.
        limits: Archive-bomb limits (see :class:`ArchiveLimits`).
        progress: Show a progress bar.
        scratch: Folder for the temporary decompressed tar (default: ``dest``'s parent).

    Returns:
        Counts of what was written.

    Raises:
        UnsafeArchiveError: A member is hostile or a limit is exceeded.
        ChecksumError: Member data is corrupt (CRC mismatch, truncation).
        InsufficientSpaceError: The extracted size does not fit on the disk.

    Example:
        >>> extract_archive("mnist.zip", "/content/data/.mnist-tmp")  # doctest: +SKIP
    """
    path = os.fspath(archive)
    root = Path(dest)
    limits = limits or ArchiveLimits()
    if workers != "auto" and (not isinstance(workers, int) or workers < 1):
        raise ArgumentError(f"workers={workers!r} is not a worker count; pass a positive int or 'auto'")
    fmt = fmt or archive_format(path)
    if fmt is None:
        raise ArgumentError(
            f"{path} is not a zip, tar, tar.gz, tar.bz2, tar.xz or gz archive; pass extract=False to keep it as it is"
        )
    label = Path(path).name
    with os.scandir(root) as entries:
        if any(True for _ in entries):
            raise ArgumentError(f"extract_archive(dest={os.fspath(dest)!r}): the folder must be empty")
    try:
        return _extract_any(path, fmt, root, label, workers, limits, progress, scratch)
    except BaseException:
        # Some problems (a member that inflates past its declared size) show only while
        # writing: take back everything, so a rejected archive leaves dest as it was.
        for entry in os.listdir(root):
            remove_path(root / entry)
        raise


def remove_path(path: Path) -> None:
    """Delete a file, link or whole folder (never what a link points to); errors are ignored."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _extract_any(
    path: str,
    fmt: Format,
    root: Path,
    label: str,
    workers: int | Literal["auto"],
    limits: ArchiveLimits,
    progress: bool,
    scratch: str | os.PathLike[str] | None,
) -> ExtractResult:
    if fmt == "gz":
        out_name = Path(label[:-3] if label.lower().endswith(".gz") else label + ".out").name
        _io.ensure_free_space(root, _gzip_size_hint(path), what=f"the decompressed {out_name}")
        size = _decompress_stream(path, fmt, root / _clean_name(out_name, path), limits, progress, label)
        return ExtractResult(1, size, (out_name,))
    if fmt in ("tar.gz", "tar.bz2", "tar.xz"):
        scratch_dir = Path(scratch) if scratch is not None else root.parent
        plain = _io.temp_name(scratch_dir / (label + ".tar"))
        try:
            _io.ensure_free_space(scratch_dir, extracted_size(path, fmt), what=f"the decompressed {label}")
            _decompress_stream(path, fmt, plain, limits, progress, label)
            return _extract_plan(os.fspath(plain), "tar", root, workers, limits, progress, label)
        finally:
            with contextlib.suppress(OSError):
                plain.unlink()
    return _extract_plan(path, fmt, root, workers, limits, progress, label)


def extracted_size(path: str | os.PathLike[str], fmt: Format) -> int:
    """The size ``path`` will have once extracted, read from its headers without extracting.

    Exact for zip (the central directory) and for most ``.gz``/``.tar.gz`` (the gzip
    trailer); the archive's own size for plain tar (its members' sizes plus headers)
    and for ``.tar.bz2``/``.tar.xz`` (whose headers do not say; compressed data only
    grows). The members are not validated here: :func:`extract_archive` does that.
    """
    name = os.fspath(path)
    packed = os.path.getsize(name)
    if fmt == "zip":
        with contextlib.suppress(OSError, UnicodeDecodeError, struct.error, UnsafeArchiveError):
            found = _fast_central(name)
            entries = found[0] if found is not None else _zipfile_central(name)[0]
            return sum(entry[5] for entry in entries)
        return packed
    if fmt in ("gz", "tar.gz"):
        return max(_gzip_size_hint(name), packed)
    return packed


def _gzip_size_hint(path: str) -> int:
    # The gzip trailer holds the size modulo 4 GiB: a lower bound that is exact for most files.
    with contextlib.suppress(OSError), open(path, "rb") as handle:
        handle.seek(-4, os.SEEK_END)
        return int(struct.unpack("<I", handle.read(4))[0])
    return 0


def _extract_plan(
    path: str,
    fmt: Format,
    root: Path,
    workers: int | Literal["auto"],
    limits: ArchiveLimits,
    progress: bool,
    label: str,
) -> ExtractResult:
    plan = _scan(path, fmt, limits)
    _io.ensure_free_space(root, plan.total, what=f"the extracted {label} ({len(plan.files)} files)")
    base = os.fspath(root)
    dirs = set(plan.dirs)
    for name, *_ in plan.files:
        parent = name.rpartition("/")[0]
        while parent and parent not in dirs:
            dirs.add(parent)
            parent = parent.rpartition("/")[0]
    for name in sorted(dirs):
        os.mkdir(f"{base}/{name}")  # parents sort before children; the folder is fresh, so no clashes
    count = _auto_workers(workers, len(plan.files), plan.total)
    with display.bar(len(plan.files), desc=f"extract {label}", unit="file", enabled=progress) as bar:

        def task(jobs: Sequence[Any]) -> int:
            return _extract_chunk(path, base, jobs)

        _run_chunks(task, plan.files, count, bar.update)
    for name, target in plan.hardlinks:
        os.link(f"{base}/{target}", f"{base}/{name}")
    for name, target in plan.symlinks:
        os.symlink(target, f"{base}/{name}")
    return ExtractResult(len(plan.files) + len(plan.hardlinks), plan.total, plan.top_level)


# -- make_archive ---------------------------------------------------------------------------------


def make_archive(
    folder: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    compression: Literal["auto", "deflate", "store"] = "auto",
    progress: bool = True,
) -> Path:
    """Pack ``folder`` into one zip, ready to upload to Drive and :func:`stage` later.

    Drive copies one big file far faster than thousands of small ones. With
    ``compression="auto"`` files that are already compressed (jpg, png, mp4,
    npz, ...; see :data:`COMPRESSED_SUFFIXES`) are stored as they are, which is
    much faster and no bigger; everything else is deflated. The zip appears at
    ``out`` only once it is complete.

    Args:
        folder: The folder to pack; names inside the zip are relative to it and
            start with the folder's own name, so extraction yields one top-level folder.
        out: The zip file to write (``.zip`` is the convention).
        compression: ``"auto"``, ``"deflate"`` (everything) or ``"store"`` (nothing).
        progress: Show a progress bar.

    Returns:
        The path of the written zip.

    Raises:
        ArgumentError: ``folder`` is not a folder or ``compression`` is unknown.

    Example:
        >>> make_archive("/content/data/flowers", "/content/drive/MyDrive/flowers.zip")  # doctest: +SKIP
    """
    src = Path(folder)
    target = Path(out)
    if compression not in ("auto", "deflate", "store"):
        raise ArgumentError(f"compression={compression!r} is not one of 'auto', 'deflate', 'store'")
    if not src.is_dir():
        raise ArgumentError(f"make_archive(folder={os.fspath(folder)!r}): not a folder; pass the folder to pack")
    skip = {target.resolve()}
    entries: list[tuple[Path, str]] = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames.sort()
        here = Path(dirpath)
        rel = here.relative_to(src)
        prefix = "/".join((src.name, *rel.parts))
        if not filenames and not dirnames:
            entries.append((here, prefix + "/"))
        for fname in sorted(filenames):
            file = here / fname
            if _io.is_temp_name(fname) or file.resolve() in skip:
                continue
            entries.append((file, f"{prefix}/{fname}"))
            total += file.lstat().st_size
    target.parent.mkdir(parents=True, exist_ok=True)
    with (
        _io.atomic_open(target, "wb") as handle,
        zipfile.ZipFile(handle, "w", allowZip64=True) as zf,
        display.bar(total, desc=f"pack {src.name}", unit="B", enabled=progress) as bar,
    ):
        for file, arcname in entries:
            if arcname.endswith("/"):
                zf.writestr(zipfile.ZipInfo(arcname), b"")
                continue
            stored = compression == "store" or (compression == "auto" and file.suffix.lower() in COMPRESSED_SUFFIXES)
            method = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
            zf.write(file, arcname, compress_type=method, compresslevel=None if stored else 6)
            bar.update(file.stat().st_size)
    return target
