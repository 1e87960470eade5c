"""extract_archive: the conductor. Detect the format, peel compressed layers, scan, then write.

Each compressed layer (gzip, bzip2, xz, Zstandard) is decompressed into a
scratch file and the result handled as what its bytes are; an archive is then
scanned whole (:mod:`colabkit.data.archive.scan`) before its members are
written by the workers (:mod:`colabkit.data.archive.workers`), a system tool
(:mod:`colabkit.data.archive.tools`) or py7zr (:mod:`colabkit.data.archive.sevenzip`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import shutil
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from colabkit import _io, display
from colabkit.data.archive.formats import CONTAINERS, Format, archive_format, plain_name
from colabkit.data.archive.members import ArchiveLimits, clean_name
from colabkit.data.archive.scan import ExtractResult, Plan, scan
from colabkit.data.archive.sevenzip import extract_7z
from colabkit.data.archive.streams import COMPRESSIONS, decompress_stream, gzip_size_hint
from colabkit.data.archive.tools import extract_external
from colabkit.data.archive.workers import auto_workers, extract_chunk, run_chunks
from colabkit.data.zipdir import read_central
from colabkit.errors import ArgumentError, UnsafeArchiveError

__all__ = ["extract_archive", "extracted_size", "remove_path"]


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
    name: str | None = None,
) -> ExtractResult:
    """Validate every member of ``archive``, then extract it into the empty folder ``dest``.

    ``dest`` should be a fresh folder (``stage()`` passes a temporary sibling of the
    final location); on an error the caller discards it. Nothing is written anywhere
    before all members passed validation, and nothing is ever written outside ``dest``
    (``scratch`` receives the decompressed tar of a ``.tar.gz``/``.tar.bz2``/``.tar.xz``/``.tar.zst``).

    Args:
        archive: A zip, tar, tar.gz, tar.bz2, tar.xz, tar.zst or 7z archive, or a single
            gzip, bzip2, xz or Zstandard file, told by its bytes whatever its name.
        dest: Existing, empty folder to extract into.
        fmt: The format as :func:`colabkit.data.archive.archive_format` names it; detected
            from the content when None.
        workers: Worker processes; ``"auto"`` uses every core for big archives and one for small ones.
        limits: Archive-bomb limits (see :class:`ArchiveLimits`).
        progress: Show a progress bar.
        scratch: Folder for the temporary decompressed tar (default: ``dest``'s parent).
        keep_platform_files: Also write ``__MACOSX/``, ``._name``, ``.DS_Store``,
            ``Thumbs.db`` and ``desktop.ini`` members (see :func:`is_platform_file`).
        name: The archive's real name when ``archive`` is a download under a made-up one: a
            single compressed file becomes this name without ``.gz`` (``.bz2``, ``.xz``, ``.zst``).

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
            f"{path} is not a zip, tar, tar.gz, tar.bz2, tar.xz, tar.zst, 7z, gz, bz2, xz or zst file; pass "
            "extract=False to keep it as it is"
        )
    label = name or Path(path).name
    with os.scandir(root) as entries:
        if any(True for _ in entries):
            raise ArgumentError(f"extract_archive(dest={os.fspath(dest)!r}): the folder must be empty")
    options = _Options(workers, limits, progress, keep_platform_files, os.path.getsize(path))
    scratch_dir = Path(scratch) if scratch is not None else root.parent
    try:
        return _extract_any(path, fmt, root, label, options, scratch_dir)
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
    packed: int  # the archive's size as it arrived: every layer's ratio is measured against it


def remove_path(path: Path) -> None:
    """Delete a file, link or whole folder (never what a link points to); errors are ignored."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _extract_any(path: str, fmt: Format, root: Path, label: str, options: _Options, scratch: Path) -> ExtractResult:
    inner, _, outer = fmt.rpartition(".")
    if outer in COMPRESSIONS:
        limits, progress = options.limits, options.progress
        if not inner:  # one compressed file: it becomes the one file in root
            out_name = plain_name(label)
            hint = gzip_size_hint(path) if outer == "gz" else 0
            _io.ensure_free_space(root, hint, what=f"the decompressed {out_name}")
            out = root / clean_name(out_name, path)
            size = decompress_stream(path, outer, out, limits, progress, label, packed=options.packed)
            return ExtractResult(1, size, (out_name,))
        plain = _io.temp_name(scratch / f"{plain_name(label)}.{inner.rpartition('.')[2]}")
        try:
            _io.ensure_free_space(scratch, extracted_size(path, outer), what=f"the decompressed {label}")
            decompress_stream(path, outer, plain, limits, progress, label, packed=options.packed)
            return _extract_any(os.fspath(plain), inner, root, label, options, scratch)
        finally:
            with contextlib.suppress(OSError):
                plain.unlink()
    if fmt == "7z":
        return extract_7z(
            path,
            root,
            label,
            options.limits,
            progress=options.progress,
            keep_platform_files=options.keep_platform_files,
        )
    if fmt not in CONTAINERS:
        raise ArgumentError(f"extract_archive(fmt={fmt!r}): not a format; see colabkit.data.archive.archive_format")
    return _extract_plan(path, fmt, root, options, label)


def extracted_size(path: str | os.PathLike[str], fmt: Format) -> int:
    """The size ``path`` will have once extracted, read from its headers without extracting.

    Exact for zip (the central directory) and for most gzip files (the gzip trailer);
    the archive's own size for plain tar (its members' sizes plus headers) and for the
    other compressed formats (whose headers need not say; compressed data only grows).
    The members are not validated here: :func:`extract_archive` does that.
    """
    name = os.fspath(path)
    packed = os.path.getsize(name)
    if fmt == "zip":
        with contextlib.suppress(OSError, UnsafeArchiveError, struct.error):
            return sum(entry[5] for entry in read_central(name)[0])
        return packed
    if fmt.rpartition(".")[2] == "gz":
        return max(gzip_size_hint(name), packed)
    return packed


def _make_dirs(base: str, plan: Plan, jobs: Iterable[tuple[Any, ...]]) -> None:
    dirs = plan.dirs
    for job in jobs:
        parent = job[0].rpartition("/")[0]
        while parent and parent not in dirs:
            dirs.add(parent)
            parent = parent.rpartition("/")[0]
    for name in sorted(dirs):
        os.mkdir(f"{base}/{name}")  # parents sort before children; the folder is fresh, so no clashes


def _extract_plan(path: str, fmt: Format, root: Path, options: _Options, label: str) -> ExtractResult:
    plan = scan(path, fmt, options.limits, options.keep_platform_files)
    count_files = len(plan.files) + len(plan.external)
    _io.ensure_free_space(root, plan.total, what=f"the extracted {label} ({count_files} files)")
    base = os.fspath(root)
    _make_dirs(base, plan, itertools.chain(plan.files, plan.external.values()))
    count = auto_workers(options.workers, len(plan.files), plan.total)
    with display.bar(count_files, desc=f"extract {label}", unit="file", enabled=options.progress) as bar:

        def task(jobs: Sequence[Any]) -> int:
            return extract_chunk(path, base, jobs)

        run_chunks(task, plan.files, count, bar.update)
        if plan.external:
            extract_external(path, base, plan.external, plan.order, bar.update)
    for name, target in plan.hardlinks:
        os.link(f"{base}/{target}", f"{base}/{name}")
    for name, target in plan.symlinks:
        os.symlink(target, f"{base}/{name}")
    return ExtractResult(count_files + len(plan.hardlinks), plan.total, plan.top_level, plan.skipped)
