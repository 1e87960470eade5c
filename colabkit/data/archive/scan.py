"""Scanning: read an archive's member list once, validate every member, and plan what extraction writes.

A zip's members come from its central directory (:mod:`colabkit.data.zipdir`),
a tar's from :mod:`tarfile`'s header walk. The :class:`Plan` holds every file's
offset and size, so the workers (:mod:`colabkit.data.archive.workers`) never
parse a header again; nothing is written while scanning.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import stat
import tarfile
import zipfile
from collections.abc import Iterable
from typing import Any

from colabkit.data.archive.formats import Format, archive_format
from colabkit.data.archive.members import (
    ArchiveLimits,
    Names,
    check_budget,
    check_link,
    check_ratio,
    clean_name,
    is_platform_file,
    maybe_litter,
)
from colabkit.data.archive.tools import check_local_headers, method_name, zip_tool
from colabkit.data.archive.workers import Job
from colabkit.data.zipdir import LOCAL_HEADER, read_central
from colabkit.errors import ArgumentError, UnsafeArchiveError

__all__ = ["ExtractResult", "Plan", "scan", "scan_archive"]

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
class Plan:
    """What extraction writes: every file, folder and link, validated, with the totals the limits need."""

    # File members to write (see colabkit.data.archive.workers.extract_chunk).
    files: list[Job] = dataclasses.field(default_factory=list)
    dirs: set[str] = dataclasses.field(default_factory=set)
    symlinks: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    hardlinks: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    # Zip members a system tool decompresses (see colabkit.data.archive.tools.extract_external); files holds them too.
    external: dict[int, Job] = dataclasses.field(default_factory=dict)
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


def _scan_zip(path: str, limits: ArchiveLimits, keep_platform_files: bool = False) -> Plan:
    entries, start_dir = read_central(path)
    plan = Plan(members=len(entries))
    check_budget(path, plan.members, plan.total, limits)
    names = Names(path)
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
        name = clean_name(filename, path)
        limit = following[offset]
        if offset + header + packed > limit:
            raise UnsafeArchiveError(
                f"{path}: member {filename!r} overlaps the next one; this is an overlapping-entry zip bomb or "
                "a corrupt archive, rejected"
            )
        if not keep_platform_files and maybe_litter(name) and is_platform_file(name):
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
            kinds[name] = "file"  # the usual case, as Names.add would decide it
        else:
            names.add(name, "file")
        if size > grace:
            check_ratio(path, f"member {filename!r}", size, packed, limits)
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
                        f"{path}: symbolic link {filename!r} is compressed with {method_name(method)}; "
                        "re-create the archive with deflate"
                    )
                info = by_offset[offset]
                target = zf.read(info).decode("utf-8", "replace") if info.file_size < 4096 else ""
                check_link(path, name, target, "symlink", names)
                plan.symlinks.append((name, target.replace("\\", "/")))
    check_budget(path, plan.members, plan.total, limits)
    check_ratio(path, "the archive", plan.total, packed_total, limits)
    if plan.external:
        zip_tool(path, plan.external)  # no tool: refuse now, before anything is written
        check_local_headers(path, plan.external.values())
    return plan


def _scan_tar(path: str, limits: ArchiveLimits, keep_platform_files: bool = False) -> Plan:
    plan = Plan()
    names = Names(path)
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
                    check_budget(path, plan.members, plan.total, limits)
                name = clean_name(info.name, path)
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
                        check_budget(path, plan.members, plan.total, limits)
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
        joined = check_link(path, name, target, kind, names)
        if kind == "hardlink":
            if names.kinds.get(joined) != "file":
                raise UnsafeArchiveError(
                    f"{path}: hard link {name!r} -> {target!r} does not point to a file in the archive; rejected"
                )
            plan.hardlinks.append((name, joined))
        else:
            plan.symlinks.append((name, target.replace("\\", "/")))
    check_budget(path, plan.members, plan.total, limits)
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
    plan = scan(os.fspath(path), archive_format(path), limits or ArchiveLimits(), keep_platform_files)
    return ExtractResult(len(plan.files) + len(plan.external), plan.total, plan.top_level, plan.skipped)


def scan(path: str, fmt: Format | None, limits: ArchiveLimits, keep_platform_files: bool) -> Plan:
    """Validate the zip or plain tar ``path`` and plan its extraction; raises for anything hostile."""
    if fmt == "zip":
        return _scan_zip(path, limits, keep_platform_files)
    if fmt == "tar":
        return _scan_tar(path, limits, keep_platform_files)
    raise ArgumentError(f"{path}: format {fmt!r} cannot be scanned directly; only zip and plain tar can")
