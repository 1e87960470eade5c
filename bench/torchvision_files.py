"""Image datasets written in torchvision's own file formats, so its dataset classes read them (bench and tests).

No download: the files hold random pixels in the exact layout torchvision expects.
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path
from typing import Any, ClassVar

import torch

MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _idx(path: Path, tensor: torch.Tensor) -> None:
    """An idx file (the MNIST format): magic (uint8 type 8, rank), big-endian sizes, then the bytes."""
    header = struct.pack(">I", 0x0800 | tensor.dim()) + b"".join(struct.pack(">I", s) for s in tensor.shape)
    path.write_bytes(header + tensor.to(torch.uint8).contiguous().numpy().tobytes())


def write_mnist(root: Path, name: str, images: torch.Tensor, labels: torch.Tensor) -> Path:
    """``root/<name>/raw/*-idx?-ubyte`` for ``torchvision.datasets.<name>(root, download=False)``.

    ``images`` is uint8 ``(N, H, W)``; the test split gets the same data.
    """
    raw = root / name / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split in ("train", "t10k"):
        _idx(raw / f"{split}-images-idx3-ubyte", images)
        _idx(raw / f"{split}-labels-idx1-ubyte", labels)
    return root


def write_cifar10(root: Path, images: torch.Tensor, labels: torch.Tensor, *, batches: int = 5) -> Path:
    """``root/cifar-10-batches-py`` pickles (``images`` uint8 ``(N, 32, 32, 3)``), as CIFAR10 reads them.

    torchvision checks the published files' md5 sums before reading: read these with
    :func:`local_cifar10`.
    """
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rows = images.permute(0, 3, 1, 2).reshape(len(images), -1).numpy()  # CIFAR stores planes: R, G, B
    names = [f"data_batch_{i + 1}" for i in range(batches)] + ["test_batch"]
    chunks = torch.arange(len(images)).tensor_split(batches)
    for name, chunk in zip(names, [*chunks, torch.arange(len(images))], strict=True):
        with open(folder / name, "wb") as file:
            pickle.dump({"data": rows[chunk.numpy()], "labels": labels[chunk].tolist()}, file)
    with open(folder / "batches.meta", "wb") as file:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, file)
    return root


def local_cifar10(root: Path, **options: Any) -> Any:
    """``torchvision.datasets.CIFAR10`` over what :func:`write_cifar10` wrote under ``root``.

    A subclass whose file lists name no md5 sums, so CIFAR10's own code checks only that the
    files exist and reads them; its ``__getitem__`` is CIFAR10's own.
    """
    from torchvision import datasets

    class LocalCIFAR10(datasets.CIFAR10):
        train_list: ClassVar[list[list[Any]]] = [[f"data_batch_{i}", None] for i in range(1, 6)]
        test_list: ClassVar[list[list[Any]]] = [["test_batch", None]]
        meta: ClassVar[dict[str, Any]] = {"filename": "batches.meta", "key": "label_names", "md5": None}

    return LocalCIFAR10(str(root), download=False, **options)
