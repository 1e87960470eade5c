"""Format detection: what a file is, told by its bytes alone.

The name a file arrived under and the headers it came with are never asked. A
web server may send a ``.tar.gz`` with ``Content-Encoding: gzip`` (Apache's
``AddEncoding x-gzip .gz``), and a client that decodes it hands over a plain tar
under the ``.tar.gz`` name; another server gzips a ``.zip`` on the wire; a Drive
download arrives under a made-up name. Each stages as what its bytes are.

A format names its layers innermost first, the way file names chain suffixes:
``"zip"``, ``"tar"``, ``"7z"`` (archives); ``"tar.gz"``, ``"tar.bz2"``,
``"tar.xz"``, ``"tar.zst"`` (a tar inside a compressed stream), and likewise
``"zip.gz"`` or ``"tar.gz.gz"`` (a gzip on the wire over a ``.tar.gz``); and
``"gz"``, ``"bz2"``, ``"xz"``, ``"zst"`` for one compressed file that holds no archive.
"""

from __future__ import annotations

import contextlib
import os
import zipfile
from typing import IO

from colabkit.data.archive.streams import COMPRESSIONS, open_compressed, stream_errors
from colabkit.errors import MissingDependencyError

__all__ = [
    "CONTAINERS",
    "Format",
    "archive_format",
    "describe_bytes",
    "holds_members",
    "kept_whole",
    "named_like_archive",
    "plain_name",
    "sniff",
]

#: A format as :func:`archive_format` names it (see the module's docstring).
Format = str
#: The formats that hold members (files and folders), as opposed to compressed streams.
CONTAINERS = ("zip", "tar", "7z")
_HEAD = 520  # one tar header block, and then some
_MAX_LAYERS = 3  # compressed streams inside compressed streams looked through; deeper ones stay files
_MAGIC = (
    (b"\x1f\x8b\x08", "gz"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zst"),
    (b"7z\xbc\xaf\x27\x1c", "7z"),
    (b"PK\x03\x04", "zip"),
    (b"PK\x05\x06", "zip"),  # an empty zip: only its end record
)
_COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zstd")
_ARCHIVE_SUFFIXES = (
    ".zip",
    ".tar",
    ".7z",
    ".tgz",
    ".tbz",
    ".tbz2",
    ".txz",
    ".tzst",
    *(".tar" + suffix for suffix in _COMPRESSED_SUFFIXES),
)


def sniff(head: bytes) -> str | None:
    """The format of one layer of data that starts with ``head`` (its first 512 bytes or more), or None.

    One of :data:`CONTAINERS` or of the compressions (``"gz"``, ``"bz2"``, ``"xz"``, ``"zst"``).
    """
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if head[:3] == b"BZh" and head[3:4].isdigit() and head[3:4] != b"0":
        return "bz2"
    return "tar" if _is_tar_header(head) else None


def _is_tar_header(block: bytes) -> bool:
    # POSIX and GNU tar say "ustar" at offset 257; a V7 tar (no magic) is told by its header checksum.
    if len(block) < 512:
        return False
    if block[257:262] == b"ustar":
        return True
    field = block[148:156].replace(b"\x00", b" ").strip()
    if not block[0] or not field or any(digit not in b"01234567" for digit in field):
        return False
    # The checksum adds up the header's bytes with its own field counted as eight spaces;
    # old tars added them as signed chars.
    rest = block[:148] + block[156:512]
    unsigned = sum(rest) + 8 * 0x20
    signed = unsigned - 256 * sum(1 for byte in rest if byte > 127)
    return int(field, 8) in (unsigned, signed)


def archive_format(path: str | os.PathLike[str]) -> Format | None:
    """The format of the file ``path`` from its bytes (see this module's docstring), or None for other files.

    Compressed streams are looked through: a gzip stream that holds a tar is ``"tar.gz"``
    whatever the file is called, and a tar is ``"tar"`` even when named ``.tar.gz``.

    Args:
        path: The file to look at; a folder or a missing path is None.
    """
    try:
        with open(path, "rb") as handle:
            head = handle.read(_HEAD)
    except (IsADirectoryError, FileNotFoundError):
        return None
    kind = sniff(head)
    if kind is None:
        # A zip with data in front of it (a self-extractor) is found by its end record.
        return "zip" if _zip_by_end_record(path) else None
    layers: list[str] = []
    while kind in COMPRESSIONS and len(layers) < _MAX_LAYERS:
        layers.append(kind)
        kind = sniff(_peek(os.fspath(path), layers))
    inner = [kind] if kind in CONTAINERS else []
    return ".".join([*inner, *reversed(layers)])


def _peek(path: str, layers: list[str]) -> bytes:
    """The first bytes of ``path`` once its compressed ``layers`` are undone; what a broken stream gave."""
    got = b""
    broken: tuple[type[BaseException], ...] = (*stream_errors(), MissingDependencyError, ValueError)
    with contextlib.ExitStack() as stack:
        stream: IO[bytes] = stack.enter_context(open(path, "rb"))
        try:
            for kind in layers:
                stream = stack.enter_context(open_compressed(stream, kind))
            while len(got) < _HEAD and (block := stream.read(_HEAD - len(got))):
                got += block
        except broken:
            # Bad data says nothing about what is inside; decompressing it later raises the clear error.
            pass
    return got


def _zip_by_end_record(path: str | os.PathLike[str]) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False


def holds_members(fmt: Format) -> bool:
    """Whether ``fmt`` is an archive (files and folders), not one compressed file."""
    return fmt.partition(".")[0] in CONTAINERS


#: File formats that are zips inside but one file to their users: ``stage(extract="auto")``
#: copies them whole (a PyTorch checkpoint, a NumPy archive, a Keras model, documents, wheels).
KEPT_WHOLE_SUFFIXES = (".pt", ".pth", ".npz", ".keras", ".docx", ".xlsx", ".pptx", ".odt", ".ods", ".whl", ".epub")


def kept_whole(name: str) -> bool:
    """Whether a file called ``name`` is a format of its own built on zip, copied rather than extracted."""
    return name.lower().endswith(KEPT_WHOLE_SUFFIXES)


def named_like_archive(name: str) -> bool:
    """Whether ``name`` ends like an archive's (``.zip``, ``.tar``, ``.tar.gz``, ``.tgz``, ``.7z``...)."""
    return name.lower().endswith(_ARCHIVE_SUFFIXES)


def plain_name(name: str) -> str:
    """``name`` without its compression suffixes (``data.csv.gz`` -> ``data.csv``); unchanged when none is left."""
    stem = name
    while stem.lower().endswith(_COMPRESSED_SUFFIXES):
        stem = stem.rpartition(".")[0]
    return stem or name


def describe_bytes(head: bytes) -> str:
    """What the data that starts with ``head`` looks like, for an error message that says what arrived instead."""
    stripped = head.lstrip().lower()
    if not head:
        return "it is empty"
    if stripped.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return (
            "it is an HTML page (a sign-in, error or download-warning page served in place of the file), beginning "
            f"{_snippet(head)}"
        )
    if head.startswith(b"version https://git-lfs"):
        return "it is a Git LFS pointer, not the file itself (download the file through LFS or its media URL)"
    if head.startswith(b"Rar!\x1a\x07"):
        return "it is a RAR archive, which stage() does not read (re-pack it as zip or tar.gz)"
    if head.startswith(b"\x04\x22\x4d\x18"):
        return "it is an LZ4 stream, which stage() does not read (re-pack it with gzip or zstd)"
    text = head.decode("utf-8", "replace")  # a character cut at the end costs one replacement
    readable = sum(ch != "\ufffd" and (ch.isprintable() or ch.isspace()) for ch in text)
    if readable >= 0.95 * len(text):
        return f"it is text, beginning {_snippet(head)}"
    return f"its first bytes are {head[:16].hex(' ')}, which no format stage() reads starts with"


def _snippet(head: bytes) -> str:
    return repr(" ".join(head[:60].decode("utf-8", "replace").split()))
