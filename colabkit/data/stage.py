"""``stage()``: bring a dataset onto fast local disk, verified, extracted and published atomically.

The pipeline reads top to bottom: resolve the source -> fetch it to local
disk -> verify its checksum -> extract (or copy) it into a temporary sibling
of the destination -> write the marker inside -> rename the folder into place.

The rename is the commit point. The marker (``.colabkit-stage.json``) records
the source's identity (path, size and mtime, or URL; the checksum and options
asked for), so a second call with an unchanged source reads one small file,
stats the source and returns: no tree walk. A kill at any instant leaves either
the previous dataset or nothing under the final name, never a half dataset
with a marker; leftovers carry a temporary name and are removed by the next call.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

from colabkit import _io, _notify, drive
from colabkit.data import sources as _sources
from colabkit.data.archive import ArchiveLimits, archive_format, extract_archive, extracted_size, remove_path
from colabkit.data.archive.formats import (
    CONTAINERS,
    describe_bytes,
    holds_members,
    kept_whole,
    named_like_archive,
    plain_name,
)
from colabkit.errors import ArgumentError, ChecksumError, ColabkitError, InsufficientSpaceError
from colabkit.runtime import runtime

if TYPE_CHECKING:
    from colabkit.data.images.array import ImageArray

__all__ = ["MARKER", "cli_stage", "stage"]

#: Name of the marker file inside every staged folder.
MARKER = ".colabkit-stage.json"
#: Folder under ``dest`` that keeps downloads and local copies while staging (resumable ones survive).
SCRATCH = ".colabkit-downloads"
_MARKER_VERSION = 1
_COPY_THREADS = 32
#: Head-room left free on the destination's disk (as colabkit._io.ensure_free_space keeps).
_SPACE_MARGIN = 64 * 1024 * 1024


@overload
def stage(
    source: str | os.PathLike[str],
    dest: str | os.PathLike[str] | None = None,
    *,
    name: str | None = None,
    sha256: str | None = None,
    md5: str | None = None,
    extract: bool | Literal["auto"] = "auto",
    overwrite: bool = False,
    retries: int = 3,
    workers: int | Literal["auto"] = "auto",
    progress: bool = True,
    limits: ArchiveLimits | None = None,
    keep_platform_files: bool = False,
    decode: None = None,
) -> Path: ...


@overload
def stage(
    source: str | os.PathLike[str],
    dest: str | os.PathLike[str] | None = None,
    *,
    name: str | None = None,
    sha256: str | None = None,
    md5: str | None = None,
    extract: bool | Literal["auto"] = "auto",
    overwrite: bool = False,
    retries: int = 3,
    workers: int | Literal["auto"] = "auto",
    progress: bool = True,
    limits: ArchiveLimits | None = None,
    keep_platform_files: bool = False,
    decode: int | tuple[int, int],
) -> ImageArray: ...


def stage(
    source: str | os.PathLike[str],
    dest: str | os.PathLike[str] | None = None,
    *,
    name: str | None = None,
    sha256: str | None = None,
    md5: str | None = None,
    extract: bool | Literal["auto"] = "auto",
    overwrite: bool = False,
    retries: int = 3,
    workers: int | Literal["auto"] = "auto",
    progress: bool = True,
    limits: ArchiveLimits | None = None,
    keep_platform_files: bool = False,
    decode: int | tuple[int, int] | None = None,
) -> Path | ImageArray:
    """Fetch a dataset to fast local disk, verify it, extract it safely, and return its folder.

    The zip-copy-unzip recipe for Colab: keep datasets on Drive as one archive,
    and stage them to the runtime's local disk before training. Re-running the
    cell is free: an unchanged source returns the staged folder at once.

    Args:
        source: A file or folder path (local or on the mounted Drive): an archive
            (``.zip``, ``.tar``, ``.tar.gz``/``.tgz``, ``.tar.bz2``, ``.tar.xz``, ``.tar.zst``,
            ``.7z``), a single ``.gz``, ``.bz2``, ``.xz`` or ``.zst`` file, any other file, or a folder. Or a
            Google Drive share link, file id or folder link (through gdown); an ``http(s)://`` URL
            (resumable); an ``s3://`` / ``gs://`` URL (through fsspec). The format comes from the
            file's bytes, not its name or the server's headers.
        dest: Folder that receives the dataset folder; default: the runtime's fast
            local data folder (``/content/data`` on Colab).
        name: Name of the dataset folder under ``dest``; default: the source's
            name without its archive suffix (a Drive id for share links).
        sha256: Expected SHA-256 hex digest of the source file; checked before extraction.
        md5: Expected MD5 hex digest of the source file.
        extract: ``"auto"`` extracts archives and compressed files and copies anything
            else (a file named like an archive that is none is an error; formats built on
            zip such as a PyTorch ``.pt``, a NumPy ``.npz`` or a ``.docx`` are copied whole);
            ``False`` keeps the file as it is; ``True`` requires an archive.
        overwrite: Restage even when the source is unchanged, and replace a folder
            that ``stage()`` did not create.
        retries: Extra attempts on Drive's transient errors (errno 5, 107) and network errors.
        workers: Parallel extraction processes / copy threads; ``"auto"`` picks by size.
        progress: Show progress bars.
        limits: Archive-bomb limits (:class:`colabkit.data.archive.ArchiveLimits`).
        keep_platform_files: Also extract what operating systems leave in archives
            (``__MACOSX/``, ``._name``, ``.DS_Store``, ``Thumbs.db``, ``desktop.ini``);
            skipped by default, and said how many. Never counted as a top-level folder.
        decode: ``(height, width)`` (or one number for a square): the staged folder is an
            image folder (``ImageFolder``'s layout); decode it once into one uint8 array
            and return that dataset instead of the folder (see
            :func:`colabkit.data.images.decode.decode_images`; set its ``transform``
            attribute, or call ``decode_images`` for more options).

    Returns:
        The local folder holding the data; when an archive holds a single top-level
        folder (platform litter aside), that folder. With ``decode``, an
        :class:`~colabkit.data.images.array.ImageArray` over the decoded images.

    Raises:
        ArgumentError: A bad argument, a missing source, or ``dest/name`` holds data
            ``stage()`` did not put there (pass ``overwrite=True``).
        ChecksumError: The source does not match ``sha256``/``md5`` (the copy is deleted).
        UnsafeArchiveError: The archive holds a hostile member or is a bomb; nothing is written.
        InsufficientSpaceError: Not enough free disk; nothing is published.
        DownloadError: A URL, Drive link or bucket object could not be fetched.
        ImageDecodeError: With ``decode``: images that could not be decoded, every one named.

    Example:
        >>> import colabkit
        >>> root = colabkit.stage("/content/drive/MyDrive/datasets/flowers.zip")  # doctest: +SKIP
        >>> dataset = torchvision.datasets.ImageFolder(root)  # doctest: +SKIP
        >>> train = colabkit.stage("/content/drive/MyDrive/datasets/flowers.zip", decode=(64, 64))  # doctest: +SKIP
    """
    if decode is not None:
        from colabkit.data.images.decode import decode_images

        folder = stage(
            source,
            dest,
            name=name,
            sha256=sha256,
            md5=md5,
            extract=extract,
            overwrite=overwrite,
            retries=retries,
            workers=workers,
            progress=progress,
            limits=limits,
            keep_platform_files=keep_platform_files,
        )
        return decode_images(folder, size=decode, overwrite=overwrite, workers=workers, progress=progress)
    _check_options(sha256, md5, extract, retries, workers)
    drive.recover_if_lost()  # a main-thread Drive touch: remount here if a background copy lost Drive
    src = _sources.resolve(source)
    base = Path(os.path.abspath(runtime().host_path(os.path.expanduser(dest)))) if dest is not None else _default_dest()
    folder_name = _check_name(name if name is not None else src.default_name(), name is not None)
    target = base / folder_name
    if isinstance(src, _sources.PathSource) and (src.path == target or src.path in target.parents):
        raise ArgumentError(
            f"stage(): the destination {target} lies inside the source folder {src.path}, so each run would copy "
            "the previous copy again; pass a dest= outside it"
        )
    identity = {
        "source": src.identity(),
        "sha256": sha256.lower() if sha256 else None,
        "md5": md5.lower() if md5 else None,
        "extract": extract,
    }
    if keep_platform_files:
        identity["keep_platform_files"] = True
    if not overwrite:
        found = _staged(target, identity)
        if found is not None:
            return found
    base.mkdir(parents=True, exist_ok=True)
    with _io.locked(base):
        if not overwrite:
            found = _staged(target, identity)  # another process may have finished it meanwhile
            if found is not None:
                return found
        if os.path.lexists(target) and not overwrite and _read_marker(target) is None:
            raise ArgumentError(
                f"stage(): {target} already exists and was not created by stage(); pass overwrite=True to replace "
                "it, or choose another name= or dest="
            )
        _remove_leftovers(base, folder_name)
        if _sources.is_remote_path(base):
            _notify.warn_once(
                f"stage-dest-drive:{base}",
                f"stage(): dest {base} is on Google Drive, which is slow for many small files; stage to local "
                "disk instead (leave dest=None for the runtime's data folder)",
            )
        try:
            options = _Options(extract, retries, workers, progress, limits or ArchiveLimits(), keep_platform_files)
            return _stage_fresh(src, target, identity, sha256, md5, options)
        except OSError as exc:
            if exc.errno == errno.ENOSPC and not isinstance(exc, InsufficientSpaceError):
                raise InsufficientSpaceError(
                    errno.ENOSPC,
                    f"the disk filled up while staging {src.description} into {target}; nothing was published. "
                    f"Free some space (df -h {base}) or pass a dest= on a larger disk",
                ) from exc
            raise


@dataclasses.dataclass(frozen=True)
class _Options:
    extract: bool | Literal["auto"]
    retries: int
    workers: int | Literal["auto"]
    progress: bool
    limits: ArchiveLimits
    keep_platform_files: bool


def _stage_fresh(
    src: _sources.Source, target: Path, identity: dict[str, Any], sha256: str | None, md5: str | None, options: _Options
) -> Path:
    extract, retries, workers, progress = options.extract, options.retries, options.workers, options.progress
    started = time.monotonic()
    scratch = target.parent / SCRATCH
    wanted = tuple(algorithm for algorithm, digest in (("sha256", sha256), ("md5", md5)) if digest)
    threads = workers if isinstance(workers, int) else _COPY_THREADS
    ctx = _sources.FetchContext(scratch, retries, progress, threads, wanted)
    _check_space(src, target.parent, extract)
    try:
        fetched = src.fetch(ctx)
    except BaseException:
        _tidy_scratch(scratch)
        raise
    staging = _io.temp_name(target)
    try:
        _verify(fetched, src, {"sha256": sha256, "md5": md5})
        staging.mkdir()
        result, files, size, skipped = _fill(fetched, src.description, staging, options, threads, scratch)
        marker = {
            "version": _MARKER_VERSION,
            "identity": identity,
            "result": result,
            "files": files,
            "bytes": size,
            "skipped_platform_files": skipped,
            "staged_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        _io.atomic_write_bytes(staging / MARKER, json.dumps(marker, indent=1).encode())
        _io.publish_folder(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if fetched.temporary:
            remove_path(fetched.path)
        _tidy_scratch(scratch)
    _notify.logger.info(
        "staged %s -> %s (%d files) in %.1fs", src.description, target, files, time.monotonic() - started
    )
    if skipped:
        note = (
            f"stage(): skipped {skipped} macOS/Windows metadata file{'s' if skipped != 1 else ''} in "
            f"{fetched.name} (__MACOSX/, ._*, .DS_Store, Thumbs.db, desktop.ini); pass keep_platform_files=True "
            "to keep them"
        )
        _notify.logger.info(note)
        if progress:
            _notify.say(note)
    return target / result if result != "." else target


def _check_space(src: _sources.Source, base: Path, extract: bool | Literal["auto"]) -> None:
    """Refuse before writing anything when ``base``'s disk cannot hold the copy and the extracted data.

    Only path sources are sized up front (a Drive archive's copy plus its extracted size,
    read from its headers); downloads are checked once their length is known, and every
    extraction checks again against the exact size of its members.
    """
    if not isinstance(src, _sources.PathSource) or src.path.is_dir():
        return
    size = _sources.with_retries(lambda: src.path.stat().st_size, 2)
    # The first bytes tell the format: one small read, retried as Drive's reads are.
    fmt = _sources.with_retries(lambda: archive_format(src.path), 2) if extract is not False else None
    copy = size if fmt is not None and _sources.is_remote_path(src.path) else 0
    # A compressed tar (or zip) is first decompressed next to the files it holds.
    compressed_tar = fmt is not None and holds_members(fmt) and fmt not in CONTAINERS
    if fmt is not None and not copy and not compressed_tar:
        return  # a local zip, tar or gz: extraction checks exactly this before it writes
    extracted = extracted_size(src.path, fmt) if fmt is not None else size
    extracted_peak = extracted * 2 if compressed_tar else extracted
    needed = copy + extracted_peak
    free = _io.free_space(base)
    if needed + _SPACE_MARGIN <= free:
        return
    pieces = [f"the local copy of the archive needs {_io.human_bytes(copy)} ({copy} bytes)"] if copy else []
    label = "the extracted data" if fmt is not None else "the copy"
    twice = " twice over (the decompressed tar and its files)" if extracted_peak != extracted else ""
    pieces.append(f"{label} needs {_io.human_bytes(extracted)} ({extracted} bytes){twice}")
    raise InsufficientSpaceError(
        errno.ENOSPC,
        f"not enough free disk to stage {src.path.name}: {' and '.join(pieces)}, {_io.human_bytes(needed)} in all, "
        f"but {base} has {_io.human_bytes(free)} ({free} bytes) free; nothing was written. Free some space "
        f"(df -h {base}) or pass a dest= on a larger disk",
    )


def _tidy_scratch(scratch: Path) -> None:
    """Remove the scratch folder's empty folders, and itself when empty: partial downloads stay for a resume."""
    with contextlib.suppress(OSError), os.scandir(scratch) as entries:
        for entry in list(entries):
            if entry.is_dir(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    os.rmdir(entry.path)
    with contextlib.suppress(OSError):
        scratch.rmdir()


def _fill(
    fetched: _sources.Fetched, source: str, staging: Path, options: _Options, threads: int, scratch: Path
) -> tuple[str, int, int, int]:
    """Put the data into ``staging``; returns (result folder relative to it, files, bytes, litter skipped).

    What a file is comes from its bytes alone: a tar that a server sent already decoded
    under a ``.tar.gz`` name stages as a tar, a ``.gz`` file that arrived decoded is
    just the file (under its name without ``.gz``).
    """
    extract, retries, progress = options.extract, options.retries, options.progress
    if fetched.is_dir:
        if fetched.temporary:
            # A download folder on the same disk: move its content instead of copying it.
            count = size = 0
            for entry in os.listdir(fetched.path):
                os.rename(fetched.path / entry, staging / entry)
            for dirpath, _, filenames in os.walk(staging):
                count += len(filenames)
                size += sum(os.lstat(os.path.join(dirpath, f)).st_size for f in filenames)
            return ".", count, size, 0
        count, size = _sources.copy_tree(fetched.path, staging, workers=threads, retries=retries, progress=progress)
        return ".", count, size, 0
    fmt = archive_format(fetched.path) if extract is not False else None
    if extract == "auto" and kept_whole(fetched.name):
        fmt = None  # a model.pt is a zip inside, and one file to whoever staged it
    if fmt is not None:
        if fmt not in CONTAINERS:
            scratch.mkdir(parents=True, exist_ok=True)  # for the decompressed archive inside the stream
        done = extract_archive(
            fetched.path,
            staging,
            fmt=fmt,
            workers=options.workers,
            limits=options.limits,
            progress=progress,
            scratch=scratch,
            keep_platform_files=options.keep_platform_files,
            name=fetched.name,
        )
        tops = done.top_level
        single = (
            len(tops) == 1
            and holds_members(fmt)
            and (staging / tops[0]).is_dir()
            and not (staging / tops[0]).is_symlink()
        )
        return (tops[0] if single else "."), done.files, done.bytes, done.skipped
    if extract is True or (extract == "auto" and named_like_archive(fetched.name)):
        with open(fetched.path, "rb") as handle:
            what = describe_bytes(handle.read(520))
        said = f"stage(extract=True): {source} is not"
        if extract == "auto":
            said = f"stage(): {source} is named like an archive ({fetched.name}) but is not"
        raise ArgumentError(
            f"{said} a zip, tar, tar.gz, tar.bz2, tar.xz, tar.zst, 7z, gz, bz2, xz or zst "
            f"file: {what}. Fix: check that the source is the file itself and fetch it again, or pass "
            "extract=False to keep it as it is"
        )
    # Not compressed whatever its name says: a .gz that arrived decoded is the file itself.
    out = staging / (plain_name(fetched.name) if extract == "auto" else fetched.name)
    size = fetched.path.stat().st_size
    if fetched.temporary:
        os.replace(fetched.path, out)
    else:
        _io.ensure_free_space(staging, size, what=f"the copy of {fetched.name}")
        _sources.copy_file(fetched.path, out, retries=retries)
    return ".", 1, size, 0


def _verify(fetched: _sources.Fetched, src: _sources.Source, expected: dict[str, str | None]) -> None:
    for algorithm, digest in expected.items():
        if not digest:
            continue
        if fetched.is_dir:
            raise ArgumentError(
                f"stage({algorithm}=...): {src.description} is a folder; checksums apply to single files (archives)"
            )
        actual = fetched.hashes.get(algorithm) or _hash(fetched.path, algorithm)
        if actual != digest.lower():
            if fetched.temporary:
                remove_path(fetched.path)
            done = "The copy was deleted" if fetched.temporary else "Nothing was staged"
            raise ChecksumError(
                f"{src.description}: {algorithm} is {actual}, expected {digest.lower()}; the download or copy is "
                f"corrupt or the source changed. {done}; check the {algorithm}= you passed and retry"
            )


def _hash(path: Path, algorithm: str) -> str:
    return _sources.with_retries(lambda: _io.hash_file(path, algorithm), 2)


def _read_marker(target: Path) -> dict[str, Any] | None:
    try:
        with open(target / MARKER, "rb") as handle:
            data = json.loads(handle.read())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("version") == _MARKER_VERSION else None


def _staged(target: Path, identity: dict[str, Any]) -> Path | None:
    """The staged result when ``target`` holds a complete copy of exactly this source."""
    marker = _read_marker(target)
    if marker is None or marker.get("identity") != json.loads(json.dumps(identity)):
        return None
    result = marker.get("result", ".")
    if not isinstance(result, str) or "/" in result or result == "..":
        return None
    found = target / result if result != "." else target
    return found if result == "." or found.is_dir() else None


def _remove_leftovers(base: Path, name: str) -> None:
    """Delete temporary folders of earlier, killed runs (the caller holds the lock)."""
    prefix = f".{name}{_io.TEMP_MARK}"
    with contextlib.suppress(OSError), os.scandir(base) as entries:
        for entry in entries:
            if entry.name.startswith(prefix):
                remove_path(Path(entry.path))
    scratch = base / SCRATCH
    with contextlib.suppress(OSError), os.scandir(scratch) as entries:
        for entry in entries:
            if _io.is_temp_name(entry.name) and not _io.temp_owner_alive(entry.name):
                remove_path(Path(entry.path))


def _default_dest() -> Path:
    return runtime().data_dir


def _check_name(name: str, given: bool) -> str:
    bad = (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or name.startswith(".")
        or any(c in name for c in "/\\\x00")
    )
    if bad:
        what = f"name={name!r}" if given else f"the folder name {name!r} derived from the source"
        raise ArgumentError(f"stage(): {what} is not a usable folder name; pass name='my_dataset' (no slashes)")
    return name


def _check_options(sha256: str | None, md5: str | None, extract: object, retries: object, workers: object) -> None:
    for label, digest, length in (("sha256", sha256, 64), ("md5", md5, 32)):
        if digest is not None and (
            not isinstance(digest, str)
            or len(digest) != length
            or any(c not in "0123456789abcdefABCDEF" for c in digest)
        ):
            raise ArgumentError(f"stage({label}={digest!r}): expected {length} hex digits (as printed by {label}sum)")
    if extract not in ("auto", True, False):
        raise ArgumentError(f"stage(extract={extract!r}): use 'auto', True or False")
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        raise ArgumentError(f"stage(retries={retries!r}): use 0 or a positive number of extra attempts")
    if workers != "auto" and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 1):
        raise ArgumentError(f"stage(workers={workers!r}): use 'auto' or a positive number")


def cli_stage(argv: Sequence[str]) -> int:
    """``colabkit stage SRC [DEST] [--sha256 HEX] [--md5 HEX] [--name N] [--overwrite] [--no-progress]``.

    Prints the staged folder on success; returns the process exit status.
    """
    parser = argparse.ArgumentParser(
        prog="colabkit stage",
        description="Fetch a dataset (path, Drive link, URL, s3:// URL) to fast local disk, verify and extract it.",
    )
    parser.add_argument("source", metavar="SRC", help="archive, file, folder, Drive link or id, http(s) or s3:// URL")
    parser.add_argument("dest", metavar="DEST", nargs="?", default=None, help="destination folder (default: data dir)")
    parser.add_argument("--name", default=None, help="dataset folder name under DEST")
    parser.add_argument("--sha256", default=None, help="expected SHA-256 of the source file")
    parser.add_argument("--md5", default=None, help="expected MD5 of the source file")
    parser.add_argument("--no-extract", action="store_true", help="copy archives as they are")
    parser.add_argument("--overwrite", action="store_true", help="restage even if unchanged")
    parser.add_argument("--workers", default="auto", help="parallel workers ('auto' or a number)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument(
        "--keep-platform-files", action="store_true", help="also extract __MACOSX/, ._*, .DS_Store, Thumbs.db"
    )
    args = parser.parse_args(list(argv))
    try:
        workers: int | Literal["auto"] = "auto" if args.workers == "auto" else int(args.workers)
    except ValueError:
        parser.error(f"--workers {args.workers!r}: use 'auto' or a number")
    try:
        path = stage(
            args.source,
            args.dest,
            name=args.name,
            sha256=args.sha256,
            md5=args.md5,
            extract=False if args.no_extract else "auto",
            overwrite=args.overwrite,
            workers=workers,
            progress=not args.no_progress,
            keep_platform_files=args.keep_platform_files,
        )
    except (ColabkitError, OSError) as exc:
        print(f"colabkit stage: error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0
