"""make_archive: pack a folder into one zip for Drive, storing what is already compressed as it is."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Literal

from colabkit import _io, display
from colabkit.errors import ArgumentError

__all__ = ["COMPRESSED_SUFFIXES", "make_archive"]

#: File types already compressed: make_archive stores them as they are.
_PACKED = ".jpg .jpeg .png .gif .webp .avif .heic .jp2 .mp4 .mkv .webm .mov .avi .mp3 .m4a .aac .ogg .opus .flac"
_PACKED += " .zip .gz .tgz .bz2 .xz .zst .lz4 .7z .rar .npz .pt .pth .safetensors .parquet .tfrecord .pdf .docx .xlsx"
COMPRESSED_SUFFIXES = frozenset(_PACKED.split())


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
