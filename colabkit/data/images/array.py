"""ImageArray: uint8 images in one array, with labels and a torchvision transform.

It reads like torchvision's in-memory datasets (CIFAR10, MNIST): ``data`` is
the uint8 array, ``targets`` the integer labels, ``transform`` and
``target_transform`` apply per sample, and ``dataset[i]`` hands ``transform`` a
PIL image, so any torchvision pipeline written for those datasets works
unchanged on the DataLoader path. fit() recognises it and runs a translated
transform on whole batches instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from colabkit.errors import ArgumentError

__all__ = ["ImageArray"]


def _shape_problem(shape: Sequence[int]) -> str | None:
    if len(shape) == 3:
        return None
    if len(shape) == 4 and shape[3] in (1, 3, 4):
        return None
    return (
        "expected (N, H, W) grayscale or (N, H, W, C) with C in 1, 3, 4 "
        "(channels last, as torchvision's CIFAR10 keeps them)"
    )


class ImageArray:
    """A map-style dataset over uint8 images held in one array.

    Args:
        images: A uint8 array (numpy array, ``numpy.memmap`` or CPU tensor) of shape
            ``(N, H, W)`` or ``(N, H, W, C)`` with ``C`` in 1, 3 or 4, channels last.
        labels: ``N`` integer labels.
        transform: Applied to each sample's PIL image, as in torchvision datasets.
        target_transform: Applied to each label.
        classes: Class names, index = label.

    Raises:
        ArgumentError: ``images`` is not uint8 of a supported shape, or ``labels`` has another length.
    """

    def __init__(
        self,
        images: Any,
        labels: Sequence[int] | Any,
        *,
        transform: Callable[[Any], Any] | None = None,
        target_transform: Callable[[Any], Any] | None = None,
        classes: Sequence[str] | None = None,
    ) -> None:
        dtype = str(getattr(images, "dtype", type(images).__name__))
        if dtype not in ("uint8", "torch.uint8"):
            raise ArgumentError(
                f"images has dtype {dtype}; ImageArray holds uint8 pixels (0-255): convert with "
                "(images * 255).round().astype('uint8') if they are floats in [0, 1]"
            )
        shape = tuple(int(s) for s in images.shape)
        problem = _shape_problem(shape)
        if problem is not None:
            raise ArgumentError(f"images has shape {shape}: {problem}")
        if len(labels) != shape[0]:
            raise ArgumentError(f"labels has {len(labels)} entries for {shape[0]} images: give one label per image")
        self.data = images
        self.targets = labels
        self.transform = transform
        self.target_transform = target_transform
        self.classes = list(classes) if classes is not None else None

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def image(self, index: int) -> Any:
        """Sample ``index`` as a PIL image (mode ``L``, ``RGB`` or ``RGBA``), untransformed."""
        from PIL import Image

        pixels = self.data[index]
        pixels = pixels.numpy() if hasattr(pixels, "numpy") else pixels
        if pixels.ndim == 3 and pixels.shape[2] == 1:
            pixels = pixels[:, :, 0]
        return Image.fromarray(pixels)  # uint8: (H, W) -> L, (H, W, 3) -> RGB, (H, W, 4) -> RGBA

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image = self.image(index)
        target = int(self.targets[index])
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target

    def __repr__(self) -> str:
        return f"ImageArray({len(self)} images of {tuple(self.data.shape[1:])}, transform={self.transform!r})"
