"""Safe, parallel archive extraction and :func:`make_archive`, one module per job.

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

The format is told by the bytes, never by the name (:mod:`.formats`): a tar that
arrived already decoded under a ``.tar.gz`` name is a tar, a zip gzipped on the
wire is a zip inside gzip.

Modules: :mod:`.formats` (format detection), :mod:`.streams` (compressed
streams), :mod:`.members` (member validation and limits), :mod:`.scan` (member
lists into a plan), :mod:`.workers` (forked extraction), :mod:`.tools` (``unzip`` /
``7z`` for methods Python lacks), :mod:`.sevenzip` (``.7z`` through py7zr),
:mod:`.extract` (:func:`extract_archive`, the conductor), :mod:`.make` (:func:`make_archive`).

Seams for tests: :data:`colabkit._io.ops` (how member files are created and written).
"""

from __future__ import annotations

from colabkit.data.archive.extract import extract_archive, extracted_size, remove_path
from colabkit.data.archive.formats import Format, archive_format
from colabkit.data.archive.make import COMPRESSED_SUFFIXES, make_archive
from colabkit.data.archive.members import ArchiveLimits, is_platform_file
from colabkit.data.archive.scan import ExtractResult, scan_archive

__all__ = [
    "COMPRESSED_SUFFIXES",
    "ArchiveLimits",
    "ExtractResult",
    "Format",
    "archive_format",
    "extract_archive",
    "extracted_size",
    "is_platform_file",
    "make_archive",
    "remove_path",
    "scan_archive",
]
