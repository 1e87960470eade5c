"""An image folder read as torchvision's ``ImageFolder`` reads it: classes, files, labels, and the folder's identity.

The class folders, the files taken and their order are ImageFolder's, so index
``i`` of a decoded array is ``ImageFolder(root).samples[i]``: class folders
sorted by name (folders only, links followed), each walked with links followed,
folders and file names sorted, files kept by their (case-insensitive) image
extension.

The identity says when the folder changed. A folder that ``stage()`` published
is identified by its stage marker (the source it came from and when it was
staged): reading one small file keeps a rerun instant. Any other folder is
identified by the names of its files and the modification times of its
folders, which change whenever a file is added, removed, renamed or replaced by
a rename (as ``stage()`` identifies a source folder). A file rewritten in place
under the same name is not seen: a stat of every file would make a rerun on
10,000 files cost ~200 ms on a busy machine; pass ``overwrite=True`` then.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from colabkit.data.stage import MARKER
from colabkit.errors import ArgumentError, PathNotFoundError

__all__ = ["IMAGE_EXTENSIONS", "FolderListing", "list_folder", "staged_identity"]

#: Extensions ImageFolder takes (torchvision.datasets.folder.IMG_EXTENSIONS).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclasses.dataclass(frozen=True)
class FolderListing:
    """The images of a folder in ImageFolder's order.

    Attributes:
        root: The folder.
        classes: Class names (the class folders), index = label.
        files: Paths relative to ``root``, in ImageFolder's order.
        labels: The label of each file.
        fingerprint: SHA-256 over every file's relative path and every folder's modification time.
    """

    root: Path
    classes: list[str]
    files: list[str]
    labels: list[int]
    fingerprint: str


def list_folder(root: Path) -> FolderListing:
    """The images under ``root`` as ``ImageFolder(root)`` lists them.

    Raises:
        PathNotFoundError: ``root`` is not a folder.
        ArgumentError: ``root`` has no class folders, or no images in them.
    """
    if not root.is_dir():
        raise PathNotFoundError(
            f"decode_images(): {root} is not a folder; pass the folder that holds the class folders"
        )
    with os.scandir(root) as entries:
        classes = sorted(entry.name for entry in entries if entry.is_dir())
    if not classes:
        raise ArgumentError(
            f"decode_images(): {root} has no class folders; images must sit in one folder per class "
            "(root/cat/1.jpg, root/dog/2.jpg), as torchvision's ImageFolder expects"
        )
    digest = hashlib.sha256(f"{root.stat().st_mtime_ns}\n".encode())
    files: list[str] = []
    labels: list[int] = []
    prefix = len(os.path.join(str(root), ""))
    for label, name in enumerate(classes):
        for folder, _, names in sorted(os.walk(root / name, followlinks=True)):
            relative = folder[prefix:]
            digest.update(f"{relative}\0{os.stat(folder).st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
            chosen = [f"{relative}{os.sep}{n}" for n in sorted(names) if n.lower().endswith(IMAGE_EXTENSIONS)]
            files.extend(chosen)
            labels.extend([label] * len(chosen))
    digest.update("\n".join(files).encode("utf-8", "surrogateescape"))
    if not files:
        raise ArgumentError(
            f"decode_images(): the class folders of {root} hold no images (extensions: {', '.join(IMAGE_EXTENSIONS)})"
        )
    return FolderListing(root, classes, files, labels, digest.hexdigest())


def staged_identity(root: Path) -> dict[str, Any] | None:
    """The identity of a folder ``stage()`` published (``root`` itself or its single top folder), else None."""
    for holder, result in ((root, "."), (root.parent, root.name)):
        try:
            with open(holder / MARKER, "rb") as handle:
                marker = json.loads(handle.read())
        except (OSError, ValueError):
            continue
        if isinstance(marker, dict) and marker.get("result", ".") == result and "identity" in marker:
            return {"kind": "staged", "path": str(root), "stage": marker["identity"], "at": marker.get("staged_at")}
    return None
