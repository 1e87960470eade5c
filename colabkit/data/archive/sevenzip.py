"""7-Zip archives: the member list validated as every archive's is, then py7zr writes the members that passed."""

from __future__ import annotations

import os
from pathlib import Path

from colabkit import _io, display
from colabkit.data.archive.members import ArchiveLimits, Names, check_budget, check_ratio, clean_name, is_platform_file
from colabkit.data.archive.scan import ExtractResult, Plan
from colabkit.errors import ChecksumError, UnsafeArchiveError, missing_dependency

__all__ = ["extract_7z"]


def extract_7z(
    path: str, root: Path, label: str, limits: ArchiveLimits, *, progress: bool, keep_platform_files: bool
) -> ExtractResult:
    """Validate a .7z archive's member list, then let py7zr write the members that passed into ``root``."""
    try:
        import py7zr
    except ImportError:
        raise missing_dependency("py7zr", "7z", purpose=f"extracting the 7-Zip archive {label}") from None
    try:
        archive = py7zr.SevenZipFile(path, "r")
    except Exception as exc:
        raise UnsafeArchiveError(f"{path}: not a readable 7z archive ({exc}); re-download or re-create it") from exc
    with archive:
        if archive.needs_password():
            raise UnsafeArchiveError(f"{path}: the 7z archive is encrypted; decrypt it first")
        plan = Plan()
        names = Names(path)
        wanted: list[str] = []
        packed_total = 0
        for info in archive.list():
            plan.members += 1
            name = clean_name(info.filename, path)
            if not keep_platform_files and is_platform_file(name):
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
        check_budget(path, plan.members, plan.total, limits)
        # 7z compresses files together (solid blocks): only the whole archive has a ratio.
        check_ratio(path, "the archive", plan.total, max(packed_total, os.path.getsize(path)), limits)
        _io.ensure_free_space(root, plan.total, what=f"the extracted {label} ({len(plan.files)} files)")
        try:
            with display.bar(None, desc=f"extract {label}", unit="file", enabled=progress):
                archive.extract(path=root, targets=wanted)
        except Exception as exc:
            raise ChecksumError(f"{path}: the 7z archive is damaged ({exc}); re-download or re-create it") from exc
    return ExtractResult(len(plan.files), plan.total, plan.top_level, plan.skipped)
