"""Member validation: names that stay inside the destination, links that cannot leave it, and the bomb limits.

Every check runs on the whole member list before a single byte is written; see
:mod:`colabkit.data.archive` for the list of what is refused.
"""

from __future__ import annotations

import dataclasses
import unicodedata

from colabkit import _io
from colabkit.errors import UnsafeArchiveError

__all__ = [
    "ArchiveLimits",
    "Names",
    "check_budget",
    "check_link",
    "check_ratio",
    "clean_name",
    "is_platform_file",
    "maybe_litter",
]

_MiB = 1024 * 1024
#: Files operating systems leave in archives that are not data (compared lower-case).
_LITTER_NAMES = frozenset({".ds_store", "thumbs.db", "ehthumbs.db", "desktop.ini"})
_LITTER_TAILS = (".ds_store", "thumbs.db", "desktop.ini")


@dataclasses.dataclass(frozen=True)
class ArchiveLimits:
    """Limits that reject archive bombs; raise them for unusual but trusted archives.

    Attributes:
        max_members: Most members (files, folders, links) an archive may hold.
        max_total_size: Most bytes all members may add up to once extracted.
        max_ratio: Highest uncompressed / compressed ratio of one member (and of
            the whole archive); ordinary data compresses 1-10x, bombs 1000x.
        ratio_grace: Members (and archives) smaller than this once extracted are
            exempt from the ratio check: tiny files of zeros are harmless.

    Example:
        >>> stage("masks.zip", limits=ArchiveLimits(max_ratio=5000))  # doctest: +SKIP
    """

    max_members: int = 10_000_000
    max_total_size: int = 1024**4
    max_ratio: float = 250.0
    ratio_grace: int = 4 * _MiB


def is_platform_file(name: str) -> bool:
    """Whether the member ``name`` is litter an operating system leaves, not data.

    macOS Finder's ``__MACOSX/`` folder and AppleDouble ``._name`` companions,
    ``.DS_Store``, and Windows' ``Thumbs.db`` and ``desktop.ini``.
    """
    if not maybe_litter(name):
        return False  # the usual case, decided without splitting the name
    base = name.rpartition("/")[2]
    if base.startswith("._") or base.lower() in _LITTER_NAMES:
        return True
    return "__MACOSX" in name.split("/")


def maybe_litter(name: str) -> bool:
    """A cheap first look before :func:`is_platform_file`: most names hold none of its patterns."""
    return "._" in name or "__MACOSX" in name or name[-11:].lower().endswith(_LITTER_TAILS)


def clean_name(raw: str, archive: str) -> str:
    """Normalise a member name, or raise for a name that could leave the destination."""
    if (
        # The common, plainly safe name: skip the general path (20,000 members add up).
        raw
        and raw[0] not in "/."
        and raw[1:2] != ":"
        and ".." not in raw
        and "\\" not in raw
        and "//" not in raw
        and "/." not in raw
        and "\x00" not in raw
    ):
        return raw[:-1] if raw.endswith("/") else raw
    name = raw.replace("\\", "/")
    if "\x00" in name:
        raise UnsafeArchiveError(f"{archive}: member {raw!r} has a NUL byte in its name; the archive is corrupt")
    if name.startswith("/"):
        raise UnsafeArchiveError(
            f"{archive}: member {raw!r} has an absolute path; refusing to extract an archive that writes outside "
            "its destination (re-create it with relative names)"
        )
    if len(name) >= 2 and name[1] == ":" and name[0].isalpha():
        raise UnsafeArchiveError(
            f"{archive}: member {raw!r} starts with a drive letter; refusing to extract it (re-create the archive "
            "with relative names)"
        )
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(
            f"{archive}: member {raw!r} contains '..' and would be written outside the destination; "
            "refusing to extract it"
        )
    if not parts:
        raise UnsafeArchiveError(f"{archive}: member {raw!r} has an empty name; the archive is malformed")
    return "/".join(parts)


class Names:
    """Tracks member names to catch duplicates, file/folder clashes and paths through links."""

    def __init__(self, archive: str) -> None:
        self.archive = archive
        self.kinds: dict[str, str] = {}
        # NFC form -> name, for names that are not plain ASCII (ASCII is its own NFC form).
        self.normal: dict[str, str] = {}

    def add(self, name: str, kind: str) -> None:
        kinds = self.kinds
        parent = name.rpartition("/")[0]
        if name.isascii():
            if self.normal and kind != "dir":
                self._same_after_normalising(name, name)
        else:
            self._same_after_normalising(name, unicodedata.normalize("NFC", name), kind)
        if kind != "dir" and name not in kinds and (not parent or kinds.get(parent) == "dir"):
            kinds[name] = kind  # the usual case: a new file in a folder already seen
            return
        parts = name.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            seen = self.kinds.get(parent)
            if seen is None:
                self.kinds[parent] = "dir"
            elif seen != "dir":
                raise UnsafeArchiveError(
                    f"{self.archive}: member {name!r} lies under {parent!r}, which is a {seen} in the same archive; "
                    "refusing to write through it"
                )
        seen = self.kinds.get(name)
        if seen is not None and not (seen == "dir" and kind == "dir"):
            raise UnsafeArchiveError(
                f"{self.archive}: member name {name!r} appears twice (as {seen} and as {kind}); the second copy "
                "would silently replace the first, so the archive is rejected"
            )
        self.kinds[name] = kind

    def _same_after_normalising(self, name: str, key: str, kind: str = "file") -> None:
        # 'é' can be one code point (NFC, Windows, Linux) or two (NFD, macOS): two such
        # members are one file on macOS and on most tools' idea of a name.
        other = self.normal.get(key)
        if other is None and key != name and kind != "dir" and self.kinds.get(key, "dir") != "dir":
            other = key
        if other is not None and other != name and (kind != "dir" or self.kinds.get(other) != "dir"):
            raise UnsafeArchiveError(
                f"{self.archive}: member names {other!r} and {name!r} are the same name once Unicode-normalised "
                "(NFC); one would replace the other on macOS and confuse tools, so the archive is rejected "
                "(rename one of them)"
            )
        if not name.isascii():
            self.normal.setdefault(key, name)


def check_link(archive: str, name: str, target: str, kind: str, names: Names) -> str:
    """Validate a link member; returns where it points, relative to the destination.

    The target is walked one component at a time from the link's folder (a hard
    link's from the destination). No member lies under a link (see :class:`Names`),
    so every step that is not itself a link is a real folder and the walk matches
    what the OS will do; a walk that reaches a link, or climbs above the
    destination, is rejected.
    """
    if not target or "\x00" in target:
        raise UnsafeArchiveError(f"{archive}: {kind} {name!r} has an empty or malformed target")
    norm = target.replace("\\", "/")
    if norm.startswith("/") or (len(norm) >= 2 and norm[1] == ":"):
        raise UnsafeArchiveError(
            f"{archive}: {kind} {name!r} points to the absolute path {target!r}, outside the destination; rejected"
        )
    stack = name.split("/")[:-1] if kind == "symlink" else []
    for part in norm.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not stack:
                raise UnsafeArchiveError(
                    f"{archive}: {kind} {name!r} -> {target!r} points outside the destination; rejected"
                )
            stack.pop()
            continue
        stack.append(part)
        if names.kinds.get("/".join(stack)) in ("symlink", "hardlink"):
            raise UnsafeArchiveError(
                f"{archive}: {kind} {name!r} -> {target!r} goes through another link; chains of links could "
                "leave the destination, so the archive is rejected"
            )
    if not stack:
        raise UnsafeArchiveError(f"{archive}: {kind} {name!r} -> {target!r} points at the destination itself; rejected")
    return "/".join(stack)


def check_budget(archive: str, members: int, total: int, limits: ArchiveLimits) -> None:
    """Refuse an archive with more members or bytes than ``limits`` allow."""
    if members > limits.max_members:
        raise UnsafeArchiveError(
            f"{archive}: holds more than {limits.max_members} members (ArchiveLimits.max_members); if you trust it, "
            "pass limits=ArchiveLimits(max_members=...) with a higher value"
        )
    if total > limits.max_total_size:
        raise UnsafeArchiveError(
            f"{archive}: would extract to more than {_io.human_bytes(limits.max_total_size)} "
            f"({total} bytes declared; ArchiveLimits.max_total_size); if you trust it, raise the limit"
        )


def check_ratio(archive: str, what: str, size: int, packed: int, limits: ArchiveLimits) -> None:
    """Refuse ``what`` when it expands past ``limits.max_ratio`` (small sizes are exempt)."""
    if size > limits.ratio_grace and size > limits.max_ratio * max(packed, 1):
        raise UnsafeArchiveError(
            f"{archive}: {what} expands {size / max(packed, 1):.0f}x ({packed} -> {size} bytes), more than "
            f"ArchiveLimits.max_ratio={limits.max_ratio:g}; this looks like a zip bomb. If you trust the archive, "
            "pass limits=ArchiveLimits(max_ratio=...) with a higher value"
        )
