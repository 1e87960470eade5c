"""Forked extraction: worker processes that read members with ``pread``, inflate, check and write them.

Members are located once from the headers (see :mod:`colabkit.data.archive.scan`);
each worker has its own file descriptor on the archive and pulls chunks of jobs
from a pipe. Chunks stay in one folder each, so workers rarely queue on one
folder's lock. Nothing is fsynced per file: publishing the folder is the commit point.
"""

from __future__ import annotations

import contextlib
import os
import signal
import struct
import sys
import warnings
import zipfile
import zlib
from collections.abc import Callable, Sequence
from typing import Any, Literal

from colabkit import _io
from colabkit.data.zipdir import LOCAL_HEADER, LOCAL_SIG
from colabkit.errors import ChecksumError, ColabkitIOError, UnsafeArchiveError

__all__ = ["BIG", "Job", "auto_workers", "extract_chunk", "member_error", "run_chunks", "run_forked"]

#: A file member to write: (relative path, offset, compressed size, size, method, crc or -1, mode, limit);
#: see :func:`extract_chunk`.
Job = tuple[str, int, int, int, int, int, int, int]

_MiB = 1024 * 1024
BIG = 8 * _MiB  # members above this stream in chunks instead of going through memory whole
_HEAD_SLACK = LOCAL_HEADER.size + 1024  # local header + name + extra, read with the data in one go


def member_error(archive: str, name: str, problem: str) -> ChecksumError:
    """The error for a member whose data is corrupt."""
    return ChecksumError(f"{archive}: member {name!r} {problem}; the archive is corrupt, re-download or re-create it")


def extract_chunk(archive: str, root: str, jobs: Sequence[Job]) -> int:
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
            small = size <= BIG and packed <= BIG and method in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
            raw: bytes | memoryview = b""
            data: bytes | memoryview = b""
            start = offset
            if limit >= 0:
                # One read brings the local header and (for small members) the data after it.
                head = os.pread(fd, _HEAD_SLACK + (packed if small else 0), offset)
                if len(head) < LOCAL_HEADER.size or head[:4] != LOCAL_SIG:
                    raise member_error(archive, name, "has a bad local header")
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
                    raise member_error(archive, name, f"is {len(data)} bytes, its header says {size}")
                if crc >= 0 and zlib.crc32(data) != crc:
                    raise member_error(archive, name, "fails its CRC check")
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
        raw = os.pread(fd, min(BIG, end - position), position)
        if not raw:
            raise member_error(archive, name, "is truncated")
        position += len(raw)
        if inflater is None:
            emit(raw)
            continue
        # max_length bounds memory: a bomb never inflates more than one chunk at a time.
        emit(inflater.decompress(raw, BIG))
        while inflater.unconsumed_tail:
            emit(inflater.decompress(inflater.unconsumed_tail, BIG))
    if produced != size:
        raise member_error(archive, name, f"is {produced} bytes, its header says {size}")
    if crc >= 0 and running != crc:
        raise member_error(archive, name, "fails its CRC check")


def _stream_zipfile(zf: zipfile.ZipFile, info: zipfile.ZipInfo, out: int, archive: str, name: str) -> None:
    # bzip2 / lzma members are rare: zipfile reads them (and checks their CRC and size).
    try:
        with zf.open(info) as member:
            while block := member.read(BIG):
                _io.write_all(out, block)
    except zipfile.BadZipFile as exc:
        raise member_error(archive, name, f"is damaged ({exc})") from exc


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


def run_forked(
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
                    _io.die_with_parent()  # never outlive a killed stage(): it removes this folder next
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


def run_chunks(
    task: Callable[[Sequence[Any]], int], items: Sequence[Any], workers: int, done: Callable[[int], None]
) -> None:
    """Run ``task`` over ``items`` in chunks: in ``workers`` forked processes, or in this one."""
    if not items:
        return
    if workers <= 1 or len(items) < 2 or not hasattr(os, "fork") or sys.platform == "darwin":
        step = max(256, len(items) // 64)
        for start in range(0, len(items), step):
            done(task(items[start : start + step]))
        return
    run_forked(task, _folder_chunks(items, workers), workers, done)


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


def auto_workers(workers: int | Literal["auto"], files: int, total: int) -> int:
    """The worker count for ``files`` members of ``total`` bytes: ``workers`` itself unless it is ``"auto"``."""
    if workers != "auto":
        return workers
    if files < 1000 and total < 64 * _MiB:
        return 1  # forking costs more than it saves on small archives
    return max(1, min(os.cpu_count() or 1, 8))
