"""ImageArray reads like torchvision's in-memory datasets: same PIL image, same transform call, same label."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from colabkit.data.images.array import ImageArray
from colabkit.errors import ArgumentError

torchvision = pytest.importorskip("torchvision")
from torchvision import transforms  # noqa: E402


def _write_idx(raw: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    """The two idx files torchvision's MNIST family reads (big-endian header, then uint8 data)."""
    raw.mkdir(parents=True, exist_ok=True)
    n, h, w = images.shape
    (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, h, w) + images.tobytes())
    (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())


def test_grayscale_samples_equal_torchvision_fashion_mnist(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=6, dtype=np.uint8)
    for prefix in ("train", "t10k"):
        _write_idx(tmp_path / "FashionMNIST" / "raw", prefix, images, labels)
    pipeline = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.286,), (0.353,))])
    reference = torchvision.datasets.FashionMNIST(tmp_path, train=True, transform=pipeline, download=False)
    ours = ImageArray(reference.data.numpy(), reference.targets, transform=pipeline, classes=reference.classes)
    assert len(ours) == len(reference) == 6
    for index in range(6):
        (x, y), (rx, ry) = ours[index], reference[index]
        assert torch.equal(x, rx) and y == ry
        assert ours.image(index).mode == "L"


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_channels_last_arrays_give_the_pil_image_of_their_pixels(channels: int) -> None:
    pixels = np.random.default_rng(channels).integers(0, 256, size=(3, 5, 7, channels), dtype=np.uint8)
    data = ImageArray(torch.from_numpy(pixels), [0, 1, 2], target_transform=lambda y: y * 10)
    image, target = data[2]
    assert image.mode == {1: "L", 3: "RGB", 4: "RGBA"}[channels]
    assert np.array_equal(np.asarray(image).reshape(5, 7, channels), pixels[2])
    assert target == 20


def test_a_memmap_is_read_without_loading_it(tmp_path: Path) -> None:
    stored = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.uint8, shape=(4, 6, 6, 3))
    stored[:] = 7
    stored.flush()
    data = ImageArray(np.load(tmp_path / "x.npy", mmap_mode="r"), [0, 0, 1, 1], transform=transforms.PILToTensor())
    assert isinstance(data.data, np.memmap)
    assert torch.equal(data[3][0], torch.full((3, 6, 6), 7, dtype=torch.uint8))


@pytest.mark.parametrize(
    ("images", "labels", "words"),
    [
        (np.zeros((2, 4, 4), np.float32), [0, 1], "uint8"),
        (np.zeros((2, 4, 4, 2), np.uint8), [0, 1], "(N, H, W, C)"),
        (np.zeros((4, 4), np.uint8), [0, 1], "(N, H, W)"),
        (np.zeros((2, 4, 4), np.uint8), [0], "one label per image"),
    ],
)
def test_bad_arrays_are_refused_with_the_fix(images: np.ndarray, labels: list[int], words: str) -> None:
    with pytest.raises(ArgumentError, match=re.escape(words)):
        ImageArray(images, labels)
