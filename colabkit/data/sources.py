"""Where a dataset comes from: local or Drive paths, Drive share links, URLs, buckets.

:func:`resolve` turns what the user passed into a :class:`Source`. Every
source answers two questions the same way:

* :meth:`Source.identity`: a cheap, JSON-able description (path + size + mtime,
  or URL) that ``stage()`` stores in its marker; an unchanged identity means
  the staged copy is still good, so a re-run returns at once.
* :meth:`Source.fetch`: make the data available on local disk (an archive or
  file to extract or copy, or a folder to copy) and say whether that local copy
  is temporary.

Outside-world seams (replace them in tests): :data:`colabkit._io.ops` (file
reads of local/Drive sources and the files written from them),
:func:`gdown_module`, :func:`fsspec_module`, :func:`urlopen` and :func:`sleep`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import http.client
import inspect
import json
import os
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, Protocol, TypeVar

from colabkit import _io, display, drive
from colabkit.errors import ArgumentError, ColabkitIOError, DownloadError, missing_dependency
from colabkit.runtime import runtime

__all__ = [
    "Fetched",
    "Source",
    "copy_file",
    "copy_tree",
    "fsspec_module",
    "gdown_module",
    "is_remote_path",
    "resolve",
    "urlopen",
    "with_retries",
]

T = TypeVar("T")

_MiB = 1024 * 1024
_GDRIVE_ID = re.compile(r"^[A-Za-z0-9_-]{25,}$")
_GDRIVE_HOSTS = ("drive.google.com", "docs.google.com", "drive.usercontent.google.com")


# -- seams ------------------------------------------------------------------------------------------


def gdown_module() -> ModuleType:
    """Import gdown (the seam tests replace with a fake)."""
    try:
        import gdown
    except ImportError:
        raise missing_dependency("gdown", purpose="stage() of a Google Drive link") from None
    return gdown


def fsspec_module() -> ModuleType:
    """Import fsspec (the seam tests may replace)."""
    try:
        import fsspec
    except ImportError:
        raise missing_dependency("fsspec", "remote", purpose="stage() of an s3:// or gs:// URL") from None
    return fsspec


def urlopen(request: urllib.request.Request, timeout: float) -> Any:
    """Open an HTTP(S) request (the seam tests may replace)."""
    return urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 - the scheme is checked by resolve()


def sleep(seconds: float) -> None:
    """Wait between retries (the seam tests replace with a no-op)."""
    time.sleep(seconds)


def with_retries(fn: Callable[[], T], retries: int) -> T:
    """Call ``fn``, retrying on Drive's transient errors (errno 5, 107) as :func:`colabkit.drive.drive_retry` does."""
    from colabkit.drive import drive_retry

    return drive_retry(fn, retries=retries, sleep=sleep)


def is_remote_path(path: Path) -> bool:
    """Whether reads of ``path`` are remote, so it is copied off first: Drive, or another FUSE mount (gcsfuse...)."""
    try:
        return drive.is_drive_path(path) or (drive.mount_type(path) or "").startswith("fuse")
    except OSError:
        return False


# -- the interface ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Fetched:
    """Local data a source produced.

    Attributes:
        path: A file (archive or plain) or a folder on local disk.
        name: The file's real name (downloads get made-up names); the format comes from the bytes.
        temporary: True when ``path`` is a copy stage() may move or delete.
        is_dir: Whether ``path`` is a folder.
        hashes: Hex digests computed on the way (``"sha256"``, ``"md5"``).
    """

    path: Path
    name: str
    temporary: bool
    is_dir: bool = False
    hashes: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class FetchContext:
    """What a fetch may use: a scratch folder on the destination's disk, and the options."""

    scratch: Path
    retries: int
    progress: bool
    workers: int
    hash_names: tuple[str, ...] = ()


class Source(Protocol):
    """One place a dataset can come from."""

    description: str

    def default_name(self) -> str:
        """The folder name used under ``dest`` when the caller gives none."""
        ...

    def identity(self) -> dict[str, Any]:
        """Cheap description that changes when the data does (stored in the marker)."""
        ...

    def fetch(self, ctx: FetchContext) -> Fetched:
        """Bring the data onto local disk."""
        ...


def _strip_archive_suffix(name: str) -> str:
    lowered = name.lower()
    suffixes = (".tar.gz", ".tar.bz2", ".tar.xz", ".tar.zst", ".tar.zstd", ".tgz", ".tbz2", ".tbz", ".txz", ".tzst")
    for suffix in (*suffixes, ".tar", ".zip", ".7z", ".gz", ".zst"):
        if lowered.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


# -- local paths (and Drive) ------------------------------------------------------------------------


@dataclasses.dataclass
class PathSource:
    """A file or folder on a local disk or on the (mounted) Drive."""

    path: Path
    description: str = ""

    def __post_init__(self) -> None:
        self.description = str(self.path)

    def default_name(self) -> str:
        return _strip_archive_suffix(self.path.name) or "dataset"

    def identity(self) -> dict[str, Any]:
        st = with_retries(lambda: os.stat(self.path), 2)
        ident: dict[str, Any] = {"kind": "path", "path": str(self.path), "mtime_ns": st.st_mtime_ns}
        if os.path.isdir(self.path):
            # Adding or removing a file changes its folder's mtime; direct subfolders (class
            # folders) are checked too. Deeper edits need overwrite=True: re-walking 20,000
            # files on every call would defeat the instant re-run.
            with os.scandir(self.path) as entries:
                subdirs = sorted(
                    (entry.name, entry.stat().st_mtime_ns) for entry in entries if entry.is_dir(follow_symlinks=False)
                )
            ident["subdirs"] = subdirs
        else:
            ident["size"] = st.st_size
        return ident

    def fetch(self, ctx: FetchContext) -> Fetched:
        if self.path.is_dir():
            return Fetched(self.path, self.path.name, temporary=False, is_dir=True)
        if not is_remote_path(self.path):
            return Fetched(self.path, self.path.name, temporary=False)
        # Drive reads are slow and flaky at random offsets: one sequential copy to local disk first.
        size = with_retries(lambda: self.path.stat().st_size, ctx.retries)
        _io.ensure_free_space(ctx.scratch, size, what=f"the local copy of {self.path.name}")
        ctx.scratch.mkdir(parents=True, exist_ok=True)
        local = _io.temp_name(ctx.scratch / self.path.name)

        def attempt() -> dict[str, str]:
            hashers = {name: hashlib.new(name) for name in ctx.hash_names}
            with display.bar(size, desc=f"copy {self.path.name}", unit="B", enabled=ctx.progress) as bar:
                copy_file(self.path, local, hashers=hashers.values(), progress=bar.update)
            return {name: h.hexdigest() for name, h in hashers.items()}

        try:
            hashes = with_retries(attempt, ctx.retries)  # fresh hashers on each attempt
        except BaseException:
            with contextlib.suppress(OSError):
                local.unlink()
            raise
        return Fetched(local, self.path.name, temporary=True, hashes=hashes)


def copy_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    retries: int = 0,
    hashers: Iterable[Any] = (),
    progress: Callable[[int], None] | None = None,
) -> int:
    """Copy one file (through :data:`colabkit._io.ops`) to the new file ``dst``, retrying Drive's hiccups.

    ``dst`` is written in place (callers copy into folders that are published
    atomically); an attempt that failed midway is removed before the next.
    """

    def attempt() -> int:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(dst)
        return _io.copy_file(src, dst, hashers=hashers, progress=progress, durable=False, atomic=False)

    return with_retries(attempt, retries)


def _settled(future: Future[Any], timeout: float) -> bool:
    return bool(futures_wait([future], timeout=timeout).done)


def copy_tree(
    src: Path,
    dst: Path,
    *,
    workers: int = 32,
    retries: int = 3,
    progress: bool = True,
) -> tuple[int, int]:
    """Copy the folder ``src`` into the existing empty folder ``dst`` with a thread pool.

    Drive answers each file open after tens of milliseconds; many threads keep
    many opens in flight, so that latency overlaps. Each file is retried on
    Drive's transient errors. Symlinks are skipped (they could point anywhere).

    Returns:
        ``(files, bytes)`` copied.
    """
    files: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        out_dir = dst if rel == "." else dst / rel
        if rel != ".":
            out_dir.mkdir()
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d)) and not _io.is_temp_name(d)]
        for fname in filenames:
            full = os.path.join(dirpath, fname)
            if _io.is_temp_name(fname) or os.path.islink(full):
                continue
            files.append((full, os.path.join(out_dir, fname)))
    total_bytes = 0

    def one(pair: tuple[str, str]) -> int:
        return copy_file(*pair, retries=retries)

    with display.bar(len(files), desc=f"copy {src.name}", unit="file", enabled=progress) as bar:
        if workers <= 1 or len(files) < 2:
            for pair in files:
                total_bytes += one(pair)
                bar.update(1)
        else:
            with ThreadPoolExecutor(max_workers=min(workers, len(files)), thread_name_prefix="colabkit-copy") as pool:
                futures = [pool.submit(one, pair) for pair in files]
                try:
                    for future in futures:
                        # A copier that lost Drive (errno 107) waits for a remount only this thread may make.
                        drive.wait_recovering(functools.partial(_settled, future))
                        total_bytes += future.result()
                        bar.update(1)
                except BaseException:
                    for future in futures:
                        future.cancel()
                    raise
    return len(files), total_bytes


# -- Google Drive share links (gdown) ---------------------------------------------------------------


def parse_gdrive(text: str) -> tuple[str, Literal["file", "folder"]] | None:
    """``(id, "file"|"folder")`` for a Drive share link or bare file id, else None."""
    if _GDRIVE_ID.match(text) and "." not in text:
        return text, "file"
    parsed = urllib.parse.urlparse(text)
    if parsed.scheme not in ("http", "https") or parsed.hostname not in _GDRIVE_HOSTS:
        return None
    folder = re.search(r"/folders/([A-Za-z0-9_-]+)", parsed.path)
    if folder:
        return folder.group(1), "folder"
    found = re.search(r"/d/([A-Za-z0-9_-]+)", parsed.path)
    if found:
        return found.group(1), "file"
    query = urllib.parse.parse_qs(parsed.query)
    if query.get("id"):
        return query["id"][0], "file"
    return None


def _gdown_error(exc: BaseException, link: str) -> DownloadError:
    text = " ".join(str(exc).split())  # gdown wraps and indents the page's message over several lines
    if "too many users" in text.lower():
        return DownloadError(
            f"Google Drive refused {link}: too many users have viewed or downloaded this file recently (Drive's "
            "per-file quota). Fix: make a copy of the file in your own Drive and stage() the copy's link, or "
            "mount_drive() and stage() the file's path, or wait up to 24 hours"
        )
    return DownloadError(
        f"could not download {link} from Google Drive ({type(exc).__name__}: {text[:300]}). Fix: open the "
        "file's Share dialog and set General access to 'Anyone with the link', or mount_drive() and stage() its "
        "path; if it is already public, Drive may be limiting downloads of a popular file: stage() a copy made "
        "in your own Drive"
    )


def _call_accepting(fn: Callable[..., Any], **kwargs: Any) -> Any:
    """Call ``fn`` with the keyword arguments its installed version accepts."""
    try:
        accepted = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn(**kwargs)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        return fn(**kwargs)
    return fn(**{k: v for k, v in kwargs.items() if k in accepted})


@dataclasses.dataclass
class GdownSource:
    """A Google Drive share link, file id or folder link, fetched through gdown."""

    link: str
    file_id: str
    kind: Literal["file", "folder"]
    description: str = ""

    def __post_init__(self) -> None:
        self.description = f"Google Drive {self.kind} {self.file_id}"

    def default_name(self) -> str:
        return self.file_id

    def identity(self) -> dict[str, Any]:
        return {"kind": "gdrive", "id": self.file_id, "type": self.kind}

    def fetch(self, ctx: FetchContext) -> Fetched:
        gdown = gdown_module()
        errors = _gdown_error_types(gdown)
        ctx.scratch.mkdir(parents=True, exist_ok=True)
        if self.kind == "folder":
            out = _io.temp_name(ctx.scratch / self.file_id)
            out.mkdir()
            try:
                result = _call_accepting(
                    gdown.download_folder,
                    id=self.file_id,
                    output=str(out),
                    quiet=not ctx.progress,
                    resume=True,
                    retries=ctx.retries,
                )
            except errors as exc:
                shutil.rmtree(out, ignore_errors=True)
                raise _gdown_error(exc, self.link) from exc
            if result is None:  # gdown 5.x reports failure by returning None
                shutil.rmtree(out, ignore_errors=True)
                raise _gdown_error(RuntimeError("gdown.download_folder returned nothing"), self.link)
            return Fetched(out, self.file_id, temporary=True, is_dir=True)
        # A stable folder per id, so an interrupted download resumes (gdown keeps its own .part file).
        out_dir = ctx.scratch / f"gdrive-{self.file_id}"
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            result = _call_accepting(
                gdown.download,
                id=self.file_id,
                output=str(out_dir) + os.sep,
                quiet=not ctx.progress,
                resume=True,
                retries=ctx.retries,
            )
        except errors as exc:
            raise _gdown_error(exc, self.link) from exc
        if not result:  # gdown <= 4.7.1 printed "Access denied" and returned None
            raise _gdown_error(RuntimeError("gdown.download returned nothing"), self.link)
        path = Path(result)
        return Fetched(path, path.name, temporary=True)


def _gdown_error_types(gdown: ModuleType) -> tuple[type[BaseException], ...]:
    found: list[type[BaseException]] = []
    for holder in (gdown, getattr(gdown, "exceptions", None)):
        for name in ("FileURLRetrievalError", "DownloadError", "FolderContentsMaximumLimitError"):
            cls = getattr(holder, name, None)
            if isinstance(cls, type) and issubclass(cls, BaseException):
                found.append(cls)
    return (*found, ValueError)


# -- http(s) ------------------------------------------------------------------------------------------

_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
#: Content-Encodings whose bytes carry no mark to tell them by; gzip and zstd are told by
#: their magic bytes and peeled by extraction, whatever the header says.
_UNMARKED_ENCODINGS = frozenset({"br", "deflate", "compress", "x-compress"})


def _network_transient(exc: BaseException) -> bool:
    """Whether a download attempt may be repeated: network and I/O errors, not a full disk or a final answer."""
    if isinstance(exc, DownloadError):
        return False
    if isinstance(exc, OSError):
        return exc.errno != errno.ENOSPC
    return isinstance(exc, http.client.HTTPException)


@dataclasses.dataclass
class HttpSource:
    """An ``http://`` or ``https://`` URL, downloaded with resume (HTTP Range requests)."""

    url: str
    description: str = ""
    timeout: float = 60.0

    def __post_init__(self) -> None:
        self.description = self.url

    def _basename(self) -> str:
        return Path(urllib.parse.unquote(urllib.parse.urlparse(self.url).path)).name

    def default_name(self) -> str:
        base = _strip_archive_suffix(self._basename())
        return base or "download-" + hashlib.sha1(self.url.encode()).hexdigest()[:10]  # noqa: S324 - a name

    def identity(self) -> dict[str, Any]:
        # No request on re-runs: they must be instant and work offline. A changed
        # file behind the same URL needs a new sha256= or overwrite=True.
        return {"kind": "url", "url": self.url}

    def fetch(self, ctx: FetchContext) -> Fetched:
        ctx.scratch.mkdir(parents=True, exist_ok=True)
        key = hashlib.sha1(self.url.encode()).hexdigest()[:16]  # noqa: S324 - a cache key
        part = ctx.scratch / f"url-{key}.part"
        meta_path = ctx.scratch / f"url-{key}.json"
        try:
            found = _io.retry(
                lambda: self._download_once(part, meta_path, ctx),
                retries=ctx.retries,
                sleep=lambda seconds: sleep(min(30.0, seconds)),
                should_retry=_network_transient,
            )
        except Exception as exc:
            if not _network_transient(exc):
                raise
            raise DownloadError(
                f"downloading {self.url} failed after {ctx.retries + 1} attempts ({type(exc).__name__}: {exc}); "
                "the partial file is kept and the next stage() resumes it. Check the network and retry"
            ) from exc
        name = found or self._basename() or "download"
        hashes = {}
        if ctx.hash_names:
            for algorithm in ctx.hash_names:
                hashes[algorithm] = _io.hash_file(part, algorithm)
        with contextlib.suppress(OSError):
            meta_path.unlink()
        return Fetched(part, name, temporary=True, hashes=hashes)

    def _download_once(self, part: Path, meta_path: Path, ctx: FetchContext) -> str | None:
        have = part.stat().st_size if part.exists() else 0
        meta: dict[str, Any] = {}
        if have and meta_path.exists():
            with contextlib.suppress(ValueError, OSError):
                meta = json.loads(meta_path.read_text())
        headers = {"User-Agent": "colabkit", "Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
            validator = meta.get("etag") or meta.get("last_modified")
            if validator:
                headers["If-Range"] = validator  # a changed file comes back whole (200), not spliced
        request = urllib.request.Request(self.url, headers=headers)  # noqa: S310 - http(s) checked in resolve()
        try:
            response = urlopen(request, self.timeout)
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and have:
                # Nothing left to send: the partial file is already complete.
                total = _content_range_total(exc.headers.get("Content-Range", ""))
                if total == have:
                    return _disposition_name(exc.headers) or None
                part.unlink()
                raise OSError(errno.EIO, f"server refused to resume at byte {have}; restarting") from exc
            if exc.code in _RETRY_STATUS:
                raise OSError(errno.EAGAIN, f"HTTP {exc.code} {exc.reason}") from exc
            raise DownloadError(
                f"downloading {self.url} failed: HTTP {exc.code} {exc.reason}. "
                + ("Check the URL and that it is public." if exc.code in (401, 403, 404) else "Retry later.")
            ) from exc
        except urllib.error.URLError as exc:
            raise OSError(errno.EIO, f"cannot reach {self.url}: {exc.reason}") from exc
        with response:
            encoding = (response.headers.get("Content-Encoding") or "").strip().lower()
            if encoding in _UNMARKED_ENCODINGS:
                raise DownloadError(
                    f"downloading {self.url}: the server sent the body with Content-Encoding: {encoding} although "
                    "colabkit asked for none (Accept-Encoding: identity), and such bytes cannot be told apart from "
                    "the file's own. Fix: download it with a tool that decodes it (curl --compressed -o FILE URL) "
                    "and stage() the file"
                )
            status = getattr(response, "status", 200)
            length = response.headers.get("Content-Length")
            if status == 206 and have:
                start = _content_range_start(response.headers.get("Content-Range", ""))
                if start != have:
                    raise OSError(errno.EIO, f"server resumed at byte {start}, not {have}")
                mode = "ab"
                total = have + int(length) if length is not None else None
            else:
                mode, have = "wb", 0
                total = int(length) if length is not None else None
                new_meta = {
                    "etag": response.headers.get("ETag"),
                    "last_modified": response.headers.get("Last-Modified"),
                }
                _io.atomic_write_bytes(meta_path, json.dumps(new_meta).encode(), durable=False)
            if total is not None:
                _io.ensure_free_space(part.parent, total - have, what=f"the download of {self.url}")
            received = have
            with (
                open(part, mode) as out,
                display.bar(
                    total, desc=f"download {self._basename() or 'file'}", unit="B", enabled=ctx.progress, initial=have
                ) as bar,
            ):
                received += _io.copy_stream(response.read, out.write, chunk_size=_MiB, progress=bar.update)
            if total is not None and received != total:
                raise http.client.IncompleteRead(b"", total - received)
            return _disposition_name(response.headers)


def _content_range_start(value: str) -> int | None:
    found = re.match(r"bytes\s+(\d+)-", value.strip())
    return int(found.group(1)) if found else None


def _content_range_total(value: str) -> int | None:
    found = re.search(r"/(\d+)\s*$", value.strip())
    return int(found.group(1)) if found else None


def _disposition_name(headers: Any) -> str | None:
    value = headers.get("Content-Disposition") if headers is not None else None
    if not value:
        return None
    found = re.search(r"filename\*?=(?:UTF-8'')?\"?([^\";]+)\"?", value)
    return Path(urllib.parse.unquote(found.group(1))).name if found else None


# -- s3:// gs:// and other fsspec URLs ----------------------------------------------------------------


@dataclasses.dataclass
class FsspecSource:
    """A bucket URL (``s3://``, ``gs://``...) read through fsspec."""

    url: str
    description: str = ""

    def __post_init__(self) -> None:
        self.description = self.url

    def default_name(self) -> str:
        return _strip_archive_suffix(Path(urllib.parse.urlparse(self.url).path.rstrip("/")).name) or "dataset"

    def identity(self) -> dict[str, Any]:
        return {"kind": "fsspec", "url": self.url}

    def _filesystem(self) -> tuple[Any, str]:
        fsspec = fsspec_module()
        protocol = self.url.split("://", 1)[0]
        try:
            return fsspec.core.url_to_fs(self.url)
        except ImportError as exc:
            package = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}.get(protocol)
            raise missing_dependency(package or str(exc), "remote", purpose=f"stage() of a {protocol}:// URL") from exc

    def fetch(self, ctx: FetchContext) -> Fetched:
        fs, path = self._filesystem()
        try:
            info = with_retries(lambda: fs.info(path), ctx.retries)
        except FileNotFoundError as exc:
            raise DownloadError(f"{self.url} does not exist (or is not readable with these credentials)") from exc
        ctx.scratch.mkdir(parents=True, exist_ok=True)
        name = Path(path.rstrip("/")).name
        if info.get("type") == "directory":
            out = _io.temp_name(ctx.scratch / name)
            out.mkdir()
            try:
                with_retries(lambda: fs.get(path.rstrip("/") + "/", str(out) + "/", recursive=True), ctx.retries)
            except BaseException:
                shutil.rmtree(out, ignore_errors=True)
                raise
            return Fetched(out, name, temporary=True, is_dir=True)
        size = int(info.get("size") or 0)
        _io.ensure_free_space(ctx.scratch, size, what=f"the download of {self.url}")
        local = _io.temp_name(ctx.scratch / name)

        def attempt() -> dict[str, str]:
            hashers = {algorithm: hashlib.new(algorithm) for algorithm in ctx.hash_names}
            with (
                fs.open(path, "rb", block_size=_io.CHUNK) as remote,
                open(local, "wb") as out,
                display.bar(size, desc=f"download {name}", unit="B", enabled=ctx.progress) as bar,
            ):
                _io.copy_stream(remote.read, out.write, progress=bar.update, hashers=hashers.values())
            return {algorithm: h.hexdigest() for algorithm, h in hashers.items()}

        try:
            hashes = with_retries(attempt, ctx.retries)
        except FileNotFoundError as exc:
            with contextlib.suppress(OSError):
                local.unlink()
            raise DownloadError(f"{self.url} does not exist (or is not readable with these credentials)") from exc
        except BaseException:
            with contextlib.suppress(OSError):
                local.unlink()
            raise
        return Fetched(local, name, temporary=True, hashes=hashes)


# -- resolve ------------------------------------------------------------------------------------------


def resolve(source: str | os.PathLike[str]) -> Source:
    """Turn what the caller passed to ``stage()`` into a :class:`Source`.

    Args:
        source: A path (local or Drive), a Drive share link / file id / folder link,
            an ``http(s)://`` URL, or an fsspec URL such as ``s3://bucket/key``.

    Raises:
        ArgumentError: Nothing exists at a path, or the text is no known kind of source.
    """
    if isinstance(source, os.PathLike):
        text = os.fspath(source)
        return _path_source(text)
    if not isinstance(source, str) or not source.strip():
        raise ArgumentError(
            f"stage(source={source!r}): pass a path, a Google Drive link or file id, an http(s) URL or an s3:// URL"
        )
    text = source.strip()
    gdrive = parse_gdrive(text)
    if gdrive is not None:
        return GdownSource(text, gdrive[0], gdrive[1])
    scheme = urllib.parse.urlparse(text).scheme.lower()
    if scheme in ("http", "https"):
        return HttpSource(text)
    if scheme == "file":
        return _path_source(urllib.parse.unquote(urllib.parse.urlparse(text).path))
    if len(scheme) > 1 and "://" in text:
        return FsspecSource(text)
    return _path_source(text)


def _path_source(text: str) -> PathSource:
    # Platform paths (/content/drive/...) land inside a colabkit.testing fake's root; identity elsewhere.
    path = Path(os.path.abspath(runtime().host_path(os.path.expanduser(text))))
    try:
        exists = with_retries(lambda: path.exists(), 2)
    except OSError as exc:
        raise ColabkitIOError(exc.errno, f"cannot read {path}: {exc.strerror}; if it is on Drive, remount it") from exc
    if not exists:
        hint = " (is Drive mounted? call colabkit.mount_drive() first)" if "/drive/" in str(path) else ""
        raise ArgumentError(
            f"stage(source={text!r}): nothing exists at {path}{hint}; pass an existing file or folder, a Drive "
            "share link, or a URL"
        )
    return PathSource(path)
