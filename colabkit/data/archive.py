"""Safe, parallel archive extraction and :func:`make_archive`.

Extraction reads the whole member list first and refuses the archive before
a single byte is written when any member is hostile: absolute names, drive
letters, ``..``, links that leave the destination, chain through other links
or that other members would be written through, device files and FIFOs,
duplicate names (also after Unicode normalisation), and bombs (total size,
member count, compression ratio; see :class:`ArchiveLimits`). Zip member names
are decoded as ``unzip`` decodes them (:func:`colabkit.data.zipdir.decode_name`)
and backslashes are folder separators; the checks run on the decoded names.
Platform litter (``__MACOSX/``, ``._name``, ``.DS_Store``, ``Thumbs.db``,
``desktop.ini``) is skipped unless asked for, and never counts as a top-level
folder. Only then are files written, into an empty folder the
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

Zip members Python cannot inflate (Deflate64 from 7-Zip and Windows, PPMd...)
are decompressed by the system ``unzip`` or ``7z`` into a pipe, after the same
validation; colabkit splits the stream by the central directory's sizes,
checks every CRC and writes the files itself, so the tool never sees a path.
``.tar.zst`` needs the ``zstandard`` package (or Python 3.14), ``.7z`` the
``py7zr`` package.

Seams for tests: :data:`colabkit._io.ops` (how member files are created and written).
"""

from __future__ import annotations

import bz2
import contextlib
import dataclasses
import gzip
import itertools
import lzma
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any, Literal

from colabkit import _io, display
from colabkit.data.zipdir import LOCAL_HEADER, LOCAL_SIG, read_central
from colabkit.errors import (
    ArgumentError,
    ChecksumError,
    ColabkitIOError,
    MissingDependencyError,
    UnsafeArchiveError,
    missing_dependency,
)

__all__ = [
    "COMPRESSED_SUFFIXES",
    "ArchiveLimits",
    "ExtractResult",
    "archive_format",
    "extract_archive",
    "extracted_size",
    "is_platform_file",
    "make_archive",
    "scan_archive",
]

Format = Literal["zip", "tar", "tar.gz", "tar.bz2", "tar.xz", "tar.zst", "gz", "zst", "7z"]

#: File types already compressed: make_archive stores them as they are.
_PACKED = ".jpg .jpeg .png .gif .webp .avif .heic .jp2 .mp4 .mkv .webm .mov .avi .mp3 .m4a .aac .ogg .opus .flac"
_PACKED += " .zip .gz .tgz .bz2 .xz .zst .lz4 .7z .rar .npz .pt .pth .safetensors .parquet .tfrecord .pdf .docx .xlsx"
COMPRESSED_SUFFIXES = frozenset(_PACKED.split())

_MiB = 1024 * 1024
_BIG = 8 * _MiB  # members above this stream in chunks instead of going through memory whole
_HEAD_SLACK = LOCAL_HEADER.size + 1024  # local header + name + extra, read with the data in one go
#: Zip compression methods Python reads (zstd in zipfile from Python 3.14 on).
_ZIP_METHODS = frozenset(
    {
        zipfile.ZIP_STORED,
        zipfile.ZIP_DEFLATED,
        zipfile.ZIP_BZIP2,
        zipfile.ZIP_LZMA,
        getattr(zipfile, "ZIP_ZSTANDARD", 0),
    }
)
#: Methods Info-ZIP's unzip reads beyond those (shrink, reduce, implode, Deflate64); 7z reads most others.
_UNZIP_METHODS = frozenset({1, 2, 3, 4, 5, 6, 9})
_METHOD_NAMES = {1: "Shrink", 6: "Implode", 9: "Deflate64", 10: "PKWARE DCL Implode", 18: "IBM TERSE", 19: "IBM LZ77"}
_METHOD_NAMES |= {93: "Zstandard", 94: "MP3", 95: "XZ", 96: "JPEG", 97: "WavPack", 98: "PPMd", 99: "AES encryption"}
_METHOD_NAMES |= {n: "Reduce" for n in (2, 3, 4, 5)}
#: Files operating systems leave in archives that are not data (compared lower-case).
_LITTER_NAMES = frozenset({".ds_store", "thumbs.db", "ehthumbs.db", "desktop.ini"})
_LITTER_TAILS = (".ds_store", "thumbs.db", "desktop.ini")


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
        top_level: Names directly inside the destination, platform litter
            (``__MACOSX``, ``.DS_Store``...) left out even when kept.
        skipped: Platform-litter members not written (see :func:`is_platform_file`).
    """

    files: int
    bytes: int
    top_level: tuple[str, ...]
    skipped: int = 0


@dataclasses.dataclass
class _Plan:
    # A file job: (relative path, offset, compressed size, size, method, crc or -1, mode, limit);
    # see _extract_chunk.
    files: list[tuple[str, int, int, int, int, int, int, int]] = dataclasses.field(default_factory=list)
    dirs: set[str] = dataclasses.field(default_factory=set)
    symlinks: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    hardlinks: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    # Zip members a system tool decompresses (see _extract_external); files holds them too.
    external: dict[int, tuple[str, int, int, int, int, int, int, int]] = dataclasses.field(default_factory=dict)
    # Every zip member in central-directory order: (header offset, size), the order unzip -p writes them.
    order: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    total: int = 0
    members: int = 0
    skipped: int = 0

    @property
    def top_level(self) -> tuple[str, ...]:
        names = {name.partition("/")[0] for name in self.dirs}
        jobs: Iterable[tuple[Any, ...]] = itertools.chain(
            self.files, self.external.values(), self.symlinks, self.hardlinks
        )
        for job in jobs:
            name: str = job[0]
            slash = name.find("/")
            top = name if slash < 0 else name[:slash]
            if top not in names:
                names.add(top)
        return tuple(sorted(name for name in names if not is_platform_file(name)))


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
        ((".tar.zst", ".tzst", ".tar.zstd"), "tar.zst"),
        ((".tar",), "tar"),
        ((".zip",), "zip"),
        ((".7z",), "7z"),
        ((".gz",), "gz"),
        ((".zst",), "zst"),
    ):
        if lowered.endswith(suffixes):
            return fmt  # type: ignore[return-value]
    try:
        with open(path, "rb") as handle:
            head = handle.read(512 + 8)
    except (IsADirectoryError, FileNotFoundError):
        return None
    if head.startswith(LOCAL_SIG) or head.startswith(b"PK\x05\x06"):
        return "zip"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    if head.startswith(b"7z\xbc\xaf\x27\x1c"):
        return "7z"
    if head.startswith(_ZSTD_MAGIC):
        try:
            with _zstd_open(os.fspath(path)) as inner:
                block = inner.read(262)
        except (OSError, EOFError, MissingDependencyError, ValueError):
            return None
        return "tar.zst" if block[257:262] == b"ustar" else "zst"
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


_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _zstd_open(path: str, mode: str = "rb") -> IO[bytes]:
    """A reader of the Zstandard file ``path``: Python 3.14's compression.zstd, else the zstandard package."""
    try:
        from compression import zstd

        reader: IO[bytes] = zstd.open(path, "rb")
        return reader
    except ImportError:
        pass
    try:
        import zstandard
    except ImportError:
        raise missing_dependency("zstandard", "zstd", purpose=f"reading the Zstandard file {path}") from None
    raw = open(path, "rb")  # noqa: SIM115 - closed by the reader (closefd)
    try:
        stream: IO[bytes] = zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)
        return stream
    except BaseException:
        raw.close()
        raise


def is_platform_file(name: str) -> bool:
    """Whether the member ``name`` is litter an operating system leaves, not data.

    macOS Finder's ``__MACOSX/`` folder and AppleDouble ``._name`` companions,
    ``.DS_Store``, and Windows' ``Thumbs.db`` and ``desktop.ini``.
    """
    if not _maybe_litter(name):
        return False  # the usual case, decided without splitting the name
    base = name.rpartition("/")[2]
    if base.startswith("._") or base.lower() in _LITTER_NAMES:
        return True
    return "__MACOSX" in name.split("/")


def _maybe_litter(name: str) -> bool:
    # A cheap first look: most names hold none of these.
    return "._" in name or "__MACOSX" in name or name[-11:].lower().endswith(_LITTER_TAILS)


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
        # NFC form -> name, for names that are not plain ASCII (ASCII is its own NFC form).
        self.normal: dict[str, str] = {}

    def add(self, name: str, kind: str) -> None:
        kinds = self.kinds
        parent = name.rpartition("/")[0]
        if name.isascii():
            if self.normal and kind != "dir":
                self._same_after_normalising(name, name)
        else:
            self._same_after_normalising(name, unicodedata.normalize("NFC", name), kind)
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

    def _same_after_normalising(self, name: str, key: str, kind: str = "file") -> None:
        # 'é' can be one code point (NFC, Windows, Linux) or two (NFD, macOS): two such
        # members are one file on macOS and on most tools' idea of a name.
        other = self.normal.get(key)
        if other is None and key != name and kind != "dir" and self.kinds.get(key, "dir") != "dir":
            other = key
        if other is not None and other != name and (kind != "dir" or self.kinds.get(other) != "dir"):
            raise UnsafeArchiveError(
                f"{self.archive}: member names {other!r} and {name!r} are the same name once Unicode-normalised "
                "(NFC); one would replace the other on macOS and confuse tools, so the archive is rejected "
                "(rename one of them)"
            )
        if not name.isascii():
            self.normal.setdefault(key, name)


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


def _scan_zip(path: str, limits: ArchiveLimits, keep_platform_files: bool = False) -> _Plan:
    entries, start_dir = read_central(path)
    plan = _Plan(members=len(entries))
    _check_budget(path, plan, limits)
    names = _Names(path)
    packed_total = 0
    links: list[tuple[str, str, int, int]] = []
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
    kinds = names.kinds
    plan.order = [(entry[7], entry[5]) for entry in entries]
    header = LOCAL_HEADER.size
    grace = limits.ratio_grace
    for filename, flags, method, crc, packed, size, mode, offset in entries:
        name = _clean_name(filename, path)
        limit = following[offset]
        if offset + header + packed > limit:
            raise UnsafeArchiveError(
                f"{path}: member {filename!r} overlaps the next one; this is an overlapping-entry zip bomb or "
                "a corrupt archive, rejected"
            )
        if not keep_platform_files and _maybe_litter(name) and is_platform_file(name):
            plan.skipped += 1
            continue
        if flags & 0x1:
            raise UnsafeArchiveError(
                f"{path}: member {filename!r} is encrypted; decrypt the archive first (stage() does not take passwords)"
            )
        if filename.endswith(("/", "\\")):
            names.add(name, "dir")
            plan.dirs.add(name)
            continue
        ftype = mode & 0o170000
        if ftype == stat.S_IFLNK:
            names.add(name, "symlink")
            links.append((filename, name, method, offset))
            continue
        if ftype and ftype != stat.S_IFREG:
            raise UnsafeArchiveError(
                f"{path}: member {filename!r} is a device, FIFO or socket (mode {oct(mode)}); datasets hold "
                "only files and folders, so the archive is rejected"
            )
        parent = name.rpartition("/")[0]
        if not names.normal and name not in kinds and kinds.get(parent) == "dir" and name.isascii():
            kinds[name] = "file"  # the usual case, as _Names.add would decide it
        else:
            names.add(name, "file")
        if size > grace:
            _check_ratio(path, f"member {filename!r}", size, packed, limits)
        job = (name, offset, packed, size, method, crc, 0o755 if mode & 0o111 else 0o644, limit)
        if method in _ZIP_METHODS:
            files.append(job)
        else:
            plan.external[offset] = job
        plan.total += size
        packed_total += packed
    if links:
        with zipfile.ZipFile(path) as zf:
            by_offset = {info.header_offset: info for info in zf.infolist()}
            for filename, name, method, offset in links:
                if method not in _ZIP_METHODS:
                    raise UnsafeArchiveError(
                        f"{path}: symbolic link {filename!r} is compressed with {_method_name(method)}; "
                        "re-create the archive with deflate"
                    )
                info = by_offset[offset]
                target = zf.read(info).decode("utf-8", "replace") if info.file_size < 4096 else ""
                _check_link(path, name, target, "symlink", names)
                plan.symlinks.append((name, target.replace("\\", "/")))
    _check_budget(path, plan, limits)
    _check_ratio(path, "the archive", plan.total, packed_total, limits)
    if plan.external:
        _zip_tool(path, plan)  # no tool: refuse now, before anything is written
        _check_local_headers(path, plan.external.values())
    return plan


def _check_local_headers(path: str, jobs: Iterable[tuple[str, int, int, int, int, int, int, int]]) -> None:
    """The exact overlap check the extraction workers make, for members a system tool decompresses."""
    with open(path, "rb") as handle:
        fd = handle.fileno()
        for name, offset, packed, *_, limit in jobs:
            head = os.pread(fd, LOCAL_HEADER.size, offset)
            if len(head) < LOCAL_HEADER.size or head[:4] != LOCAL_SIG:
                raise _member_error(path, name, "has a bad local header")
            name_len, extra_len = struct.unpack_from("<HH", head, 26)
            if offset + LOCAL_HEADER.size + name_len + extra_len + packed > limit:
                raise UnsafeArchiveError(
                    f"{path}: member {name!r} overlaps the next one; this is an overlapping-entry zip bomb, rejected"
                )


def _method_name(method: int) -> str:
    return f"{_METHOD_NAMES.get(method, 'compression method')} (method {method})"


def _zip_tool(path: str, plan: _Plan) -> list[str]:
    """The command that writes every member of the zip ``path`` to stdout, in central-directory order.

    Info-ZIP's ``unzip -p`` for the methods it knows (Deflate64 above all), else 7-Zip's
    ``7z x -so``. Raises naming the method and the package to install when neither is there.
    """
    methods = {job[4] for job in plan.external.values()}
    archive = os.path.abspath(path)
    unzip, seven = shutil.which("unzip"), shutil.which("7z") or shutil.which("7za")
    if unzip and methods <= _UNZIP_METHODS:
        return [unzip, "-p", archive]
    if seven:
        return [seven, "x", "-so", "-tzip", "-bd", "-y", "-bso0", "-bsp0", archive]
    first = min(plan.external.values(), key=lambda job: job[1])
    method = first[4]
    package = "unzip" if method in _UNZIP_METHODS else "p7zip-full"
    raise MissingDependencyError(
        f"{path}: member {first[0]!r} is compressed with {_method_name(method)}, which Python cannot read and "
        f"no unzip or 7z program was found to read it. Install one: apt-get install -y {package} (in a notebook: "
        f"!apt-get install -y {package}), or re-create the archive with Deflate"
    )


def _scan_tar(path: str, limits: ArchiveLimits, keep_platform_files: bool = False) -> _Plan:
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
                if not keep_platform_files and is_platform_file(name):
                    plan.skipped += 1
                    continue
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


def scan_archive(
    path: str | os.PathLike[str], *, limits: ArchiveLimits | None = None, keep_platform_files: bool = False
) -> ExtractResult:
    """Validate every member of a zip or uncompressed tar without extracting anything.

    Args:
        path: The archive.
        limits: Bomb limits; the defaults of :class:`ArchiveLimits` when None.
        keep_platform_files: Count platform litter (see :func:`is_platform_file`) as data.

    Returns:
        What extraction would write.

    Raises:
        UnsafeArchiveError: A member is hostile or a limit is exceeded.
    """
    plan = _scan(os.fspath(path), archive_format(path), limits or ArchiveLimits(), keep_platform_files)
    return ExtractResult(len(plan.files) + len(plan.external), plan.total, plan.top_level, plan.skipped)


def _scan(path: str, fmt: Format | None, limits: ArchiveLimits, keep_platform_files: bool) -> _Plan:
    if fmt == "zip":
        return _scan_zip(path, limits, keep_platform_files)
    if fmt == "tar":
        return _scan_tar(path, limits, keep_platform_files)
    raise ArgumentError(f"{path}: format {fmt!r} cannot be scanned directly; only zip and plain tar can")


# -- extraction workers ---------------------------------------------------------------------------


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
                if len(head) < LOCAL_HEADER.size or head[:4] != LOCAL_SIG:
                    raise _member_error(archive, name, "has a bad local header")
                name_len, extra_len = struct.unpack_from("<HH", head, 26)
                start = offset + LOCAL_HEADER.size + name_len + extra_len
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
            out = _io.ops.create(f"{root}/{name}", mode)
            try:
                if small:
                    _io.write_all(out, data)
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
        _io.write_all(out, piece)

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
                _io.write_all(out, block)
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
    """Decompress a .gz / .bz2 / .xz / .zst stream into ``out_path`` (a new file), enforcing the bomb limits."""
    openers: dict[str, Any] = {"gz": gzip.open, "bz2": bz2.open, "xz": lzma.open, "zst": _zstd_open}
    opener = openers[fmt.rpartition(".")[2]]
    packed = os.path.getsize(src)
    produced = 0
    fd = _io.ops.create(os.fspath(out_path), 0o644)
    try:
        with (
            opener(src, "rb") as stream,
            display.bar(packed, desc=f"decompress {what}", unit="B", enabled=progress) as bar,
        ):
            last = 0

            def write(block: bytes) -> None:
                nonlocal produced, last
                produced += len(block)
                if produced > limits.max_total_size:
                    raise UnsafeArchiveError(
                        f"{src}: decompresses to more than {_io.human_bytes(limits.max_total_size)} "
                        "(ArchiveLimits.max_total_size); if you trust it, raise the limit"
                    )
                _check_ratio(src, "the compressed stream", produced, packed, limits)
                _io.write_all(fd, block)
                position = _compressed_position(stream)
                if position is not None:
                    bar.update(position - last)
                    last = position

            _io.copy_stream(stream.read, write, chunk_size=_BIG)
    except _stream_errors() as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise
        raise ChecksumError(f"{src}: the compressed data is corrupt or truncated ({exc}); re-download it") from exc
    finally:
        os.close(fd)
    return produced


def _stream_errors() -> tuple[type[BaseException], ...]:
    """What gzip, bz2, lzma, zlib and the zstd readers raise for bad data."""
    found: list[type[BaseException]] = [OSError, EOFError, lzma.LZMAError, zlib.error]
    for module in ("zstandard", "compression.zstd"):
        error = getattr(sys.modules.get(module), "ZstdError", None)
        if isinstance(error, type) and issubclass(error, BaseException):
            found.append(error)
    return tuple(found)


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
    keep_platform_files: bool = False,
) -> ExtractResult:
    """Validate every member of ``archive``, then extract it into the empty folder ``dest``.

    ``dest`` should be a fresh folder (``stage()`` passes a temporary sibling of the
    final location); on an error the caller discards it. Nothing is written anywhere
    before all members passed validation, and nothing is ever written outside ``dest``
    (``scratch`` receives the decompressed tar of a ``.tar.gz``/``.tar.bz2``/``.tar.xz``/``.tar.zst``).

    Args:
        archive: A ``.zip``, ``.tar``, ``.tar.gz``/``.tgz``, ``.tar.bz2``, ``.tar.xz``,
            ``.tar.zst`` or ``.7z`` archive, or a single ``.gz`` or ``.zst`` file.
        dest: Existing, empty folder to extract into.
        fmt: The format, when the name does not tell it; detected from the name and content otherwise.
        workers: Worker processes; ``"auto"`` uses every core for big archives and one for small ones.
        limits: Archive-bomb limits (see :class:`ArchiveLimits`).
        progress: Show a progress bar.
        scratch: Folder for the temporary decompressed tar (default: ``dest``'s parent).
        keep_platform_files: Also write ``__MACOSX/``, ``._name``, ``.DS_Store``,
            ``Thumbs.db`` and ``desktop.ini`` members (see :func:`is_platform_file`).

    Returns:
        Counts of what was written, and of the platform litter skipped.

    Raises:
        UnsafeArchiveError: A member is hostile or a limit is exceeded.
        ChecksumError: Member data is corrupt (CRC mismatch, truncation).
        InsufficientSpaceError: The extracted size does not fit on the disk.
        MissingDependencyError: The archive needs a package or program that is not installed.

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
            f"{path} is not a zip, tar, tar.gz, tar.bz2, tar.xz, tar.zst, 7z, gz or zst archive; pass extract=False "
            "to keep it as it is"
        )
    label = Path(path).name
    with os.scandir(root) as entries:
        if any(True for _ in entries):
            raise ArgumentError(f"extract_archive(dest={os.fspath(dest)!r}): the folder must be empty")
    options = _Options(workers, limits, progress, keep_platform_files)
    try:
        return _extract_any(path, fmt, root, label, options, scratch)
    except BaseException:
        # Some problems (a member that inflates past its declared size) show only while
        # writing: take back everything, so a rejected archive leaves dest as it was.
        for entry in os.listdir(root):
            remove_path(root / entry)
        raise


@dataclasses.dataclass(frozen=True)
class _Options:
    workers: int | Literal["auto"]
    limits: ArchiveLimits
    progress: bool
    keep_platform_files: bool


def remove_path(path: Path) -> None:
    """Delete a file, link or whole folder (never what a link points to); errors are ignored."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _extract_any(
    path: str, fmt: Format, root: Path, label: str, options: _Options, scratch: str | os.PathLike[str] | None
) -> ExtractResult:
    limits, progress = options.limits, options.progress
    if fmt in ("gz", "zst"):
        suffix = "." + fmt
        out_name = Path(label[: -len(suffix)] if label.lower().endswith(suffix) else label + ".out").name
        _io.ensure_free_space(root, _gzip_size_hint(path) if fmt == "gz" else 0, what=f"the decompressed {out_name}")
        size = _decompress_stream(path, fmt, root / _clean_name(out_name, path), limits, progress, label)
        return ExtractResult(1, size, (out_name,))
    if fmt == "7z":
        return _extract_7z(path, root, label, options)
    if fmt in ("tar.gz", "tar.bz2", "tar.xz", "tar.zst"):
        scratch_dir = Path(scratch) if scratch is not None else root.parent
        plain = _io.temp_name(scratch_dir / (label + ".tar"))
        try:
            _io.ensure_free_space(scratch_dir, extracted_size(path, fmt), what=f"the decompressed {label}")
            _decompress_stream(path, fmt, plain, limits, progress, label)
            return _extract_plan(os.fspath(plain), "tar", root, options, label)
        finally:
            with contextlib.suppress(OSError):
                plain.unlink()
    return _extract_plan(path, fmt, root, options, label)


def extracted_size(path: str | os.PathLike[str], fmt: Format) -> int:
    """The size ``path`` will have once extracted, read from its headers without extracting.

    Exact for zip (the central directory) and for most ``.gz``/``.tar.gz`` (the gzip
    trailer); the archive's own size for plain tar (its members' sizes plus headers)
    and for the other compressed formats (whose headers need not say; compressed data
    only grows). The members are not validated here: :func:`extract_archive` does that.
    """
    name = os.fspath(path)
    packed = os.path.getsize(name)
    if fmt == "zip":
        with contextlib.suppress(OSError, UnsafeArchiveError, struct.error):
            return sum(entry[5] for entry in read_central(name)[0])
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


def _make_dirs(base: str, plan: _Plan, jobs: Iterable[tuple[Any, ...]]) -> None:
    dirs = plan.dirs
    for job in jobs:
        parent = job[0].rpartition("/")[0]
        while parent and parent not in dirs:
            dirs.add(parent)
            parent = parent.rpartition("/")[0]
    for name in sorted(dirs):
        os.mkdir(f"{base}/{name}")  # parents sort before children; the folder is fresh, so no clashes


def _extract_plan(path: str, fmt: Format, root: Path, options: _Options, label: str) -> ExtractResult:
    plan = _scan(path, fmt, options.limits, options.keep_platform_files)
    count_files = len(plan.files) + len(plan.external)
    _io.ensure_free_space(root, plan.total, what=f"the extracted {label} ({count_files} files)")
    base = os.fspath(root)
    _make_dirs(base, plan, itertools.chain(plan.files, plan.external.values()))
    count = _auto_workers(options.workers, len(plan.files), plan.total)
    with display.bar(count_files, desc=f"extract {label}", unit="file", enabled=options.progress) as bar:

        def task(jobs: Sequence[Any]) -> int:
            return _extract_chunk(path, base, jobs)

        _run_chunks(task, plan.files, count, bar.update)
        if plan.external:
            _extract_external(path, base, plan, bar.update)
    for name, target in plan.hardlinks:
        os.link(f"{base}/{target}", f"{base}/{name}")
    for name, target in plan.symlinks:
        os.symlink(target, f"{base}/{name}")
    return ExtractResult(count_files + len(plan.hardlinks), plan.total, plan.top_level, plan.skipped)


def _extract_external(path: str, base: str, plan: _Plan, tick: Callable[[int], None]) -> None:
    """Write the members in ``plan.external`` from a system tool's stream of every member.

    ``unzip -p`` (or ``7z x -so``) writes the data of all members, one after the other
    in central-directory order, and nothing else: the tool never opens a path of ours.
    The stream is split by the sizes the central directory declares, each piece is
    checked against its CRC (a stream that does not line up fails there) and written
    through :data:`colabkit._io.ops`.
    """
    command = _zip_tool(path, plan)
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors)
        assert proc.stdout is not None
        stream = proc.stdout
        try:
            for offset, size in plan.order:
                job = plan.external.get(offset)
                if job is None:
                    _skip_bytes(stream, size, path, errors)
                    continue
                name, _, _, _, _, crc, mode, _ = job
                fd = _io.ops.create(f"{base}/{name}", mode)
                try:
                    running = 0
                    left = size
                    while left:
                        block = stream.read(min(left, _BIG))
                        if not block:
                            raise _tool_failed(path, name, "ends early", errors)
                        running = zlib.crc32(block, running)
                        _io.write_all(fd, block)
                        left -= len(block)
                finally:
                    os.close(fd)
                if running != crc:
                    raise _member_error(path, name, f"fails its CRC check ({os.path.basename(command[0])} output)")
                tick(1)
            if stream.read(1):
                raise _tool_failed(path, "", "wrote more data than the archive declares", errors)
            status = proc.wait()
            # unzip's 1 is a warning (data in front of the archive); every byte was checked above.
            if status not in (0, 1):
                raise _tool_failed(path, "", f"exited with status {status}", errors)
        except BaseException:
            with contextlib.suppress(OSError):
                proc.kill()
            proc.wait()
            raise
        finally:
            stream.close()


def _skip_bytes(stream: IO[bytes], size: int, path: str, errors: IO[bytes]) -> None:
    left = size
    while left:
        block = stream.read(min(left, _BIG))
        if not block:
            raise _tool_failed(path, "", "ends early", errors)
        left -= len(block)


def _tool_failed(path: str, name: str, problem: str, errors: IO[bytes]) -> ChecksumError:
    errors.seek(0)
    said = " ".join(errors.read()[-600:].decode("utf-8", "replace").split())
    where = f"member {name!r}: " if name else ""
    return ChecksumError(
        f"{path}: {where}the decompressing tool's output {problem}"
        + (f" (it said: {said})" if said else "")
        + "; the archive is corrupt or uses a method the tool cannot read"
    )


def _extract_7z(path: str, root: Path, label: str, options: _Options) -> ExtractResult:
    """Validate a .7z archive's member list, then let py7zr write the members that passed into ``root``."""
    try:
        import py7zr
    except ImportError:
        raise missing_dependency("py7zr", "7z", purpose=f"extracting the 7-Zip archive {label}") from None
    limits = options.limits
    try:
        archive = py7zr.SevenZipFile(path, "r")
    except Exception as exc:
        raise UnsafeArchiveError(f"{path}: not a readable 7z archive ({exc}); re-download or re-create it") from exc
    with archive:
        if archive.needs_password():
            raise UnsafeArchiveError(f"{path}: the 7z archive is encrypted; decrypt it first")
        plan = _Plan()
        names = _Names(path)
        wanted: list[str] = []
        packed_total = 0
        for info in archive.list():
            plan.members += 1
            name = _clean_name(info.filename, path)
            if not options.keep_platform_files and is_platform_file(name):
                plan.skipped += 1
                continue
            if info.is_directory:
                names.add(name, "dir")
                plan.dirs.add(name)
            elif info.is_file:
                names.add(name, "file")
                plan.files.append((name, 0, 0, info.uncompressed, 0, -1, 0o644, -1))
                plan.total += info.uncompressed
                packed_total += info.compressed or 0
            else:
                raise UnsafeArchiveError(
                    f"{path}: member {info.filename!r} is a link or special file; stage() extracts only files and "
                    "folders from 7z archives, so the archive is rejected"
                )
            wanted.append(info.filename)
        _check_budget(path, plan, limits)
        # 7z compresses files together (solid blocks): only the whole archive has a ratio.
        _check_ratio(path, "the archive", plan.total, max(packed_total, os.path.getsize(path)), limits)
        _io.ensure_free_space(root, plan.total, what=f"the extracted {label} ({len(plan.files)} files)")
        try:
            with display.bar(None, desc=f"extract {label}", unit="file", enabled=options.progress):
                archive.extract(path=root, targets=wanted)
        except Exception as exc:
            raise ChecksumError(f"{path}: the 7z archive is damaged ({exc}); re-download or re-create it") from exc
    return ExtractResult(len(plan.files), plan.total, plan.top_level, plan.skipped)


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
