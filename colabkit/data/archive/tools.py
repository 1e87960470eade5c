"""External tools: zip members Python cannot inflate (Deflate64, PPMd...) go through ``unzip`` or ``7z``.

The tool writes the data of every member to a pipe, one after the other in
central-directory order, and nothing else: it never opens a path of ours.
colabkit splits the stream by the sizes the central directory declares, checks
each CRC and writes the files itself through :data:`colabkit._io.ops`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import subprocess
import tempfile
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import IO

from colabkit import _io
from colabkit.data.archive.workers import Job, member_error
from colabkit.data.zipdir import LOCAL_HEADER, LOCAL_SIG
from colabkit.errors import ChecksumError, MissingDependencyError, UnsafeArchiveError

__all__ = ["check_local_headers", "extract_external", "method_name", "zip_tool"]

#: Methods Info-ZIP's unzip reads beyond Python's (shrink, reduce, implode, Deflate64); 7z reads most others.
_UNZIP_METHODS = frozenset({1, 2, 3, 4, 5, 6, 9})
_METHOD_NAMES = {1: "Shrink", 6: "Implode", 9: "Deflate64", 10: "PKWARE DCL Implode", 18: "IBM TERSE", 19: "IBM LZ77"}
_METHOD_NAMES |= {93: "Zstandard", 94: "MP3", 95: "XZ", 96: "JPEG", 97: "WavPack", 98: "PPMd", 99: "AES encryption"}
_METHOD_NAMES |= {n: "Reduce" for n in (2, 3, 4, 5)}


def check_local_headers(path: str, jobs: Iterable[Job]) -> None:
    """The exact overlap check the extraction workers make, for members a system tool decompresses."""
    with open(path, "rb") as handle:
        fd = handle.fileno()
        for name, offset, packed, *_, limit in jobs:
            head = os.pread(fd, LOCAL_HEADER.size, offset)
            if len(head) < LOCAL_HEADER.size or head[:4] != LOCAL_SIG:
                raise member_error(path, name, "has a bad local header")
            name_len, extra_len = struct.unpack_from("<HH", head, 26)
            if offset + LOCAL_HEADER.size + name_len + extra_len + packed > limit:
                raise UnsafeArchiveError(
                    f"{path}: member {name!r} overlaps the next one; this is an overlapping-entry zip bomb, rejected"
                )


def method_name(method: int) -> str:
    """A zip compression method as people know it, with its number."""
    return f"{_METHOD_NAMES.get(method, 'compression method')} (method {method})"


def zip_tool(path: str, external: Mapping[int, Job]) -> list[str]:
    """The command that writes every member of the zip ``path`` to stdout, in central-directory order.

    Info-ZIP's ``unzip -p`` for the methods it knows (Deflate64 above all), else 7-Zip's
    ``7z x -so``. Raises naming the method and the package to install when neither is there.
    """
    methods = {job[4] for job in external.values()}
    archive = os.path.abspath(path)
    unzip, seven = shutil.which("unzip"), shutil.which("7z") or shutil.which("7za")
    if unzip and methods <= _UNZIP_METHODS:
        return [unzip, "-p", archive]
    if seven:
        return [seven, "x", "-so", "-tzip", "-bd", "-y", "-bso0", "-bsp0", archive]
    first = min(external.values(), key=lambda job: job[1])
    method = first[4]
    package = "unzip" if method in _UNZIP_METHODS else "p7zip-full"
    raise MissingDependencyError(
        f"{path}: member {first[0]!r} is compressed with {method_name(method)}, which Python cannot read and "
        f"no unzip or 7z program was found to read it. Install one: apt-get install -y {package} (in a notebook: "
        f"!apt-get install -y {package}), or re-create the archive with Deflate"
    )


def extract_external(
    path: str, base: str, external: Mapping[int, Job], order: Sequence[tuple[int, int]], tick: Callable[[int], None]
) -> None:
    """Write the members in ``external`` (by header offset) from a system tool's stream of every member.

    ``unzip -p`` (or ``7z x -so``) writes the data of all members, one after the other
    in central-directory order, and nothing else: the tool never opens a path of ours.
    The stream is split by ``order`` (every member's header offset and size, in
    central-directory order), each piece is checked against its CRC (a stream that
    does not line up fails there) and written through :data:`colabkit._io.ops`.
    """
    command = zip_tool(path, external)
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors)
        assert proc.stdout is not None
        stream = proc.stdout
        try:
            for offset, size in order:
                job = external.get(offset)
                if job is None:
                    _skip_bytes(stream, size, path, errors)
                    continue
                name, _, _, _, _, crc, mode, _ = job
                fd = _io.ops.create(f"{base}/{name}", mode)
                try:
                    running = 0
                    left = size
                    while left:
                        block = stream.read(min(left, _io.CHUNK))
                        if not block:
                            raise _tool_failed(path, name, "ends early", errors)
                        running = zlib.crc32(block, running)
                        _io.write_all(fd, block)
                        left -= len(block)
                finally:
                    os.close(fd)
                if running != crc:
                    raise member_error(path, name, f"fails its CRC check ({os.path.basename(command[0])} output)")
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
        block = stream.read(min(left, _io.CHUNK))
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
