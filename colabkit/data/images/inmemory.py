"""Recognising datasets whose images are one uint8 array in memory, and taking them apart.

torchvision's MNIST family (MNIST, FashionMNIST, KMNIST, EMNIST, QMNIST with
``compat=True``), CIFAR10 / CIFAR100, SVHN and STL10 keep every image in one
uint8 array (``data``) with integer labels (``targets`` or ``labels``), and
hand each sample's PIL image to ``transform``.
:class:`~colabkit.data.images.array.ImageArray` is colabkit's own dataset of
that shape (users' arrays, decoded folders). ``torch.utils.data.Subset``\\ s of
these, nested or not, count too.

:func:`in_memory_images` returns the images as one uint8 ``(N, C, H, W)``
tensor, the labels as int64, and the transform pair; or a phrase saying why
the dataset is not one (for the start notice). A dataset is recognised by its
``__getitem__`` being the very one of a known class, so a subclass that reads
its samples its own way is left alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch.utils.data import Subset

from colabkit.data.images.array import ImageArray

__all__ = ["InMemoryImages", "in_memory_images"]


@dataclasses.dataclass
class InMemoryImages:
    """An in-memory image dataset taken apart.

    Attributes:
        images: uint8 ``(M, C, H, W)`` (a view of the whole underlying dataset's array).
        labels: int64 ``(M,)``: the label each of those samples returns.
        indices: For a Subset: which of the ``M`` rows its samples are, in order (else None).
        transform: The dataset's per-sample transform.
        target_transform: The dataset's label transform (None when it has none).
        name: The dataset's class name (``"Subset of CIFAR10"``).
    """

    images: torch.Tensor
    labels: torch.Tensor
    transform: Any
    target_transform: Any
    name: str
    indices: torch.Tensor | None = None

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """One sample's ``(C, H, W)``."""
        return tuple(int(s) for s in self.images.shape[1:])  # type: ignore[return-value]

    def __len__(self) -> int:
        return len(self.labels) if self.indices is None else len(self.indices)

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The samples' images, contiguous ``(N, C, H, W)``, and labels, in dataset order (a Subset's gathered once)."""
        if self.indices is None:
            return self.images.contiguous(), self.labels
        return self.images.index_select(0, self.indices).contiguous(), self.labels.index_select(0, self.indices)


def _as_tensor(array: Any) -> torch.Tensor:
    if isinstance(array, torch.Tensor):
        return array
    import warnings

    import numpy

    with warnings.catch_warnings():
        # A read-only memory map (decode_images' array): only ever read here, never written.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
        return torch.from_numpy(numpy.ascontiguousarray(array))


def _channels_first(images: torch.Tensor, layout: str) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` from ``NHW`` (grayscale), ``NHWC`` or ``NCHW``."""
    if layout == "NHW":
        return images.unsqueeze(1)
    if layout == "NHWC":
        return images.permute(0, 3, 1, 2)
    return images


def _layouts() -> dict[Any, tuple[str, str]]:
    """``__getitem__`` of each known class -> (labels attribute, image layout of ``data``)."""
    known: dict[Any, tuple[str, str]] = {ImageArray.__getitem__: ("targets", "ImageArray")}
    try:
        from torchvision import datasets
    except ImportError:
        return known
    known[datasets.MNIST.__getitem__] = ("targets", "NHW")  # also FashionMNIST, KMNIST, EMNIST
    known[datasets.QMNIST.__getitem__] = ("targets", "QMNIST")
    known[datasets.CIFAR10.__getitem__] = ("targets", "NHWC")  # also CIFAR100
    known[datasets.SVHN.__getitem__] = ("labels", "NCHW")
    known[datasets.STL10.__getitem__] = ("labels", "NCHW")
    return known


def _whole(dataset: Any) -> InMemoryImages | str:
    kind = type(dataset)
    found = _layouts().get(getattr(kind, "__getitem__", None))
    if found is None:
        return f"{kind.__name__} is not an in-memory image dataset colabkit knows"
    label_name, layout = found
    labels = getattr(dataset, label_name, None)
    if labels is None:
        return f"{kind.__name__} has no labels"
    data: Any = getattr(dataset, "data", None)
    if str(getattr(data, "dtype", "")) not in ("uint8", "torch.uint8"):
        return f"{kind.__name__}.data is not uint8"
    labels = _as_tensor(labels)
    if layout == "QMNIST":
        if not getattr(dataset, "compat", True):
            return "QMNIST(compat=False) returns a row of metadata per sample, not a label"
        labels, layout = labels[:, 0], "NHW"
    if layout == "ImageArray":
        layout = "NHW" if len(data.shape) == 3 else "NHWC"
    images = _channels_first(_as_tensor(data), layout)
    return InMemoryImages(
        images=images,
        labels=labels.to(torch.int64).reshape(-1),
        transform=dataset.transform,
        target_transform=dataset.target_transform,
        name=kind.__name__,
    )


def in_memory_images(dataset: Any) -> InMemoryImages | str:
    """``dataset``'s images, labels and transforms, or a phrase saying why it is not such a dataset.

    Args:
        dataset: A torchvision in-memory dataset, an ImageArray, or a (nested) Subset of one.

    Returns:
        :class:`InMemoryImages` (nothing copied yet: see :meth:`InMemoryImages.rows`),
        or the reason as a phrase.
    """
    indices: torch.Tensor | None = None
    while isinstance(dataset, Subset):
        chosen = torch.as_tensor(list(dataset.indices), dtype=torch.int64)
        indices = chosen if indices is None else chosen[indices]
        dataset = dataset.dataset
    whole = _whole(dataset)
    if isinstance(whole, str):
        return whole
    if indices is not None:
        whole.indices = indices
        whole.name = f"Subset of {whole.name}"
    return whole
