"""``decode_images()``: an image folder decoded once into one uint8 array on fast local disk, memory-mapped.

Training from a folder of JPEGs decodes and resizes every image again every
epoch. Decoding once, in worker processes, into one ``(N, H, W, 3)`` uint8
``.npy`` file turns each later epoch into array reads: an
:class:`~colabkit.data.images.array.ImageArray` over ``numpy``'s memory map,
so datasets larger than RAM work.

Pixels are torchvision's. Each image is read as ``ImageFolder``'s loader reads it
(``Image.open(f).convert("RGB")``: palette, grayscale, 16-bit and RGBA images
become RGB the way Pillow converts them; the alpha channel is dropped, not
blended; EXIF orientation is ignored, as torchvision ignores it) and resized
as ``transforms.Resize((H, W))`` resizes a PIL image (Pillow's bilinear filter,
which always antialiases; an image already ``H x W`` is kept as it is).

Publishing works as ``stage()`` does. The build fills a hidden sibling
``.<name>.colabkit-partial`` folder: ``plan.json`` (written once the empty
array exists) says what is being built, and ``parts.log`` lists the parts whose
pixels are on disk, one line each, written by the worker after its pixels. A
killed build resumes from there and decodes again only the parts that were in
flight, at most ``chunk`` images. The finished folder gets its marker
(``.colabkit-images.json``: the source's identity and the decode settings) and
is renamed into place, the commit point. A rerun reads the marker and
returns; a changed source or size rebuilds.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import io
import itertools
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from colabkit import _io, _notify, display
from colabkit.data.images.array import ImageArray
from colabkit.data.images.folder import FolderListing, list_folder, staged_identity
from colabkit.errors import ArgumentError, ColabkitIOError, ImageDecodeError, missing_dependency

__all__ = ["MARKER", "decode_image", "decode_images"]

#: Name of the marker file inside every finished decoded folder.
MARKER = ".colabkit-images.json"
_PLAN = "plan.json"
_LOG = "parts.log"
_VERSION = 1
_RECORD = re.compile(r"part (\d{8})")
_PARTIAL = ".colabkit-partial"
#: How the pixels are made; stored in the marker, so a change of any of these rebuilds.
_METHOD = {"loader": "PIL Image.open(f).convert('RGB'), EXIF orientation ignored", "resize": "PIL bilinear"}


def decode_images(
    folder: str | os.PathLike[str],
    *,
    size: int | tuple[int, int],
    transform: Any = None,
    target_transform: Any = None,
    dest: str | os.PathLike[str] | None = None,
    chunk: int = 512,
    workers: int | Literal["auto"] = "auto",
    read_threads: int | Literal["auto"] = "auto",
    overwrite: bool = False,
    progress: bool = True,
) -> ImageArray:
    """Decode an image folder once into one uint8 array on local disk and return it as a dataset.

    ``folder`` has torchvision's ``ImageFolder`` layout (``folder/cat/1.jpg``), for
    example a folder that :func:`colabkit.stage` returned. Image ``i`` of the
    result is ``ImageFolder(folder).samples[i]``, its label the same, and its
    pixels equal ``transforms.Resize((H, W))(ImageFolder's PIL image)`` bit for bit.
    The first call decodes (in ``workers`` processes, files read ahead by threads
    for slow storage such as Drive or ``/kaggle/input``); a rerun on the unchanged
    folder with the same size returns at once; a killed build resumes.

    Args:
        folder: The image folder (one subfolder per class).
        size: ``(height, width)`` of every decoded image, or one number for a square.
            This is ``Resize((H, W))``: torchvision's ``Resize(n)`` with one number
            keeps the aspect ratio, which gives images of different shapes.
        transform: The dataset's ``transform``, applied to each sample's PIL image as
            in torchvision datasets (``ToTensor()``, augmentations...).
        target_transform: Applied to each label.
        dest: Folder for the decoded array; default: a folder under the runtime's fast
            local data folder (``/content/data/.colabkit-decoded/<name>-<hash>``).
        chunk: Images in flight at once (split across the workers): a killed build
            decodes at most this many again.
        workers: Decode processes; ``"auto"``: one per CPU core.
        read_threads: Threads per process that read files ahead; ``"auto"``: 16 on
            Drive or another network mount, else 4.
        overwrite: Decode again even when the folder is unchanged.
        progress: Show a progress bar.

    Returns:
        An :class:`~colabkit.data.images.array.ImageArray` over the memory-mapped
        ``(N, H, W, 3)`` uint8 array, with ``targets`` and ``classes``.

    Raises:
        ArgumentError: A bad ``size``, ``chunk``, ``workers`` or ``read_threads``; no class
            folders or no images; ``dest`` holds data ``decode_images()`` did not write.
        PathNotFoundError: ``folder`` is not a folder.
        ImageDecodeError: Files could not be decoded; the message names every one, and
            nothing is published.
        InsufficientSpaceError: The array does not fit on ``dest``'s disk.

    Example:
        >>> root = colabkit.stage("/content/drive/MyDrive/flowers.zip")  # doctest: +SKIP
        >>> train = colabkit.decode_images(root, size=(64, 64), transform=transforms.ToTensor())  # doctest: +SKIP
        >>> colabkit.fit(model, train, epochs=10)  # doctest: +SKIP
    """
    height, width = _check_size(size)
    _check_count("chunk", chunk, allow_auto=False)
    _check_count("workers", workers, allow_auto=True)
    _check_count("read_threads", read_threads, allow_auto=True)
    root = Path(os.path.abspath(os.path.expanduser(folder)))
    target = Path(os.path.abspath(os.path.expanduser(dest))) if dest is not None else _default_dest(root)
    if target == root or root in target.parents:
        raise ArgumentError(
            f"decode_images(): dest {target} lies inside the image folder {root}, where it would be listed as a "
            "class folder; pass a dest= outside it (or leave dest=None)"
        )
    settings = {"size": [height, width], **_METHOD}
    extras = (transform, target_transform)
    staged = staged_identity(root)
    if staged is not None and not overwrite:
        found = _open_built(target, staged, settings, *extras)
        if found is not None:
            return found  # a staged folder is known by its stage marker: no walk over its files
    listing = list_folder(root)
    identity = staged or {
        "kind": "folder",
        "path": str(root),
        "files": len(listing.files),
        "fingerprint": listing.fingerprint,
    }
    if not overwrite:
        found = _open_built(target, identity, settings, *extras)
        if found is not None:
            return found
    target.parent.mkdir(parents=True, exist_ok=True)
    with _io.locked(target.parent):
        if not overwrite:
            found = _open_built(target, identity, settings, *extras)  # another process finished it meanwhile
            if found is not None:
                return found
        if os.path.lexists(target) and _read_json(target / MARKER) is None:
            raise ArgumentError(
                f"decode_images(): dest {target} already exists and was not written by decode_images(); "
                "pass another dest= or delete it"
            )
        _remove_leftovers(target)
        count = _workers(workers, len(listing.files))
        threads = read_threads if isinstance(read_threads, int) else _read_threads(root)
        _build(listing, target, identity, settings, _Run(chunk, count, threads, progress, resume=not overwrite))
    found = _open_built(target, identity, settings, *extras)
    if found is None:  # pragma: no cover - the folder was just published
        raise ColabkitIOError(f"decode_images(): {target} vanished right after it was built")
    return found


def decode_image(data: bytes, size: tuple[int, int]) -> Any:
    """One image's pixels, ``(H, W, 3)`` uint8, as ImageFolder's loader plus ``Resize((H, W))`` make them.

    Args:
        data: The encoded file (JPEG, PNG, ... anything Pillow opens).
        size: ``(height, width)``.
    """
    import numpy as np

    image_module = _pil()
    with warnings.catch_warnings():
        # Pillow's per-file notices (a palette's transparency given in bytes) would repeat for
        # every such file; torchvision's loader converts exactly the same way.
        warnings.simplefilter("ignore")
        with image_module.open(io.BytesIO(data)) as image:
            rgb = image.convert("RGB")
    height, width = size
    if rgb.size != (width, height):  # torchvision returns an image of the asked size unchanged
        rgb = rgb.resize((width, height), image_module.Resampling.BILINEAR)
    return np.asarray(rgb)


# -- the build


@dataclasses.dataclass(frozen=True)
class _Run:
    chunk: int
    workers: int
    read_threads: int
    progress: bool
    resume: bool  # False (overwrite=True): a partial build may predate the change the caller wants seen


@dataclasses.dataclass(frozen=True)
class _Part:
    """One worker task: images ``start`` to ``start + len(paths)`` of the array."""

    index: int
    start: int
    paths: list[str]
    folder: str  # the partial folder
    offset: int  # where pixel data starts in images.npy
    size: tuple[int, int]
    ahead: int  # files read ahead: twice the read threads


def _build(listing: FolderListing, target: Path, identity: dict[str, Any], settings: dict[str, Any], run: _Run) -> None:
    started = time.monotonic()
    height, width = settings["size"]
    count = len(listing.files)
    partial = target.with_name(f".{target.name}{_PARTIAL}")
    plan = {"version": _VERSION, "identity": identity, "settings": settings, "count": count}
    resumed = _resumable(partial, plan) if run.resume else None
    if resumed is None:
        part_size = max(1, math.ceil(run.chunk / run.workers))
        _start_partial(partial, listing, {**plan, "part": part_size}, (count, height, width, 3))
        done: set[int] = set()
    else:
        part_size, done = resumed
    offset = (partial / "images.npy").stat().st_size - count * height * width * 3
    root = str(listing.root)
    paths = [os.path.join(root, name) for name in listing.files]
    ahead = 2 * run.read_threads
    parts = [
        _Part(index, start, paths[start : start + part_size], str(partial), offset, (height, width), ahead)
        for index, start in enumerate(range(0, count, part_size))
        if index not in done
    ]
    finished = count - sum(len(part.paths) for part in parts)
    label = f"decode {listing.root.name}"
    with display.bar(count, desc=label, unit="img", enabled=run.progress, initial=finished) as bar:
        _run_parts(parts, run, bar.update)
    recorded = _recorded(partial / _LOG)
    missing = [index for index in range(math.ceil(count / part_size)) if index not in recorded]
    if missing:  # pragma: no cover - every part above returned only after recording itself
        raise ColabkitIOError(f"decode_images(): parts {missing[:10]} of {partial} were not recorded; run it again")
    failures = _failures(partial, root)
    if failures:
        shutil.rmtree(partial, ignore_errors=True)
        raise ImageDecodeError(_failure_message(listing.root, failures, count), failures)
    marker = {
        **plan,
        "classes": listing.classes,
        "shape": [count, height, width, 3],
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _io.atomic_write_bytes(partial / MARKER, json.dumps(marker, indent=1).encode())
    _io.publish_folder(partial, target)
    _notify.logger.info(
        "decoded %d images of %s into %s in %.1fs", count, listing.root, target, time.monotonic() - started
    )


def _start_partial(partial: Path, listing: FolderListing, plan: dict[str, Any], shape: tuple[int, ...]) -> None:
    """A fresh partial folder: empty array, labels and file list, then the plan that makes it resumable."""
    import numpy as np

    shutil.rmtree(partial, ignore_errors=True)
    nbytes = math.prod(shape)
    _io.ensure_free_space(
        partial.parent,
        nbytes,
        what=f"the decoded images ({shape[0]} x {shape[1]} x {shape[2]} x 3 bytes)",
        fix="free some space, pass a smaller size= or a dest= on a larger disk",
    )
    partial.mkdir(parents=True)
    array = np.lib.format.open_memmap(partial / "images.npy", mode="w+", dtype=np.uint8, shape=shape)
    del array  # a sparse file: the workers write the pixels
    np.save(partial / "labels.npy", np.asarray(listing.labels, dtype=np.int64))
    _io.atomic_write_bytes(partial / "files.json", json.dumps(listing.files).encode())
    _io.atomic_write_bytes(partial / _PLAN, json.dumps(plan, indent=1).encode())


def _resumable(partial: Path, plan: dict[str, Any]) -> tuple[int, set[int]] | None:
    """(part size, parts done) of a partial build of exactly ``plan``, else None."""
    found = _read_json(partial / _PLAN)
    if found is None or not isinstance(found.get("part"), int) or found["part"] < 1:
        return None
    if {key: value for key, value in found.items() if key != "part"} != json.loads(json.dumps(plan)):
        return None
    return found["part"], _recorded(partial / _LOG)


def _recorded(log: Path) -> set[int]:
    """Parts listed in ``log``; a line cut short by a kill matches nothing and is redone."""
    try:
        text = log.read_text("ascii", errors="replace")
    except OSError:
        return set()
    return {int(match.group(1)) for line in text.split("\n") if (match := _RECORD.fullmatch(line))}


def _run_parts(parts: list[_Part], run: _Run, done: Any) -> None:
    """Decode ``parts`` here, or in ``run.workers`` forked processes with at most one part each in flight."""
    if run.workers <= 1 or len(parts) <= 1 or not hasattr(os, "fork") or sys.platform == "darwin":
        with ThreadPoolExecutor(run.read_threads, thread_name_prefix="colabkit-read") as reader:
            for part in parts:
                done(_decode_part(part, reader))
        return
    context = multiprocessing.get_context("fork")
    queue = iter(parts)
    try:
        with concurrent.futures.ProcessPoolExecutor(
            run.workers, mp_context=context, initializer=_start_worker, initargs=(run.read_threads,)
        ) as pool:
            with warnings.catch_warnings():
                # Python 3.12+ warns about forking a threaded process; the workers only read
                # files, decode with Pillow and write, touching no lock another thread holds.
                warnings.simplefilter("ignore", DeprecationWarning)
                pending = {pool.submit(_decode_in_worker, part) for part in itertools.islice(queue, run.workers)}
            try:
                while pending:
                    finished, pending = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
                    for future in finished:
                        done(future.result())
                        following = next(queue, None)
                        if following is not None:
                            pending.add(pool.submit(_decode_in_worker, following))
            except BaseException:
                for future in pending:
                    future.cancel()
                raise
    except concurrent.futures.BrokenExecutor as exc:
        raise ColabkitIOError(
            f"decode_images(): a decode worker died ({exc}); the parts decoded so far are kept. "
            "Run it again, or pass workers=1"
        ) from exc


_WORKER_READER: ThreadPoolExecutor | None = None


def _start_worker(read_threads: int) -> None:  # pragma: no cover - runs in the worker processes
    global _WORKER_READER
    _io.die_with_parent()  # a killed build must leave no process writing into its partial folder
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the build in the main process
    _WORKER_READER = ThreadPoolExecutor(read_threads, thread_name_prefix="colabkit-read")


def _decode_in_worker(part: _Part) -> int:  # pragma: no cover - runs in the worker processes
    assert _WORKER_READER is not None
    return _decode_part(part, _WORKER_READER)


def _decode_part(part: _Part, reader: ThreadPoolExecutor) -> int:
    """Decode one part, write its pixels into the array, then record it; returns its image count."""
    import numpy as np

    height, width = part.size
    pixels = np.zeros((len(part.paths), height, width, 3), dtype=np.uint8)
    failures: list[tuple[str, str]] = []
    for row, (path, data) in enumerate(_read_ahead(reader, part.paths, part.ahead)):
        try:
            if isinstance(data, BaseException):
                raise data
            pixels[row] = decode_image(data, part.size)
        except Exception as exc:
            failures.append((path, _reason(exc)))
    folder = Path(part.folder)
    if failures:
        _io.atomic_write_bytes(folder / f"failed-{part.index:08d}.json", json.dumps(failures).encode(), durable=False)
    fd = os.open(folder / "images.npy", os.O_WRONLY)
    try:
        os.lseek(fd, part.offset + part.start * height * width * 3, os.SEEK_SET)
        _io.write_all(fd, pixels.tobytes())  # one part: a few MB
        os.fdatasync(fd)
    finally:
        os.close(fd)
    # The record comes after the pixels: a kill in between only means this part is decoded again.
    fd = os.open(folder / _LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        _io.write_all(fd, f"part {part.index:08d}\n".encode())
    finally:
        os.close(fd)
    return len(part.paths)


def _read_ahead(
    reader: ThreadPoolExecutor, paths: list[str], ahead: int
) -> Iterator[tuple[str, bytes | BaseException]]:
    """``(path, its bytes)`` in order, the next reads already under way in ``reader``'s threads.

    At most ``ahead`` files are held or in flight, so a part of large photos never
    sits in memory whole.
    """
    pending: collections.deque[tuple[str, concurrent.futures.Future[bytes | BaseException]]] = collections.deque()
    queue = iter(paths)
    for path in itertools.islice(queue, ahead):
        pending.append((path, reader.submit(_read, path)))
    while pending:
        path, future = pending.popleft()
        following = next(queue, None)
        if following is not None:
            pending.append((following, reader.submit(_read, following)))
        yield path, future.result()


def _read(path: str) -> bytes | BaseException:
    """A file's bytes (through the file-ops seam, retried on Drive's transient errors), or why not."""

    def once() -> bytes:
        with _io.ops.open(path, "rb") as handle:
            return bytes(handle.read())

    try:
        return _io.retry(once, retries=2, delay=0.2)
    except Exception as exc:
        return exc


def _reason(exc: BaseException) -> str:
    text = str(exc).replace("\n", " ")
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def _failures(partial: Path, root: str) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for path in sorted(partial.glob("failed-*.json")):
        data = _read_json_list(path)
        found.extend((os.path.relpath(str(name), root), str(reason)) for name, reason in data)
    return found


def _failure_message(root: Path, failures: list[tuple[str, str]], count: int) -> str:
    lines = "\n".join(f"  {name}: {reason}" for name, reason in failures)
    return (
        f"decode_images(): {len(failures)} of {count} files in {root} could not be decoded:\n{lines}\n"
        "Nothing was published. Delete or replace these files (or restage a fixed archive) and run it again"
    )


# -- the finished folder


def _open_built(
    target: Path, identity: dict[str, Any], settings: dict[str, Any], transform: Any, target_transform: Any
) -> ImageArray | None:
    """The decoded dataset when ``target`` holds a finished build of exactly this source and settings."""
    import numpy as np

    marker = _read_json(target / MARKER)
    if marker is None or marker.get("version") != _VERSION:
        return None
    if marker.get("identity") != json.loads(json.dumps(identity)) or marker.get("settings") != settings:
        return None
    try:
        images = np.load(target / "images.npy", mmap_mode="r")
        labels = np.load(target / "labels.npy")
    except (OSError, ValueError):
        return None
    if list(images.shape) != marker.get("shape") or len(labels) != images.shape[0]:
        return None
    return ImageArray(images, labels, transform=transform, target_transform=target_transform, classes=marker["classes"])


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as handle:
            data = json.loads(handle.read())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _read_json_list(path: Path) -> list[Any]:
    try:
        with open(path, "rb") as handle:
            data = json.loads(handle.read())
    except (OSError, ValueError):
        return []
    return data if isinstance(data, list) else []


def _remove_leftovers(target: Path) -> None:
    """Delete what a publish killed half-way left (the replaced folder under a temporary name)."""
    prefix = f".{target.name}{_io.TEMP_MARK}"
    with contextlib.suppress(OSError), os.scandir(target.parent) as entries:
        for entry in entries:
            if entry.name.startswith(prefix) and not _io.temp_owner_alive(entry.name):
                shutil.rmtree(entry.path, ignore_errors=True)


# -- options


def _default_dest(root: Path) -> Path:
    from colabkit.runtime import runtime

    tag = hashlib.sha256(str(root).encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return runtime().data_dir / ".colabkit-decoded" / f"{root.name or 'images'}-{tag}"


def _workers(workers: int | Literal["auto"], images: int) -> int:
    if isinstance(workers, int):
        return workers
    if images < 256:
        return 1  # forking costs more than it saves
    return max(1, min(os.cpu_count() or 1, 8))


def _read_threads(root: Path) -> int:
    from colabkit.data.sources import is_remote_path

    return 16 if is_remote_path(root) or str(root).startswith("/kaggle/input") else 4


def _check_size(size: object) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) and not isinstance(size, bool) else size
    if (
        isinstance(pair, (tuple, list))
        and len(pair) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 65535 for v in pair)
    ):
        return int(pair[0]), int(pair[1])
    raise ArgumentError(
        f"decode_images(size={size!r}): give (height, width) in pixels, e.g. size=(64, 64), or one number for a square"
    )


def _check_count(name: str, value: object, *, allow_auto: bool) -> None:
    if allow_auto and value == "auto":
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        choices = "'auto' or a positive number" if allow_auto else "a positive number"
        raise ArgumentError(f"decode_images({name}={value!r}): use {choices}")


def _pil() -> Any:
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - torchvision brings Pillow
        raise missing_dependency("pillow", purpose="decode_images()") from exc
    return Image
