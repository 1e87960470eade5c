"""Compressed streams: gzip, bzip2, xz and Zstandard, opened and decompressed under the bomb limits."""

from __future__ import annotations

import bz2
import contextlib
import gzip
import lzma
import os
import struct
import sys
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from colabkit import _io, display
from colabkit.data.archive.members import ArchiveLimits, check_ratio
from colabkit.errors import ChecksumError, UnsafeArchiveError, missing_dependency

__all__ = ["COMPRESSIONS", "decompress_stream", "gzip_size_hint", "open_compressed", "stream_errors"]

#: The compression layers colabkit peels, by their format name.
COMPRESSIONS = ("gz", "bz2", "xz", "zst")


def open_compressed(source: str | IO[bytes], kind: str) -> IO[bytes]:
    """A reader of the ``kind`` (one of :data:`COMPRESSIONS`) stream in the file ``source`` (a path or a reader)."""
    opener = _OPENERS.get(kind)
    if opener is None:
        raise ValueError(f"not a compression: {kind!r}")
    reader: IO[bytes] = opener(source, "rb")
    return reader


def _zstd_open(source: str | IO[bytes], mode: str = "rb") -> IO[bytes]:
    # Python 3.14's compression.zstd, else the zstandard package.
    try:
        from compression import zstd

        reader: IO[bytes] = zstd.open(source, "rb")
        return reader
    except ImportError:
        pass
    what = source if isinstance(source, str) else getattr(source, "name", "a stream")
    try:
        import zstandard
    except ImportError:
        raise missing_dependency("zstandard", "zstd", purpose=f"reading the Zstandard data in {what}") from None
    raw = open(source, "rb") if isinstance(source, str) else source  # noqa: SIM115 - closed by the reader
    try:
        stream: IO[bytes] = zstandard.ZstdDecompressor().stream_reader(raw, closefd=isinstance(source, str))
        return stream
    except BaseException:
        if isinstance(source, str):
            raw.close()
        raise


_OPENERS: dict[str, Callable[..., Any]] = {"gz": gzip.open, "bz2": bz2.open, "xz": lzma.open, "zst": _zstd_open}


def decompress_stream(
    src: str, kind: str, out_path: Path, limits: ArchiveLimits, progress: bool, what: str, *, packed: int
) -> int:
    """Decompress the ``kind`` stream ``src`` into ``out_path`` (a new file), enforcing the bomb limits.

    ``packed`` is the size the ratio is measured against: the archive as it arrived, so
    layers inside layers (a gzip on the wire over a ``.tar.gz``) never multiply the ratio.
    """
    size = os.path.getsize(src)
    produced = 0
    fd = _io.ops.create(os.fspath(out_path), 0o644)
    try:
        with (
            open_compressed(src, kind) as stream,
            display.bar(size, desc=f"decompress {what}", unit="B", enabled=progress) as bar,
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
                check_ratio(src, "the compressed stream", produced, packed, limits)
                _io.write_all(fd, block)
                position = _compressed_position(stream)
                if position is not None:
                    bar.update(position - last)
                    last = position

            _io.copy_stream(stream.read, write, chunk_size=_io.CHUNK)
    except stream_errors() as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise
        raise ChecksumError(f"{src}: the compressed data is corrupt or truncated ({exc}); re-download it") from exc
    finally:
        os.close(fd)
    return produced


def stream_errors() -> tuple[type[BaseException], ...]:
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


def gzip_size_hint(path: str) -> int:
    """The size the gzip file ``path`` declares in its trailer (modulo 4 GiB: a lower bound, exact for most files)."""
    with contextlib.suppress(OSError), open(path, "rb") as handle:
        handle.seek(-4, os.SEEK_END)
        return int(struct.unpack("<I", handle.read(4))[0])
    return 0
